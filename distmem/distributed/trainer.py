"""One data-parallel trainer for every task: `fit(task, store)` runs `distmem.training.run_worker`
on Ray Train workers (`TorchTrainer`; gloo on CPU, nccl on GPU; the rendezvous on the node's address
only, `rendezvous.py`).

Where the task trains with a shared memory, the trainers are the writers of one life-long
`ShardedMemory` (created here, restored from the run's latest checkpoint, attached by each worker
as writer rank = world rank). Where the task streams Parquet files (`Task.data`), Ray Data reads
them and each worker gets its shard (`ray.train.get_dataset_shard`). Checkpoints are distmem's own
(`distmem.checkpoints`, in the run folder, a local path or a URI), written by rank 0; a worker
group restarted after a lost node (`max_failures`) resumes from the latest one while the memory
goes on (its shards recover from their own snapshots and logs). This module knows no task.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
import ray.train.torch

from distmem import checkpoints
from distmem.distributed.cluster import connect
from distmem.distributed.memory import ShardedMemory
from distmem.distributed.rendezvous import BoundTorchConfig
from distmem.runs import RunStore
from distmem.training import Task, repeat_epochs, run_worker

TRAIN_SPLIT = "train"


def shared_memory(task: Task, store: RunStore, memory_storage: str | None = None) -> ShardedMemory | None:
    """The task's life-long `ShardedMemory` for the run (None if it has no shared memory),
    restored from the run's latest checkpoint if any.

    memory_storage: folder for the shards' snapshots and write logs (default: beside a local run
    folder, else a temporary folder); on a multi-node cluster a folder every node mounts."""
    spec = task.memory_spec()
    if spec is None or not spec.shared:
        return None
    if memory_storage is None:
        memory_storage = store.path("memory-storage") if store.local else tempfile.mkdtemp(prefix="distmem-memory-")
    memory = ShardedMemory(spec.config, spec.shards, backend=spec.backend,
                           name=f"{task.name}-{Path(store.root).name}-{os.getpid()}",
                           num_writers=task.schedule().workers, storage=memory_storage)
    checkpoint = checkpoints.latest(store)
    if checkpoint is not None:
        checkpoints.restore_memory(memory, store, checkpoint)
    return memory


def _worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker of every task."""
    task: Task = loop_config["task"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    memory = ShardedMemory.attach(loop_config["memory_name"], rank) if loop_config["memory_name"] else None
    rows, source = None, task.data()
    if source is not None:
        shard = ray.train.get_dataset_shard(TRAIN_SPLIT)
        rows = repeat_epochs(lambda: shard.iter_batches(batch_size=source.rows_per_step, batch_format="numpy"))
    run_worker(task, RunStore(loop_config["store"]), rank, world, memory, prepare=ray.train.torch.prepare_model,
               rows=rows, device=ray.train.torch.get_device())


def fit(task: Task, store: RunStore, address: str | None = None, memory_storage: str | None = None,
        max_failures: int = 3) -> ShardedMemory | None:
    """Train `task` on `task.schedule().workers` Ray Train workers into the run folder `store`,
    resuming from its latest checkpoint. Returns the shared memory (still running; the caller
    shuts it down), or None.

    Each worker reserves `cpus_per_worker` CPUs (0: the cluster's CPUs / workers) and one GPU
    when the cluster has one per worker beyond the memory's shards."""
    checkpoint = checkpoints.latest(store)
    if checkpoint is not None:  # a damaged or unsafe checkpoint is refused here, before any worker starts
        checkpoints.load(store, checkpoint)
    connect(address)
    schedule = task.schedule()
    memory = shared_memory(task, store, memory_storage)
    try:
        resources = ray.cluster_resources()
        source = task.data()
        # a task fed by Ray Data leaves one CPU to its read tasks (else they never get scheduled)
        free = max(1.0, resources.get("CPU", 1) - (1 if source is not None else 0))
        workers = schedule.workers
        cpus = schedule.cpus_per_worker or (free // workers if free >= workers else free / workers)
        gpus = resources.get("GPU", 0)
        shards = len(memory.shards) if memory is not None else 0
        gpus -= shards if gpus >= shards else gpus  # the memory's shards take theirs first (all, when they share)
        use_gpu = gpus >= schedule.workers
        datasets = None
        if source is not None:
            ray.data.DataContext.get_current().execution_options.preserve_order = True  # resumable shares
            datasets = {TRAIN_SPLIT: ray.data.read_parquet(list(source.paths), columns=source.columns)}
        trainer = ray.train.torch.TorchTrainer(
            _worker,
            train_loop_config={"task": task, "store": store.uri, "memory_name": memory.name if memory else None},
            torch_config=BoundTorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=schedule.workers, use_gpu=use_gpu,
                                                   resources_per_worker={"CPU": cpus}),
            # Ray Train's own folder holds nothing of ours (checkpoints go to the run folder)
            run_config=ray.train.RunConfig(name=f"{task.name}-{os.getpid()}",
                                           storage_path=str(Path(tempfile.gettempdir()) / "distmem-ray-train"),
                                           failure_config=ray.train.FailureConfig(max_failures=max_failures)),
            datasets=datasets,
        )
        trainer.fit()
    except BaseException:
        if memory is not None:
            memory.shutdown()
        raise
    return memory
