"""`MemoryLayer`: the trainable query projection a network puts in front of a memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from distmem.memory import Memory, MemoryRead


class MemoryLayer(nn.Module):
    """W_q [d, d] (no bias, init N(0, 0.01^2)) then L2 normalisation, then a memory read.

    The memory is passed to `forward`, not owned, so it stays out of the module's state_dict
    (and one memory can serve several layers or data-parallel replicas).
    """

    def __init__(self, key_dim: int) -> None:
        super().__init__()
        if isinstance(key_dim, bool) or not isinstance(key_dim, int) or key_dim < 1:
            raise ValueError(f"key_dim: expected an int >= 1 (the memory's key size), got {key_dim!r}")
        self.key_dim = key_dim
        self.query_proj = nn.Linear(key_dim, key_dim, bias=False)
        nn.init.normal_(self.query_proj.weight, std=0.01)

    def query(self, x: Tensor) -> Tensor:
        """x [B, d] -> unit-norm queries [B, d]."""
        return F.normalize(self.query_proj(x), dim=-1)

    def forward(self, x: Tensor, memory: Memory, labels: Tensor | None = None) -> MemoryRead:
        """x [B, d]; labels [B] in training. Returns the read (prediction, confidence, loss);
        call `memory.write(read)` when the batch should be stored."""
        return memory.read(self.query(x), labels)
