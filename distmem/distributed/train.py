"""Data-parallel training with Ray Train (`TorchTrainer`; gloo on CPU, nccl on GPU), shared by
the jobs: the life-long memory, checkpoints in the run folder, and the trainer group.

Each task gives a worker function (run by every trainer; gradients averaged by DDP) that trains
on its own batches. In life-long mode the trainers are the writers of one `ShardedMemory`
(attached by name, rank = world rank). Rank 0 writes the progress file and the checkpoints into
the run folder, a `RunStore` (local path or s3:// / gs:// URI), so results outlive the cluster. A
trainer lost with its node is restarted by Ray Train (`max_failures`) and resumes from the latest
checkpoint; the life-long memory goes on (its shards recover from their own snapshots and logs).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
import ray.train.torch
import torch

from distmem.config import MemoryConfig
from distmem.distributed.memory import ShardedMemory
from distmem.runs import RunStore

LATEST = "checkpoints/latest.json"


def latest_checkpoint(store: RunStore) -> str | None:
    """The run folder's latest checkpoint ("checkpoints/<name>"), or None."""
    return f"checkpoints/{json.loads(store.read_text(LATEST))['name']}" if store.exists(LATEST) else None


def load_checkpoint(store: RunStore, checkpoint: str) -> dict[str, Any]:
    """The model.pt payload of a checkpoint folder of the run (on the CPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        return torch.load(store.download(f"{checkpoint}/model.pt", Path(tmp) / "model.pt"), map_location="cpu",
                          weights_only=False)


def restore(store: RunStore, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Load the run's latest checkpoint into `model` and `optimizer`; returns its payload, or None
    (a new run: both left as they are)."""
    checkpoint = latest_checkpoint(store)
    if checkpoint is None:
        return None
    saved = load_checkpoint(store, checkpoint)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return saved


def save_checkpoint(store: RunStore, name: str, payload: dict[str, Any], memory=None) -> None:
    """checkpoints/<name>/: model.pt (payload), and the memory: memory.arrow for a local one, or
    memory/ (one part per shard, each written by its shard) for a sharded one. latest.json is
    written last, so a checkpoint it names is complete."""
    sharded = isinstance(memory, ShardedMemory)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(payload, Path(tmp) / "model.pt")
        if memory is not None and not sharded:
            memory.save(Path(tmp) / "memory.arrow")
        store.upload(tmp, f"checkpoints/{name}")
    if memory is not None and sharded:
        memory.save(store.location(f"checkpoints/{name}/memory"))
    store.write_text(LATEST, json.dumps({"name": name, **{k: v for k, v in payload.items() if k in ("batch", "step")}}))


def lifelong_memory(config: MemoryConfig, shards: int, backend: str, store: RunStore, writers: int, prefix: str,
                    memory_storage: str | None = None) -> ShardedMemory:
    """The run's `ShardedMemory` (never emptied), restored from the run's latest checkpoint if any.

    memory_storage: folder for the shards' snapshots and write logs (default: beside a local run
    folder, else a temporary folder); on a multi-node cluster a folder every node mounts."""
    if memory_storage is None:
        memory_storage = store.path("memory-storage") if store.local else tempfile.mkdtemp(prefix="distmem-memory-")
    memory = ShardedMemory(config, shards, backend=backend, name=f"{prefix}-{Path(store.root).name}-{os.getpid()}",
                           num_writers=writers, storage=memory_storage)
    checkpoint = latest_checkpoint(store)
    if checkpoint is not None:
        memory.load(store.location(f"{checkpoint}/memory"))
    return memory


def fit(worker: Callable[[dict], None], loop_config: dict, store: RunStore, workers: int, cpus_per_worker: int = 0,
        memory: ShardedMemory | None = None, max_failures: int = 3) -> None:
    """Run `worker(loop_config)` on `workers` Ray Train trainers (CPU each: `cpus_per_worker`, 0 =
    the cluster's CPUs / workers; one GPU each when the cluster has one per trainer beyond the
    memory's shards). loop_config gets "memory_name" (the sharded memory's, or None)."""
    resources = ray.cluster_resources()
    cpus = cpus_per_worker or max(1, int(resources.get("CPU", 1)) // workers)
    gpus = resources.get("GPU", 0)
    shards = len(memory.shards) if memory is not None else 0
    gpus -= shards if gpus >= shards else 0  # the memory's shards take theirs first
    use_gpu = gpus >= workers
    trainer = ray.train.torch.TorchTrainer(
        worker,
        train_loop_config={**loop_config, "memory_name": memory.name if memory is not None else None},
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(name="train", storage_path=store.location("ray"),
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures)),
    )
    trainer.fit()
