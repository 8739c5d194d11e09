"""The training loop every task runs, in a plain process or inside a Ray Train worker.

A task (a package under `distmem.tasks`) implements `Task`: it builds its model and optimizer,
says which memory it trains with (`MemorySpec`) and for how long (`Schedule`), gives each
worker its batches from a resumable position, takes one training step and evaluates. `run_worker`
drives it: resume from the run folder's latest checkpoint, one step per batch, the training curve,
evaluations, progress file and checkpoints on rank 0. `fit_local` runs it in this process (one
worker, a `LocalMemory` where the task wants a shared one); `distmem.distributed.fit` runs the
same `run_worker` on Ray Train workers with a `ShardedMemory`.

Exact resume: the torch RNG (dropout) is seeded from (seed, rank, step) before every step, and a
task's batches must be a function of (rank, world, start): a seeded generator, or, for a task fed
by Parquet files through Ray Data (`Task.data`), the rows of its shard from the start of the
window of step `start` (`ParquetSource.steps_per_window`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from distmem import checkpoints
from distmem.config import MemoryConfig
from distmem.memory import LocalMemory, Memory
from distmem.runs import RunStore

Rows = Iterable[dict[str, np.ndarray]]  # batches of table rows: column name -> [n] array


@dataclass(frozen=True)
class Schedule:
    """How long and on how many workers a task trains, and how often it reports.

    steps: training steps (one batch per worker each). workers: data-parallel workers.
    cpus_per_worker: CPUs each Ray worker reserves (0: the cluster's CPUs / workers).
    log_every: steps per point of the training curve (the mean of the step metrics).
    eval_every: steps between evaluations on rank 0 (0: none; else also after the last step).
    checkpoint_every: steps between checkpoints (and one after the last step).
    seed: seeds the per-step torch RNG (dropout) with the rank and the step.
    """

    steps: int
    workers: int = 1
    cpus_per_worker: int = 0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "workers", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("cpus_per_worker", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class MemorySpec:
    """The memory a task trains with.

    shared: one life-long memory for all workers, never emptied (a `ShardedMemory` over `shards`
    Ray actors, or one `LocalMemory` in a plain process); False: each worker its own `LocalMemory`.
    """

    config: MemoryConfig
    shared: bool = True
    shards: int = 1
    backend: str = "torch"


@dataclass(frozen=True)
class ParquetSource:
    """Training rows in Parquet files, streamed to the workers (Ray Data under Ray).

    rows_per_step: rows one worker consumes per step (on average over a window).
    steps_per_window: a task that forms its batches from windows of rows_per_step *
    steps_per_window rows (by length, say) resumes at a window's start: a worker resumed at step
    `start` skips (start // steps_per_window) whole windows of its share, and the task's
    `batches` continues within that window."""

    paths: tuple[str, ...]
    rows_per_step: int
    columns: tuple[str, ...] | None = None
    steps_per_window: int = 1


class Task(Protocol):
    """What the trainer needs of a task. The object is sent to every worker (keep it picklable)."""

    name: str
    config: Any  # its run config, a dataclass of plain fields (saved with each checkpoint)

    def schedule(self) -> Schedule: ...

    def memory_spec(self) -> MemorySpec | None:
        """The memory the model trains with, or None (a model without memory)."""

    def data(self) -> ParquetSource | None:
        """Parquet files to stream to the workers, or None (the task generates its batches)."""

    def build(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A freshly initialised model (the same on every worker) and its optimizer."""

    def batches(self, rank: int, world: int, start: int, rows: Rows | None = None) -> Iterator[Any]:
        """Worker `rank`'s batches for steps start, start + 1, ... (rows: its share of `data()`, with
        the windows before step `start`'s already skipped)."""

    def train_step(self, model: nn.Module, memory: Memory | None, batch: Any, optimizer: torch.optim.Optimizer,
                   step: int) -> dict[str, float]:
        """One update on `batch` (model: possibly DDP-wrapped); returns scalar metrics."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """A point of the evaluation curve (rank 0; must change neither the model nor the memory)."""

    def summary(self) -> dict[str, Any]:
        """Plain data about this worker's data position to keep in the checkpoint ({} if none)."""


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of a worker's step: a function of (seed, rank, step) only."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def make_memory(spec: MemorySpec | None, device: torch.device | str = "cpu") -> LocalMemory | None:
    """The in-process memory of `spec` (None without one)."""
    return None if spec is None else LocalMemory(spec.config, backend=spec.backend, device=device)


def read_rows(source: ParquetSource, rank: int = 0, world: int = 1, batch_rows: int = 1024) -> Iterator[dict]:
    """The rows of `source` without Ray: rank r of `world` takes every world-th batch of rows."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    index = 0
    for path in source.paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=source.columns):
            if index % world == rank:
                yield {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.schema.names}
            index += 1


def repeat_epochs(epoch: Callable[[], Rows]) -> Iterator[dict[str, np.ndarray]]:
    """The rows of `epoch()` (one pass over a worker's share), epoch after epoch."""
    while True:
        empty = True
        for batch in epoch():
            empty = False
            yield batch
        if empty:
            raise ValueError("data: this worker's share of the training rows is empty")


def skip_rows(rows: Rows, count: int) -> Iterator[dict[str, np.ndarray]]:
    """`rows` without its first `count` rows (a resumed worker's share continues where it stopped)."""
    for batch in rows:
        n = len(next(iter(batch.values()))) if batch else 0
        if count >= n:
            count -= n
            continue
        yield {name: column[count:] for name, column in batch.items()} if count else batch
        count = 0


def run_worker(task: Task, store: RunStore, rank: int = 0, world: int = 1, memory: Memory | None = None,
               prepare: Callable[[nn.Module], nn.Module] = lambda model: model, rows: Rows | None = None,
               device: torch.device | str = "cpu") -> None:
    """Train worker `rank` of `world` from the run folder's latest checkpoint to the end.

    memory: the shared memory (a `ShardedMemory` attached as writer `rank`, or a `LocalMemory`);
    None: the task's own (a fresh `LocalMemory` per worker when its spec is not shared, else
    none). prepare: wraps the model for data-parallel training (Ray Train's DDP). Rank 0 writes
    progress.json, the curves and the checkpoints (model, optimizer, config, step, memory).
    """
    schedule, spec = task.schedule(), task.memory_spec()
    model, optimizer = task.build()
    model.to(device)
    saved = checkpoints.restore(store, model, optimizer)
    start = saved["step"] if saved else 0
    curve, evals = (saved["curve"], saved["evals"]) if saved else ([], [])
    elapsed = saved.get("seconds", 0.0) if saved else 0.0  # training time before this process
    if memory is None and spec is not None and not spec.shared:
        memory = make_memory(spec, device)
        if saved is not None:  # rank 0's memory as checkpointed
            checkpoints.restore_memory(memory, store, checkpoints.latest(store))
    net = model
    model = prepare(model)
    window: dict[str, list[float]] = {}
    started = time.time() - elapsed
    source = task.data()
    if rows is not None and source is not None and start:
        per_window = source.steps_per_window
        rows = skip_rows(rows, start // per_window * per_window * source.rows_per_step)
    batches = task.batches(rank, world, start, rows)
    for step in range(start, schedule.steps):
        batch = next(batches, None)
        if batch is None:
            raise RuntimeError(f"{task.name}: its batches ended at step {step} of {schedule.steps}")
        torch.manual_seed(step_seed(schedule.seed, rank, step))
        metrics = task.train_step(model, memory, batch, optimizer, step)
        done = step + 1
        if rank != 0:
            continue
        for name, value in metrics.items():
            window.setdefault(name, []).append(value)
        if done % schedule.log_every == 0 or done == schedule.steps:
            curve.append({"step": done, "seconds": time.time() - started,
                          **{name: float(np.mean(values)) for name, values in window.items()}})
            window = {}
        if schedule.eval_every and (done % schedule.eval_every == 0 or done == schedule.steps):
            evals.append({"step": done, "seconds": time.time() - started, **task.evaluate(net)})
        if done % schedule.checkpoint_every == 0 or done == schedule.steps:
            checkpoints.save(store, checkpoints.step_name(done),
                             {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                              "config": asdict(task.config), "task": task.name, "step": done, "curve": curve,
                              "evals": evals, "summary": task.summary(), "seconds": time.time() - started}, memory)
        store.write_text("progress.json", json.dumps({"step": done, "of": schedule.steps, **metrics,
                                                      "eval": evals[-1] if evals else None}))


def fit_local(task: Task, store: RunStore, device: torch.device | str = "cpu") -> Memory | None:
    """Train `task` in this process (one worker, no Ray) into the run folder `store`, resuming from
    its latest checkpoint. A shared memory is one `LocalMemory` here (returned)."""
    spec = task.memory_spec()
    memory = None
    if spec is not None and spec.shared:
        memory = make_memory(spec, device)
        checkpoint = checkpoints.latest(store)
        if checkpoint is not None:
            checkpoints.restore_memory(memory, store, checkpoint)
    source = task.data()
    rows = repeat_epochs(lambda: read_rows(source)) if source is not None else None
    run_worker(task, store, 0, 1, memory, rows=rows, device=device)
    return memory
