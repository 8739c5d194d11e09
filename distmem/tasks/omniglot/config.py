"""The Omniglot run config and its presets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from distmem.cli import check_fields, option
from distmem.config import MemoryConfig
from distmem.models.omniglot import OmniglotModelConfig


@dataclass(frozen=True)
class OmniglotRunConfig:
    """Everything an Omniglot run needs; saved with every checkpoint (config.json in the run folder)."""

    preset: str = option("default", "the preset this config started from")
    mode: Literal["episodic", "lifelong"] = option(
        "episodic", "episodic: each trainer's memory emptied before every batch (the released code); "
                    "lifelong: one sharded memory for all trainers, never emptied")
    split: Literal["released", "vinyals"] = option("released", "train/test split of the characters")
    workers: int = option(1, "data-parallel trainers (Ray Train)")
    cpus_per_worker: int = option(0, "CPUs each trainer reserves (0: the cluster's CPUs / workers)")
    shards: int = option(1, "memory shards (life-long mode)")
    step_group: int = option(1, "time steps per memory step (>1: fewer round trips to a sharded memory)")
    batches: int = option(300, "episode batches (optimizer updates) to train for")
    parallel: int = option(16, "episodes per batch, per worker")
    width: int = option(5, "classes per training episode")
    per_class: int = option(10, "drawings of each class per training episode")
    lr: float = option(1e-4, "Adam learning rate")
    lr_schedule: Literal["constant", "cosine"] = option("constant", "cosine decays the lr to 0 over the batches")
    clip_norm: float = option(5.0, "gradient-norm clipping")
    memory_size: int = option(8192, "memory slots")
    key_dim: int = option(256, "key size")
    k: int = option(256, "nearest neighbours per query")
    age_noise: float = option(8.0, "half-width of the age noise of the memory's update")
    backend: Literal["torch", "faiss", "ivf"] = option("torch", "k-NN backend of the memory (ivf: approximate)")
    ivf_lists: int = option(0, "backend ivf: inverted lists per shard (0: about 4 sqrt(slots))")
    ivf_probe: int = option(32, "backend ivf: lists scanned per query")
    ivf_check_every: int = option(100, "backend ivf: searches between recall checks against the exact search")
    ivf_target_recall_at_1: float = option(0.0, "backend ivf: recall@1 target; each check sets nprobe to meet it "
                                                "(0: nprobe stays --ivf-probe)")
    ivf_target_recall_at_k: float = option(0.0, "backend ivf: recall@k target, likewise")
    conv_norm: bool = option(False, "batch norm after each convolution (not in the released CNN)")
    eval_every: int = option(50, "batches between points of the accuracy curve")
    curve_classes: int = option(100, "test classes used for the curve (the final table uses all)")
    curve_episodes: int = option(300, "episodes per point of the curve")
    eval_episodes: int = option(1000, "episodes per cell of the final table")
    checkpoint_every: int = option(100, "batches between checkpoints")
    seed: int = option(0, "seed of the episodes, the dropout, the initialisation and the memory")
    data: str | None = option(None, "folder or URI with the Omniglot zips (default ../shared/data/omniglot)")
    cache: str | None = option(None, "decoded-image cache folder (default ~/.cache/distmem)")

    def __post_init__(self) -> None:
        check_fields(self, at_least_one=("workers", "shards", "step_group", "batches", "parallel", "width", "per_class",
                                         "memory_size", "key_dim", "k", "eval_every", "curve_classes",
                                         "curve_episodes", "eval_episodes", "checkpoint_every"),
                     non_negative=("cpus_per_worker",), positive_finite=("lr",))
        for name, choices in (("mode", ("episodic", "lifelong")), ("split", ("released", "vinyals")),
                              ("lr_schedule", ("constant", "cosine")), ("backend", ("torch", "faiss", "ivf"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name.replace('_', '-')}: expected one of {choices}, got {getattr(self, name)!r}")
        self.memory_config()  # k <= size and the rest, named

    def model_config(self) -> OmniglotModelConfig:
        """The network this run trains (key size, batch norm after the convolutions)."""
        return OmniglotModelConfig(key_dim=self.key_dim, batch_norm=self.conv_norm)

    def memory_config(self) -> MemoryConfig:
        """The memory this run trains with (size, key size, k, age noise, seed)."""
        return MemoryConfig(size=self.memory_size, key_dim=self.key_dim, k=self.k, age_noise=self.age_noise,
                            seed=self.seed,
                            ivf_lists=self.ivf_lists, ivf_probe=self.ivf_probe,
                            ivf_check_every=self.ivf_check_every, ivf_target_recall_at_1=self.ivf_target_recall_at_1,
                            ivf_target_recall_at_k=self.ivf_target_recall_at_k)


PRESETS: dict[str, dict] = {
    # smoke run: a few batches, small evaluation; the default preset's lr, so that 4 batches learn
    # measurably (5-way 1-shot on 200 training classes: 62.1% untrained, 68.2% after; at 1e-4: 58.9%)
    "quick": dict(batches=4, parallel=4, conv_norm=True, lr=2e-3, eval_every=2, curve_classes=30, curve_episodes=50,
                  eval_episodes=100, checkpoint_every=2),
    # under 15 minutes on 2 CPU cores; chosen at equal compute (docs/experiments.md)
    "default": dict(batches=180, parallel=8, conv_norm=True, lr=2e-3, lr_schedule="cosine", eval_every=36,
                    checkpoint_every=36),
    # the paper's settings (Adam 1e-4, memory 8192, key 256, k 256): hours on a GPU
    "paper": dict(batches=60000, lr=1e-4, eval_every=1000, checkpoint_every=1000, curve_episodes=500),
}


def learning_rate(cfg: OmniglotRunConfig, batch: int) -> float:
    """The learning rate of update `batch` (0-based); a pure function of the batch, so resuming is exact."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * batch / cfg.batches))
    return cfg.lr
