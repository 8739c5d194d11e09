"""The rare-symbol task as a `distmem.training.Task`: one model, with or without memory.

Worker rank r of W draws its own share of the seeded life-long stream (`TrainingStream(task,
batch, r, W)`); a resumed worker replays its stream to the resume point (the stream is a seeded
function of its steps). With memory, the workers are the writers of one life-long memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from distmem.memory import Memory
from distmem.tasks.rare_symbols.config import RareSymbolRunConfig
from distmem.tasks.rare_symbols.data import StreamBatch, TrainingStream
from distmem.tasks.rare_symbols.training import train_step
from distmem.training import MemorySpec, ParquetSource, Schedule


class RareSymbolsTask:
    """cfg: the run config; use_memory: train the model with the life-long memory, or without."""

    def __init__(self, cfg: RareSymbolRunConfig, use_memory: bool) -> None:
        self.config = cfg
        self.use_memory = use_memory
        self.name = f"rare-symbols-{'memory' if use_memory else 'baseline'}"
        self._stream: TrainingStream | None = None

    def schedule(self) -> Schedule:
        c = self.config
        return Schedule(steps=c.steps, workers=c.workers, cpus_per_worker=c.cpus_per_worker, log_every=c.log_every,
                        checkpoint_every=c.checkpoint_every, seed=c.seed)

    def memory_spec(self) -> MemorySpec | None:
        if not self.use_memory:
            return None
        return MemorySpec(self.config.memory_config(), shared=True, shards=self.config.shards,
                          backend=self.config.backend)

    def data(self) -> ParquetSource | None:
        return None

    def build(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        torch.manual_seed(self.config.seed)
        model = self.config.build_model(self.use_memory)
        return model, torch.optim.Adam(model.parameters(), lr=self.config.lr, eps=1e-4)

    def batches(self, rank: int, world: int, start: int, rows=None) -> Iterator[StreamBatch]:
        self._stream = TrainingStream(self.config.task(), self.config.batch_size, rank, world)
        for _ in range(start):  # replay to the resume point
            next(self._stream)
        yield from self._stream

    def train_step(self, model: torch.nn.Module, memory: Memory | None, batch: StreamBatch,
                   optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        return train_step(model, memory, self.config.task(), batch, optimizer, self.config.clip_norm)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return {}

    def summary(self) -> dict[str, Any]:
        """The step at which this worker's rare training symbols were all introduced (or None)."""
        return {"rare_exhausted_at": self._stream.exhausted_at if self._stream is not None else None}
