"""Omniglot one-shot learning as a `distmem.training.Task`.

Each worker trains on its own episode batches, drawn from (seed, rank, batch), so a resumed run
continues exactly. Episodic mode gives every worker its own memory, emptied before each batch;
life-long mode shares one memory between the workers that is never emptied (labels are then
global class ids). Rank 0's evaluation is the 5-way curve on held-out classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from distmem.memory import Memory
from distmem.models.omniglot import OmniglotNet
from distmem.tasks.omniglot.config import OmniglotRunConfig, learning_rate
from distmem.tasks.omniglot.data import Split, load_omniglot, make_split
from distmem.tasks.omniglot.evaluation import embed, evaluate, subset_classes
from distmem.tasks.omniglot.training import EpisodeBatch, sample_episodes, train_batch
from distmem.training import MemorySpec, ParquetSource, Schedule

Raw = dict[str, tuple[np.ndarray, np.ndarray]]


class OmniglotTask:
    """cfg: the run config. raw: the decoded zips (`load_omniglot`), sent to the workers with the
    task (about 25 MB); None: each worker loads `cfg.data` itself. splits: (train, test) to use
    instead of the zips' (your own data, or a test's)."""

    name = "omniglot"

    def __init__(self, cfg: OmniglotRunConfig, raw: Raw | None = None,
                 splits: tuple[Split, Split] | None = None) -> None:
        self.config = cfg
        self.raw = raw
        self.given = splits
        self._splits: tuple[Split, Split] | None = splits

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_splits": self.given}  # each worker builds its own splits from raw

    def splits(self) -> tuple[Split, Split]:
        """(train, test) of the run's split."""
        if self._splits is None:
            raw = self.raw if self.raw is not None else load_omniglot(self.config.data, self.config.cache)
            self._splits = make_split(raw, self.config.split)
        return self._splits

    def schedule(self) -> Schedule:
        c = self.config
        return Schedule(steps=c.batches, workers=c.workers, cpus_per_worker=c.cpus_per_worker, log_every=1,
                        eval_every=c.eval_every, checkpoint_every=c.checkpoint_every, seed=c.seed)

    def memory_spec(self) -> MemorySpec:
        lifelong = self.config.mode == "lifelong"
        return MemorySpec(self.config.memory_config(), shared=lifelong, shards=self.config.shards if lifelong else 1,
                          backend=self.config.backend)

    def data(self) -> ParquetSource | None:
        return None

    def build(self) -> tuple[OmniglotNet, torch.optim.Optimizer]:
        torch.manual_seed(self.config.seed)
        model = OmniglotNet(self.config.model_config())
        return model, torch.optim.Adam(model.parameters(), lr=self.config.lr, eps=1e-4)

    def batches(self, rank: int, world: int, start: int, rows=None) -> Iterator[EpisodeBatch]:
        c = self.config
        train, _ = self.splits()
        for b in range(start, c.batches):
            rng = np.random.default_rng(np.random.SeedSequence([c.seed, rank, b]))
            yield sample_episodes(train, rng, c.parallel, c.width, c.per_class, global_labels=c.mode == "lifelong")

    def train_step(self, model: torch.nn.Module, memory: Memory, batch: EpisodeBatch,
                   optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        if self.config.mode == "episodic":
            memory.clear()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(self.config, step)
        train, _ = self.splits()
        return train_batch(model, memory, train, batch, optimizer, self.config.clip_norm, self.config.step_group)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """5-way k-shot accuracy (%) on `curve_classes` held-out classes (model left in eval mode;
        train_batch puts it back in train mode)."""
        c = self.config
        _, test = self.splits()
        curve = subset_classes(test, c.curve_classes, seed=c.seed)
        result = evaluate(embed(model, curve.images), curve, 5, c.curve_episodes, seed=c.seed)
        return {f"{k}-shot": v["accuracy"] for k, v in result.items()}

    def summary(self) -> dict[str, Any]:
        return {}
