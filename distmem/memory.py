"""`LocalMemory`: the key-value memory of Kaiser et al. (2017) in one process.

It is the single-process twin of `ShardedMemory`: one `MemoryShard` holding every slot, read and
written through the same merge and planning code (`distmem.merge`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from os import PathLike
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from distmem import merge, storage
from distmem.config import MemoryConfig
from distmem.merge import MemoryRead
from distmem.shard import MemoryShard

_token = itertools.count()


@runtime_checkable
class Memory(Protocol):
    """The interface of every memory (`LocalMemory`, `ShardedMemory`): what models and tasks take.

    Reads are refused by `write` once stale: after any write, `clear()`, `load_state()` or `load()`
    since the read was made.
    """

    config: MemoryConfig

    def read(self, q: Tensor, labels: Tensor | None = None, k: int | None = None) -> MemoryRead:
        """q [B, d] unit-norm; labels [B] int64 (training). Changes nothing."""

    def query(self, q: Tensor, k: int | None = None) -> MemoryRead:
        """A read without labels (inference)."""

    def write(self, read: MemoryRead, labels: Tensor | None = None) -> None:
        """Store the batch of `read` (the paper's update)."""

    def step(self, q: Tensor, labels: Tensor) -> MemoryRead:
        """read(q, labels), then write it."""

    @property
    def step_count(self) -> int:
        """Updates applied so far."""

    def state(self) -> dict[str, Tensor]:
        """keys [N, d], values [N], ages [N], step, recent_* (on the CPU)."""

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Replace the whole state."""

    def clear(self) -> None:
        """Empty every slot."""

    def save(self, path: str | PathLike) -> None:
        """Write config and state (a file, or a checkpoint folder for a sharded memory)."""

    def load(self, path: str | PathLike) -> None:
        """Load a memory file or checkpoint folder of a memory of the same size."""


def states_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Whether two memory states (as `state()` returns them) hold exactly the same tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


class MemoryBase:
    """`query` and `step` in terms of `read` and `write`, shared by `LocalMemory` and its sharded twin."""

    def read(self, q: Tensor, labels: Tensor | None = None, k: int | None = None) -> MemoryRead:
        raise NotImplementedError

    def write(self, read: MemoryRead, labels: Tensor | None = None) -> None:
        raise NotImplementedError

    def query(self, q: Tensor, k: int | None = None) -> MemoryRead:
        """Read-only inference lookup (no labels, no loss, no recent-slot candidate) of the top-k
        candidates (default: the config's k). `write(query(q, k=1), labels)` stores a batch
        exactly as after a full read (the update needs the nearest neighbour only), at the cost
        of a top-1 search."""
        return self.read(q, k=k)

    def step(self, q: Tensor, labels: Tensor) -> MemoryRead:
        """Read with labels, then write the batch: one training step of the memory (a sharded
        memory's step returns once every writer's batch of the step is applied)."""
        if labels is None:
            raise ValueError("labels: step() needs labels [B]; use query() for inference")
        result = self.read(q, labels)
        self.write(result)
        return result


class LocalMemory(MemoryBase):
    """An in-process memory: keys [N, d], values [N] (-1 = empty), ages [N], recent label -> slot.

    backend: "torch" (exact, chunked; CPU or CUDA) or "faiss" (flat inner product; CPU, or CUDA
    with the GPU build). device: where the keys live (default: CUDA if available, else CPU).
    """

    def __init__(self, config: MemoryConfig, backend: str = "torch",
                 device: torch.device | str | None = None) -> None:
        if not isinstance(config, MemoryConfig):
            raise TypeError(f"config must be a MemoryConfig, got {type(config).__name__}")
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.config = config
        self.device = device
        self.shard = MemoryShard(config, 0, config.size, backend=backend, device=device)
        self.backend = self.shard.backend
        self._token = next(_token)
        self._version = 0

    # -- state -----------------------------------------------------------------------------------
    @property
    def keys(self) -> Tensor:
        """[N, d] the live key tensor (not trained; rewritten in place by `write`)."""
        return self.shard.keys

    @property
    def values(self) -> Tensor:
        """[N] int64 the live values (-1: empty)."""
        return self.shard.values

    @property
    def step_count(self) -> int:
        """Number of updates applied so far."""
        return self.shard.step

    def clear(self) -> None:
        """Empty every slot: zero keys, value -1, age 0; forget the recent slots; step 0."""
        self.shard.clear()
        self._version += 1

    def state(self) -> dict[str, Tensor]:
        """Copies on CPU: keys [N, d], values [N], ages [N], step (0-d), recent_labels/slots/seqs [L]."""
        return self.shard.state()

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Replace the whole state by `state` (as `state()` returns; step and recent optional)."""
        self.shard.load_state(state)
        self._version += 1

    def save(self, path: str | PathLike) -> None:
        """Write config and state to `path` (.parquet: Parquet, else Arrow IPC); round trip exact."""
        storage.write_memory_file(path, self.config, self.state())

    def load(self, path: str | PathLike) -> None:
        """Load a memory file or a sharded checkpoint folder of a memory of the same size."""
        storage.read_config_for(path, self.config)
        self.load_state(storage.read_range(path, 0, self.config.size)[1])

    @classmethod
    def from_file(cls, path: str | PathLike, backend: str = "torch",
                  device: torch.device | str | None = None) -> LocalMemory:
        """A new memory with the config and state stored in `path` (file or checkpoint folder)."""
        memory = cls(storage.read_config(path), backend=backend, device=device)
        memory.load(path)
        return memory

    # -- read / write ----------------------------------------------------------------------------
    def read(self, q: Tensor, labels: Tensor | None = None, k: int | None = None) -> MemoryRead:
        """Look up unit-norm queries q [B, d]; with labels [B] (training) also the recent-slot
        candidate and the margin loss. k: candidates returned (only without labels; default: the
        config's). Changes nothing."""
        return merge.read(self.config, q, labels, lambda qq, yy, kk: [self.shard.search(qq, yy, kk)],
                          self.shard.weighted_keys, (self._token, self._version), k)

    def write(self, read: MemoryRead, labels: Tensor | None = None) -> None:
        """Store the batch of `read` with `labels` (default: the labels it was read with).

        Hits refresh their nearest slot, misses take the B oldest slots; every other slot ages by
        one. Recent slots are updated only for a training read (one made with labels).
        """
        request = merge.write_request(self.config, read, labels)
        if read.version != (self._token, self._version):
            raise ValueError("read is stale: it was not made by this memory in its current state "
                             "(the memory was written, cleared or loaded since); read again")
        step = self.shard.step
        oldest = merge.merge_oldest([self.shard.oldest(step, len(request.labels))], len(request.labels))
        (shard_write,) = merge.plan_step(step, [request], oldest, [(0, self.config.size)])
        self.shard.apply(step, shard_write)
        self._version += 1

    def __repr__(self) -> str:
        return (f"LocalMemory(size={self.config.size}, key_dim={self.config.key_dim}, k={self.config.k}, "
                f"backend={self.backend.name!r}, device={str(self.device)!r}, step={self.step_count})")
