"""Configuration of a key-value memory (saved with every checkpoint and memory file)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

KEY_DTYPES = ("float32", "float16", "bfloat16", "int8", "int8_dim")


@dataclass(frozen=True)
class MemoryConfig:
    """Hyper-parameters of the memory of Kaiser et al. (2017).

    size: number of slots N.          key_dim: key size d.
    k: candidates per query (1 <= k <= size; the paper uses 256).
    alpha: margin of the loss.        age_noise: half-width of the uniform age noise.
    seed: seed of the age-noise generator.
    chunk_size: slots scored per block by the exact torch search (bounds the B x chunk buffer);
        None picks 2048 on CPU (cache-sized) and 65536 on CUDA.
    key_dtype: storage type of the keys ("float32"; "float16"/"bfloat16": half the bytes; "int8":
        a quarter, scalar-quantised with one fixed scale; "int8_dim": a quarter, with per-dimension
        ranges fitted to the written keys, for trained keys; see distmem.keycodes).
    key_fit_after, key_refit_every: int8_dim keys: fit the ranges after this many slot writes (x
        the shard's slots), re-fit after every further key_refit_every x slots (0: never).
    ivf_lists, ivf_probe: the approximate backend's (backend="ivf") inverted lists per shard
        (0: about 4 sqrt(slots)) and the lists each query scans.
    ivf_train_after, ivf_retrain_every: train its centroids after this many slot writes (x the
        shard's slots) and re-train after every further ivf_retrain_every x slots (0: never).
    ivf_check_every: every this many searches, measure the recall of a few queries against the
        exact search (0: never).
    ivf_target_recall_at_1, ivf_target_recall_at_k: recall targets in [0, 1] (0: none, nprobe stays
        ivf_probe); with either, every check sets nprobe to what the targets need (see distmem.ivf).
    ivf_exact_share: with a recall target, a search whose nprobe would scan more than this share of
        the lists runs the exact search instead, which is cheaper there (1: never).
    """

    size: int
    key_dim: int
    k: int = 256
    alpha: float = 0.1
    age_noise: float = 8.0
    seed: int = 0
    chunk_size: int | None = None
    key_dtype: str = "float32"
    key_fit_after: float = 0.5
    key_refit_every: float = 1.0
    ivf_lists: int = 0
    ivf_probe: int = 32
    ivf_train_after: float = 0.5
    ivf_retrain_every: float = 1.0
    ivf_check_every: int = 100
    ivf_target_recall_at_1: float = 0.0
    ivf_target_recall_at_k: float = 0.0
    ivf_exact_share: float = 0.2

    def __post_init__(self) -> None:
        for name in ("size", "key_dim", "k", "seed", "chunk_size"):
            value = getattr(self, name)
            if name == "chunk_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"MemoryConfig.{name} must be an int, got {value!r}")
        for name in ("ivf_lists", "ivf_probe", "ivf_check_every"):
            value, low = getattr(self, name), 1 if name == "ivf_probe" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"MemoryConfig.{name} must be an int >= {low}, got {value!r}")
        for name in ("ivf_train_after", "ivf_retrain_every", "key_fit_after", "key_refit_every"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"MemoryConfig.{name} must be a finite number >= 0, got {value!r}")
        for name in ("ivf_target_recall_at_1", "ivf_target_recall_at_k", "ivf_exact_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"MemoryConfig.{name} must be a number in [0, 1], got {value!r}")
        if (self.ivf_target_recall_at_1 or self.ivf_target_recall_at_k) and not self.ivf_check_every:
            raise ValueError("MemoryConfig.ivf_check_every must be >= 1 with a recall target (the checks set nprobe)")
        for name in ("size", "key_dim", "k", "chunk_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"MemoryConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.size:
            raise ValueError(
                f"MemoryConfig.k={self.k} is larger than the memory (size={self.size}); "
                f"expected 1 <= k <= size"
            )
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"MemoryConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        if not (isinstance(self.age_noise, (int, float)) and math.isfinite(self.age_noise)
                and self.age_noise >= 0):
            raise ValueError(f"MemoryConfig.age_noise must be a finite number >= 0, got {self.age_noise!r}")
        if self.key_dtype not in KEY_DTYPES:
            raise ValueError(f"MemoryConfig.key_dtype must be one of {KEY_DTYPES}, got {self.key_dtype!r}")

    @property
    def inverse_temperature(self) -> float:
        """t = max(1, ln(0.2 k) / alpha): the soft output is softmax(t * similarities)."""
        return max(1.0, math.log(0.2 * self.k) / self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown MemoryConfig fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**data)
