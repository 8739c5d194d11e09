"""Data-parallel Omniglot training with Ray Train (`TorchTrainer`; gloo on CPU, nccl on GPU).

Each worker trains on its own episode batches; gradients are averaged by DDP. In life-long mode
the workers are the writers of one `ShardedMemory` (attached by name, rank = world rank); in
episodic mode each worker has its own `LocalMemory`, emptied before every batch. Rank 0 writes
the accuracy curve, the progress file and the checkpoints (model, optimizer, config, memory) into
the run folder, a `RunStore` (local path or s3:// / gs:// URI), so any node can write it and the
results outlive the cluster. A worker lost with its node is restarted by Ray Train
(`max_failures`) and resumes from the latest checkpoint; the life-long memory goes on (its shards
recover from their own snapshots and logs).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from distmem import LocalMemory
from distmem.data.omniglot import load_omniglot, make_split
from distmem.distributed.memory import ShardedMemory, connect
from distmem.models.omniglot import OmniglotModelConfig, OmniglotNet
from distmem.runs import RunStore
from distmem.tasks.omniglot import OmniglotRunConfig, embed, evaluate, subset_classes, train_batches

LATEST = "checkpoints/latest.json"


def latest_checkpoint(store: RunStore) -> str | None:
    """The run folder's latest checkpoint ("checkpoints/batch-..."), or None."""
    return f"checkpoints/{json.loads(store.read_text(LATEST))['name']}" if store.exists(LATEST) else None


def _worker(loop_config: dict) -> None:
    cfg = OmniglotRunConfig(**loop_config["config"])
    store = RunStore(loop_config["store"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.seed)
    # the driver's decoded images through the object store (so trainers need no copy of the data)
    raw = ray.get(loop_config["data"]) if loop_config.get("data") is not None else load_omniglot(cfg.data, cfg.cache)
    train, test = make_split(raw, cfg.split)
    curve_split = subset_classes(test, cfg.curve_classes, seed=cfg.seed)
    model = OmniglotNet(OmniglotModelConfig(key_dim=cfg.key_dim), cfg.memory_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-4)
    start, curve = 0, []
    checkpoint = latest_checkpoint(store)
    if checkpoint is not None:
        with tempfile.TemporaryDirectory() as tmp:
            saved = torch.load(store.download(f"{checkpoint}/model.pt", Path(tmp) / "model.pt"), weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start, curve = saved["batch"], saved["curve"]
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
            _save_checkpoint(store, cfg, net, optimizer, memory, done, curve)
        store.write_text("progress.json", json.dumps({"batch": done, "of": cfg.batches, **metrics,
                                                      "curve": curve[-1] if curve else None}))


def _save_checkpoint(store: RunStore, cfg: OmniglotRunConfig, net, optimizer, memory, done: int, curve: list) -> None:
    name = f"batch-{done:07d}"
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "config": asdict(cfg),
                    "batch": done, "curve": curve}, Path(tmp) / "model.pt")
        if cfg.mode == "episodic":
            memory.save(Path(tmp) / "memory.arrow")
        store.upload(tmp, f"checkpoints/{name}")
    if cfg.mode == "lifelong":  # every shard writes (and uploads) its own part
        memory.save(store.location(f"checkpoints/{name}/memory"))
    store.write_text(LATEST, json.dumps({"name": name, "batch": done}))  # last: the checkpoint is complete


def train_omniglot(cfg: OmniglotRunConfig, store: RunStore, address: str | None = None,
                   memory_storage: str | None = None, max_failures: int = 3,
                   data: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict:
    """Train with Ray Train into the run folder `store`, resuming from its latest checkpoint.

    data: the decoded Omniglot arrays (`load_omniglot`), shipped to the trainers through the
    object store (about 25 MB); None: every trainer loads `cfg.data` itself.

    memory_storage: folder for the life-long memory's snapshots and write log (default: a local
    folder beside the run, or a temporary one for a remote run folder); on a multi-node cluster
    use a folder every node reaches, so a shard restarted on another node finds its log.
    Returns {"memory": the ShardedMemory (life-long mode) or None}.
    """
    connect(address)
    memory = None
    if cfg.mode == "lifelong":
        if memory_storage is None:
            memory_storage = (store.path("memory-storage") if store.local
                              else tempfile.mkdtemp(prefix="distmem-memory-storage-"))
        memory = ShardedMemory(cfg.memory_config(), cfg.shards, backend=cfg.backend,
                               name=f"omniglot-{Path(store.root).name}-{os.getpid()}", num_writers=cfg.workers,
                               storage=memory_storage)
        checkpoint = latest_checkpoint(store)
        if checkpoint is not None:
            memory.load(store.location(f"{checkpoint}/memory"))
    resources = ray.cluster_resources()
    cpus = cfg.cpus_per_worker or max(1, int(resources.get("CPU", 1)) // cfg.workers)
    gpus = resources.get("GPU", 0)
    gpus -= cfg.shards if memory is not None and gpus >= cfg.shards else 0  # the memory's shards take theirs first
    use_gpu = gpus >= cfg.workers
    trainer = ray.train.torch.TorchTrainer(
        _worker,
        train_loop_config={"config": asdict(cfg), "store": store.uri,
                           "memory_name": memory.name if memory is not None else None,
                           "data": ray.put(data) if data is not None else None},
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(name="train", storage_path=store.location("ray"),
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures)),
    )
    trainer.fit()
    return {"memory": memory}
