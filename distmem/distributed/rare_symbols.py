"""Data-parallel training on the rare-symbol stream with Ray Train (see `distmem.distributed.train`).

Each trainer (rank r of W) draws its own training stream (`TrainingStream(task, batch, r, W)`)
and, with memory, is writer r of the run's life-long `ShardedMemory`: every step it reads its
batch (labels = the gold next tokens), and after the update writes it; the writers of a step form
one memory step. Rank 0 writes the training curve, the progress file and the checkpoints (model,
optimizer, config, stream position, memory).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import numpy as np
import ray.train
import ray.train.torch
import torch

from distmem.data.rare_symbols import TrainingStream
from distmem.distributed.memory import ShardedMemory, connect
from distmem.distributed.train import fit, lifelong_memory, restore, save_checkpoint
from distmem.models.seq2seq import Seq2Seq
from distmem.runs import RunStore
from distmem.tasks.rare_symbols import RareSymbolRunConfig, train_step


def _worker(loop_config: dict) -> None:
    cfg = RareSymbolRunConfig(**loop_config["config"])
    use_memory = loop_config["use_memory"]
    store = RunStore(loop_config["store"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = cfg.task()
    torch.manual_seed(cfg.seed)
    model = Seq2Seq(cfg.model_config(use_memory))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-4)
    saved = restore(store, model, optimizer)
    start, curve = (saved["step"], saved["curve"]) if saved else (0, [])
    model = ray.train.torch.prepare_model(model)
    net = model.module if hasattr(model, "module") else model
    memory = ShardedMemory.attach(loop_config["memory_name"], rank) if use_memory else None
    stream = TrainingStream(task, cfg.batch_size, rank, world)
    for _ in range(start):  # the stream is a seeded function of its steps: replay to the resume point
        next(stream)
    window: dict[str, list[float]] = {}
    started = time.time()
    for step in range(start, cfg.steps):
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout: a function of the step, as the stream
        metrics = train_step(model, memory, task, next(stream), optimizer, cfg.clip_norm)
        done = step + 1
        if rank != 0:
            continue
        for name, value in metrics.items():
            window.setdefault(name, []).append(value)
        if done % cfg.log_every == 0 or done == cfg.steps:
            curve.append({"step": done, "seconds": time.time() - started,
                          **{name: float(np.mean(values)) for name, values in window.items()}})
            window = {}
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(store, f"step-{done:07d}",
                            {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "config": asdict(cfg),
                             "use_memory": use_memory, "step": done, "curve": curve,
                             "rare_exhausted_at": stream.exhausted_at}, memory)
        store.write_text("progress.json", json.dumps({"step": done, "of": cfg.steps, **metrics,
                                                      "curve": curve[-1] if curve else None}))


def train_rare_symbols(cfg: RareSymbolRunConfig, store: RunStore, use_memory: bool, address: str | None = None,
                       memory_storage: str | None = None, max_failures: int = 3) -> None:
    """Train one model (with or without memory) into the run folder `store` with Ray Train,
    resuming from its latest checkpoint. The life-long memory lives on `cfg.shards` shards for the
    run and is saved with every checkpoint; it is shut down when training ends."""
    connect(address)
    memory = None
    if use_memory:
        memory = lifelong_memory(cfg.memory_config(), cfg.shards, cfg.backend, store, cfg.workers, "rare-symbols",
                                 memory_storage)
    try:
        fit(_worker, {"config": asdict(cfg), "store": store.uri, "use_memory": use_memory}, store, cfg.workers,
            cfg.cpus_per_worker, memory, max_failures)
    finally:
        if memory is not None:
            memory.shutdown()

