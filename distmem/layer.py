"""`MemoryLayer`: the trainable query projection a network puts in front of a memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from distmem.config import MemoryConfig

if TYPE_CHECKING:
    from distmem.memory import LocalMemory, MemoryRead


class MemoryLayer(nn.Module):
    """W_q [d, d] (no bias, init N(0, 0.01^2)) then L2 normalisation, then a memory read.

    The memory is passed to `forward`, not owned, so it stays out of the module's state_dict
    (and one memory can serve several layers or data-parallel replicas).
    """

    def __init__(self, config: MemoryConfig) -> None:
        super().__init__()
        self.config = config
        self.query_proj = nn.Linear(config.key_dim, config.key_dim, bias=False)
        nn.init.normal_(self.query_proj.weight, std=0.01)

    def query(self, x: Tensor) -> Tensor:
        """x [B, d] -> unit-norm queries [B, d]."""
        return F.normalize(self.query_proj(x), dim=-1)

    def forward(self, x: Tensor, memory: "LocalMemory", labels: Tensor | None = None) -> "MemoryRead":
        """x [B, d]; labels [B] in training. Returns the read (prediction, confidence, loss);
        call `memory.write(read)` when the batch should be stored."""
        return memory.read(self.query(x), labels)
