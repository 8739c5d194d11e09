"""How a memory stores its keys: float32, 16-bit floats, or 8-bit codes (scalar quantised).

Keys are unit vectors, so every component lies in [-1, 1]. Two 8-bit formats, a quarter of
float32's bytes:

- "int8": round(127 x) per component, one fixed scale (a rewritten slot needs no statistics of
  the others), an error of at most 1/254 per component. Right for keys spread over the sphere.
- "int8_dim": per-dimension ranges fitted to the shard's written keys (`KeyCodec.fit`): a
  component is offset_j + step_j x c with c in -127..127 and step_j = range_j / 254. Trained keys
  sit in a narrow cone, where the fixed scale's error is the size of the gaps between neighbours;
  their per-dimension ranges are a few times narrower. Empty slots hold the code -128 (they decode
  to exactly 0, as an empty float key is). Until the first fit the ranges are [-1, 1].

The memory's rules see the decoded float32 keys; only the storage (and the search's reads) change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
          "int8_dim": torch.int8}
INT8_SCALE = 127.0
EMPTY = -128  # int8_dim: every code of an empty slot (a written key's codes lie in -127..127)
RANGE_MARGIN = 1 / 16  # int8_dim: fitted ranges widened by this share on each side, for keys still drifting


BLOCK = 1 << 18  # rows encoded at a time: no float temporaries the size of a whole memory


def encode(keys: Tensor, dtype: torch.dtype) -> Tensor:
    """Float keys [..., d] -> stored keys of `dtype` (int8: the codes round(127 x))."""
    if dtype != torch.int8:
        return keys.to(dtype)
    flat = keys.reshape(-1, keys.shape[-1]) if keys.dim() else keys.reshape(1)
    out = torch.empty(flat.shape, dtype=torch.int8, device=keys.device)
    for start in range(0, len(flat), BLOCK):
        block = flat[start:start + BLOCK].float().clamp(-1.0, 1.0)  # a fresh tensor: scaled in place
        out[start:start + BLOCK] = block.mul_(INT8_SCALE).round_().to(torch.int8)
    return out.reshape(keys.shape)


def decode(stored: Tensor) -> Tensor:
    """Stored keys [..., d] -> float32 keys."""
    if stored.dtype == torch.int8:
        # float() copies, so scaling in place spares a second copy; a product with the reciprocal,
        # which is what a GPU computes for a division by a number, so both devices decode alike
        return stored.float().mul_(1 / INT8_SCALE)
    return stored.float()


class KeyCodec:
    """One shard's key format: `encode` / `decode` between float keys [..., d] and stored keys, and
    for "int8_dim" the per-dimension ranges (offset [d], step [d]), fitted by `fit` / `refit` on the
    schedule of `wrote` (config.key_fit_after, key_refit_every; x the shard's slots n)."""

    def __init__(self, key_dtype: str, dim: int, n: int, device: torch.device | str,
                 fit_after: float = 0.5, refit_every: float = 1.0) -> None:
        self.key_dtype, self.dtype = key_dtype, DTYPES[key_dtype]
        self.ranged = key_dtype == "int8_dim"
        self.dim, self.device = dim, device
        self.fit_after = max(1, math.ceil(fit_after * n))  # rounded as the ivf's training schedule is,
        self.refit_every = math.ceil(refit_every * n)      # so that with equal settings they share a rebuild
        self.reset()

    def reset(self) -> None:
        """The keys were emptied: ranges [-1, 1] until the first fit."""
        self.offset = torch.zeros(self.dim, device=self.device)
        self.step = torch.full((self.dim,), 1 / INT8_SCALE, device=self.device)
        self.fits = 0
        self.writes = 0  # slot writes since the last fit (or since the keys were replaced)

    def empty(self, n: int) -> Tensor:
        """Stored keys [n, d] of n empty slots."""
        return torch.full((n, self.dim), EMPTY if self.ranged else 0, dtype=self.dtype, device=self.device)

    def written(self, stored: Tensor) -> Tensor:
        """Which rows of stored keys [n, d] hold a key: bool [n]."""
        return (stored != (EMPTY if self.ranged else 0)).any(-1)

    def encode(self, keys: Tensor) -> Tensor:
        """Float keys [..., d] -> stored keys (an all-zero row, an empty slot's key, stays empty)."""
        if not self.ranged:
            return encode(keys, self.dtype)
        return self._encode(keys, self.offset, self.step)

    def decode(self, stored: Tensor) -> Tensor:
        """Stored keys [..., d] -> float32 keys."""
        if not self.ranged:
            return decode(stored)
        return self._decode(stored, self.offset, self.step)

    # -- int8_dim: the ranges ----------------------------------------------------------------------
    def wrote(self, count: int) -> bool:
        """Count `count` slot writes; True when a (re)fit of the ranges is due (then call refit)."""
        self.writes += count
        due = self.fit_after if not self.fits else self.refit_every
        return self.ranged and bool(due) and self.writes >= due

    def fit(self, keys: Tensor) -> None:
        """The keys were replaced by float keys [n, d] (a loaded state): ranges fitted to them if
        enough rows are written, else [-1, 1] with the written rows counted towards the first fit."""
        self.reset()
        if not self.ranged:
            return
        blocks = [keys[start:start + BLOCK] for start in range(0, len(keys), BLOCK)]  # views
        self.writes = sum(int((block != 0).any(1).sum()) for block in blocks)
        if self.writes >= self.fit_after:
            self._set_ranges(*_bounds(blocks))

    def refit(self, stored: Tensor) -> Tensor:
        """New ranges from the written keys of stored [n, d]; returns them re-encoded (in place)."""
        old_offset, old_step = self.offset.clone(), self.step.clone()
        blocks = (self._decode(stored[start:start + BLOCK], old_offset, old_step)
                  for start in range(0, len(stored), BLOCK))
        self._set_ranges(*_bounds(blocks))
        for start in range(0, len(stored), BLOCK):
            block = stored[start:start + BLOCK]
            block.copy_(self._encode(self._decode(block, old_offset, old_step), self.offset, self.step))
        return stored

    def _set_ranges(self, lo: Tensor | None, hi: Tensor | None) -> None:
        self.writes = 0
        if lo is None:  # nothing written: the ranges stay
            return
        lo, hi = lo.cpu(), hi.cpu()  # a GPU divides by 254 as a product with its reciprocal: other ranges
        pad = RANGE_MARGIN * (hi - lo)
        lo, hi = (lo - pad).clamp(min=-1.0), (hi + pad).clamp(max=1.0)
        self.step = ((hi - lo) / 254).clamp(min=1e-6).to(self.device)  # a constant dimension still gets a step
        self.offset = ((lo + hi) / 2).to(self.device)
        self.fits += 1

    @staticmethod
    def _encode(keys: Tensor, offset: Tensor, step: Tensor) -> Tensor:
        flat = keys.reshape(-1, keys.shape[-1])
        out = torch.empty(flat.shape, dtype=torch.int8, device=keys.device)
        for start in range(0, len(flat), BLOCK):
            block = flat[start:start + BLOCK].float()
            codes = ((block - offset) / step).round_().clamp_(-127, 127).to(torch.int8)
            out[start:start + BLOCK] = torch.where((block == 0).all(1, keepdim=True), EMPTY, codes)
        return out.reshape(keys.shape)

    @staticmethod
    def _decode(stored: Tensor, offset: Tensor, step: Tensor) -> Tensor:
        return torch.where(stored == EMPTY, 0.0, stored.float() * step + offset)


def _bounds(blocks: Iterable[Tensor]) -> tuple[Tensor | None, Tensor | None]:
    """Per-dimension min and max [d] over the written (non-zero) rows of float blocks [m, d]
    (None: no row written)."""
    lo = hi = None
    for block in blocks:
        block = block[(block != 0).any(1)]
        if len(block):
            b_lo, b_hi = block.amin(0), block.amax(0)
            lo = b_lo if lo is None else torch.minimum(lo, b_lo)
            hi = b_hi if hi is None else torch.maximum(hi, b_hi)
    return lo, hi
