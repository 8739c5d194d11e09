"""Data-parallel Omniglot training with Ray Train (see `distmem.distributed.train`).

Each trainer runs `distmem.tasks.omniglot.train_batches` on its own episode batches. In life-long
mode the trainers are the writers of one `ShardedMemory`; in episodic mode each has its own
`LocalMemory`, emptied before every batch. Rank 0 writes the accuracy curve, the progress file and
the checkpoints (model, optimizer, config, memory).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from distmem import LocalMemory
from distmem.data.omniglot import load_omniglot, make_split
from distmem.distributed.memory import ShardedMemory, connect
from distmem.distributed.train import fit, lifelong_memory, restore, save_checkpoint
from distmem.models.omniglot import OmniglotNet
from distmem.runs import RunStore
from distmem.tasks.omniglot import OmniglotRunConfig, embed, evaluate, subset_classes, train_batches


def _worker(loop_config: dict) -> None:
    cfg = OmniglotRunConfig(**loop_config["config"])
    store = RunStore(loop_config["store"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(cfg.seed)
    # the driver's decoded images through the object store (so trainers need no copy of the data)
    raw = ray.get(loop_config["data"]) if loop_config.get("data") is not None else load_omniglot(cfg.data, cfg.cache)
    train, test = make_split(raw, cfg.split)
    curve_split = subset_classes(test, cfg.curve_classes, seed=cfg.seed)
    model = OmniglotNet(cfg.model_config(), cfg.memory_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-4)
    saved = restore(store, model, optimizer)
    start, curve = (saved["batch"], saved["curve"]) if saved else (0, [])
    model = ray.train.torch.prepare_model(model)
    net = model.module if hasattr(model, "module") else model
    if cfg.mode == "lifelong":
        memory = ShardedMemory.attach(loop_config["memory_name"], rank)
    else:
        memory = LocalMemory(cfg.memory_config(), backend=cfg.backend, device=ray.train.torch.get_device())
    started = time.time()

    def curve_point() -> dict:  # on rank 0 only: held-out classes, 5-way
        return evaluate(embed(net, curve_split.images), curve_split, 5, cfg.curve_episodes, seed=cfg.seed)

    for done, metrics, point in train_batches(model, memory, train, optimizer, cfg, rank, start,
                                              curve_point if rank == 0 else None):
        if rank != 0:
            continue
        if point is not None:
            curve.append({"batch": done, "seconds": time.time() - started,
                          **{f"{k}-shot": v["accuracy"] for k, v in point.items()}})
        if done % cfg.checkpoint_every == 0 or done == cfg.batches:
            save_checkpoint(store, f"batch-{done:07d}", {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                                         "config": asdict(cfg), "batch": done, "curve": curve}, memory)
        store.write_text("progress.json", json.dumps({"batch": done, "of": cfg.batches, **metrics,
                                                      "curve": curve[-1] if curve else None}))


def train_omniglot(cfg: OmniglotRunConfig, store: RunStore, address: str | None = None,
                   memory_storage: str | None = None, max_failures: int = 3,
                   data: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict:
    """Train with Ray Train into the run folder `store`, resuming from its latest checkpoint.

    data: the decoded Omniglot arrays (`load_omniglot`), shipped to the trainers through the
    object store (about 25 MB); None: every trainer loads `cfg.data` itself. memory_storage: see
    `lifelong_memory`. Returns {"memory": the ShardedMemory (life-long mode) or None}.
    """
    connect(address)
    memory = None
    if cfg.mode == "lifelong":
        memory = lifelong_memory(cfg.memory_config(), cfg.shards, cfg.backend, store, cfg.workers, "omniglot",
                                 memory_storage)
    fit(_worker, {"config": asdict(cfg), "store": store.uri, "data": ray.put(data) if data is not None else None},
        store, cfg.workers, cfg.cpus_per_worker, memory, max_failures)
    return {"memory": memory}
