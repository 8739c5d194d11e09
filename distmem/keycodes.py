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
        return stored.float().div_(INT8_SCALE)  # float() copies: dividing in place spares a second copy
    return stored.float()
