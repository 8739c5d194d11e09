"""How a memory stores its keys: float32, 16-bit floats, or 8-bit codes (scalar quantised).

Keys are unit vectors, so every component lies in [-1, 1]; an 8-bit key stores round(127 x) per
component (one fixed scale: a rewritten slot needs no statistics of the others), a quarter of
float32's bytes, with an error of at most 1/254 per component. The memory's rules see the
decoded float32 keys; only the storage (and the search's reads) change.
"""

from __future__ import annotations

import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
INT8_SCALE = 127.0


def encode(keys: Tensor, dtype: torch.dtype) -> Tensor:
    """Float keys [..., d] -> stored keys of `dtype` (int8: the codes round(127 x))."""
    if dtype == torch.int8:
        return torch.round(keys.float().clamp(-1.0, 1.0) * INT8_SCALE).to(torch.int8)
    return keys.to(dtype)


def decode(stored: Tensor) -> Tensor:
    """Stored keys [..., d] -> float32 keys."""
    if stored.dtype == torch.int8:
        return stored.float() / INT8_SCALE
    return stored.float()
