"""Data-parallel Omniglot training with Ray Train (`TorchTrainer`; gloo on CPU, nccl on GPU).

Each worker trains on its own episode batches; gradients are averaged by DDP. In life-long mode
the workers are the writers of one `ShardedMemory` (attached by name, rank = world rank); in
episodic mode each worker has its own `LocalMemory`, emptied before every batch. Rank 0 writes
the accuracy curve, the progress file and the checkpoints (model, optimizer, config, memory).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from distmem import LocalMemory, MemoryConfig
from distmem.data.omniglot import load_omniglot, make_split
from distmem.distributed.memory import ShardedMemory, _ensure_ray
from distmem.models.omniglot import OmniglotModelConfig, OmniglotNet
from distmem.tasks.omniglot import (OmniglotRunConfig, embed, evaluate, sample_episodes, subset_classes,
                                    train_batch)


def memory_config(cfg: OmniglotRunConfig) -> MemoryConfig:
    return MemoryConfig(size=cfg.memory_size, key_dim=cfg.key_dim, k=cfg.k, age_noise=cfg.age_noise, seed=cfg.seed)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest.json"
    return run_dir / "checkpoints" / json.loads(pointer.read_text())["name"] if pointer.is_file() else None


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _worker(loop_config: dict) -> None:
    cfg = OmniglotRunConfig(**loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.seed)
    train, test = make_split(load_omniglot(cfg.data, cfg.cache), cfg.split)
    curve_split = subset_classes(test, cfg.curve_classes, seed=cfg.seed)
    model = OmniglotNet(OmniglotModelConfig(key_dim=cfg.key_dim), memory_config(cfg))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-4)
    start, curve = 0, []
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        saved = torch.load(checkpoint / "model.pt", weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start, curve = saved["batch"], saved["curve"]
    model = ray.train.torch.prepare_model(model)
    net = model.module if hasattr(model, "module") else model
    if cfg.mode == "lifelong":
        memory = ShardedMemory.attach(loop_config["memory_name"], rank)
    else:
        memory = LocalMemory(memory_config(cfg), backend=cfg.backend, device="cpu")
    rng = np.random.default_rng([cfg.seed, rank, start])
    started = time.time()
    for b in range(start, cfg.batches):
        if cfg.mode == "episodic":
            memory.clear()
        batch = sample_episodes(train, rng, cfg.parallel, cfg.width, cfg.per_class,
                                global_labels=cfg.mode == "lifelong")
        metrics = train_batch(model, memory, train, batch, optimizer, cfg.clip_norm)
        done = b + 1
        if rank != 0:
            continue
        if done % cfg.eval_every == 0 or done == cfg.batches:
            acc = evaluate(embed(net, curve_split.images), curve_split, 5, cfg.curve_episodes, seed=cfg.seed)
            curve.append({"batch": done, "seconds": time.time() - started,
                          **{f"{k}-shot": v["accuracy"] for k, v in acc.items()}})
        if done % cfg.checkpoint_every == 0 or done == cfg.batches:
            _save_checkpoint(run_dir, cfg, net, optimizer, memory, done, curve)
        _write_json(run_dir / "progress.json", {"batch": done, "of": cfg.batches, **metrics,
                                                "curve": curve[-1] if curve else None})


def _save_checkpoint(run_dir: Path, cfg: OmniglotRunConfig, net, optimizer, memory, done: int, curve: list) -> None:
    folder = run_dir / "checkpoints" / f"batch-{done:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "config": asdict(cfg),
                "batch": done, "curve": curve}, folder / "model.pt")
    if cfg.mode == "lifelong":
        memory.save(folder / "memory")
    else:
        memory.save(folder / "memory.arrow")
    _write_json(run_dir / "checkpoints" / "latest.json", {"name": folder.name, "batch": done})


def train_omniglot(cfg: OmniglotRunConfig, run_dir: Path, address: str | None = None) -> dict:
    """Train with Ray Train; returns {"memory": ShardedMemory or None}. Resumes from run_dir."""
    _ensure_ray(address)
    memory = None
    if cfg.mode == "lifelong":
        memory = ShardedMemory(memory_config(cfg), cfg.shards, backend=cfg.backend,
                               name=f"omniglot-{run_dir.name}-{os.getpid()}", num_writers=cfg.workers,
                               storage=run_dir / "memory-storage")
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is not None:
            memory.load(checkpoint / "memory")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    trainer = ray.train.torch.TorchTrainer(
        _worker,
        train_loop_config={"config": asdict(cfg), "run_dir": str(run_dir),
                           "memory_name": memory.name if memory is not None else None},
        torch_config=ray.train.torch.TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers,
                                               resources_per_worker={"CPU": max(1, cpus // cfg.workers)}),
        run_config=ray.train.RunConfig(name="train", storage_path=str(run_dir / "ray")),
    )
    trainer.fit()
    return {"memory": memory}
