"""`LocalMemory`: the key-value memory of Kaiser et al. (2017) in one process."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from os import PathLike
from typing import Mapping

import torch
from torch import Tensor

from distmem import rules
from distmem.backends import make_backend
from distmem.config import MemoryConfig
from distmem.validation import check_batch_fits, check_labels, check_queries, check_state

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_token = itertools.count()


@dataclass
class MemoryRead:
    """What one read returns; pass it to `write` to store the same batch.

    prediction [B] int64: V[n1], the value of the nearest neighbour (-1 if that slot is empty).
    confidence [B]: softmax weight of n1 over the k candidates, differentiable w.r.t. the query.
    loss: mean margin loss (scalar, differentiable w.r.t. the query), None for a read without labels.
    ids, sims, values [B, k]: the candidates (sorted by similarity, ties by lower slot id).
    positive, negative [B]: the slots used by the loss (-1: none), None without labels.
    query [B, d] (detached) and labels [B] (or None) as read.
    """

    prediction: Tensor
    confidence: Tensor
    loss: Tensor | None
    ids: Tensor
    sims: Tensor
    values: Tensor
    positive: Tensor | None
    negative: Tensor | None
    query: Tensor
    labels: Tensor | None
    nearest_key: Tensor  # K[n1] [B, d] float32, as it was when read
    version: tuple[int, int]  # (memory token, memory version) at read time


class LocalMemory:
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
        self.backend = make_backend(backend, device, config.chunk_size)
        self._token = next(_token)
        self._version = 0
        self.clear()

    # -- state -----------------------------------------------------------------------------------
    def clear(self) -> None:
        """Empty every slot: zero keys, value -1, age 0; forget the recent slots; step 0."""
        n, d = self.config.size, self.config.key_dim
        self.keys = torch.zeros(n, d, dtype=_DTYPES[self.config.key_dtype], device=self.device)
        self.values = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        self.last_write = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.step_count = 0
        self.recent = rules.RecentSlots(self.device)
        self._version += 1

    @property
    def ages(self) -> Tensor:
        """[N] int64: update steps since each slot was last written."""
        return self.step_count - self.last_write

    def state(self) -> dict[str, Tensor]:
        """Copies on CPU: keys [N, d], values [N], ages [N], step (0-d), recent_labels/slots [L]."""
        return {
            "keys": self.keys.cpu().clone(), "values": self.values.cpu().clone(),
            "ages": self.ages.cpu(), "step": torch.tensor(self.step_count),
            "recent_labels": self.recent.labels.cpu().clone(), "recent_slots": self.recent.slots.cpu().clone(),
        }

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Replace the whole state by `state` (as `state()` returns; step and recent optional)."""
        checked = check_state(state, self.config)
        step = int(checked["step"])
        self.keys = checked["keys"].to(self.device, _DTYPES[self.config.key_dtype]).clone()
        self.values = checked["values"].to(self.device).clone()
        self.last_write = step - checked["ages"].to(self.device)
        self.step_count = step
        self.recent = rules.RecentSlots(self.device)
        if "recent_labels" in checked:
            self.recent.set(checked["recent_labels"].to(self.device), checked["recent_slots"].to(self.device))
        self._version += 1

    def save(self, path: str | PathLike) -> None:
        """Write config and state to `path` (.parquet: Parquet, else Arrow IPC); round trip exact."""
        from distmem.storage import write_memory_file
        write_memory_file(path, self.config, self.state())

    def load(self, path: str | PathLike) -> None:
        """Load a file written by `save`; its config must match this memory's."""
        from distmem.storage import read_memory_file
        config, state = read_memory_file(path)
        if (config.size, config.key_dim) != (self.config.size, self.config.key_dim):
            raise ValueError(f"{path}: holds a memory of size={config.size}, key_dim={config.key_dim}; "
                             f"this one has size={self.config.size}, key_dim={self.config.key_dim}")
        self.load_state(state)

    @classmethod
    def from_file(cls, path: str | PathLike, backend: str = "torch",
                  device: torch.device | str | None = None) -> "LocalMemory":
        """A new memory with the config and state stored in `path`."""
        from distmem.storage import read_memory_file
        config, state = read_memory_file(path)
        memory = cls(config, backend=backend, device=device)
        memory.load_state(state)
        return memory

    # -- read / write ----------------------------------------------------------------------------
    def read(self, q: Tensor, labels: Tensor | None = None) -> MemoryRead:
        """Look up unit-norm queries q [B, d]; with labels [B] (training) also the recent-slot
        candidate and the margin loss. Changes nothing."""
        q = check_queries(q, self.config)
        if labels is not None:
            labels = check_labels(labels, q.shape[0]).to(self.device)
            check_batch_fits(q.shape[0], self.config)
        query = q.to(self.device, torch.float32)  # differentiable copy on the memory's device
        detached = query.detach()
        sims, ids = self.backend.search(self.keys, detached, self.config.k)  # (B, k)
        values = self.values[ids]
        t = self.config.inverse_temperature
        weights = torch.softmax(t * sims, dim=1)
        nearest_key = self.keys[ids[:, 0]].float()
        confidence = rules.soft_confidence(query, sims, nearest_key, self._weighted_keys(ids, weights), t)
        loss = positive = negative = None
        if labels is not None:
            pos_col, has_pos, neg_col, has_neg = rules.positive_negative(values, labels)
            positive = torch.where(has_pos, ids.gather(1, pos_col[:, None])[:, 0], -1)
            recent = self.recent.lookup(labels)  # appended candidate, only while it holds the label
            use_recent = ~has_pos & (recent >= 0) & (self.values[recent.clamp(min=0)] == labels)
            positive = torch.where(use_recent, recent, positive)
            negative = torch.where(has_neg, ids.gather(1, neg_col[:, None])[:, 0], -1)
            loss = rules.margin_loss(query, self.keys[positive.clamp(min=0)].float(), positive >= 0,
                                     self.keys[negative.clamp(min=0)].float(), has_neg, self.config.alpha)
        return MemoryRead(
            prediction=values[:, 0], confidence=confidence, loss=loss, ids=ids, sims=sims, values=values,
            positive=positive, negative=negative, query=detached, labels=labels, nearest_key=nearest_key,
            version=(self._token, self._version),
        )

    def query(self, q: Tensor) -> MemoryRead:
        """Read-only inference lookup (no labels, no loss, no recent-slot candidate)."""
        return self.read(q)

    def write(self, read: MemoryRead, labels: Tensor | None = None) -> None:
        """Store the batch of `read` with `labels` (default: the labels it was read with).

        Hits refresh their nearest slot, misses take the B oldest slots; every other slot ages by
        one. Recent slots are updated only for a training read (one made with labels).
        """
        if not isinstance(read, MemoryRead):
            raise TypeError(f"read must be the MemoryRead returned by read(), got {type(read).__name__}")
        if read.version != (self._token, self._version):
            raise ValueError("read is stale: it was not made by this memory in its current state "
                             "(the memory was written, cleared or loaded since); read again")
        batch = read.query.shape[0]
        if labels is None:
            if read.labels is None:
                raise ValueError("labels: this read was made without labels, so write() needs labels [B]")
            labels = read.labels
        labels = check_labels(labels, batch).to(self.device)
        check_batch_fits(batch, self.config, name="read.query")
        noise = None
        if self.config.age_noise > 0:
            noise = rules.age_noise(self.config.seed, self.step_count, 0, self.config.size,
                                    self.config.age_noise, self.device)
        _, oldest = rules.oldest_slots(self.ages, batch, noise)
        plan = rules.plan_writes(read.query, labels, read.ids[:, 0], read.values[:, 0], read.nearest_key, oldest)
        self.step_count += 1
        self.keys[plan.slots] = plan.keys.to(self.keys.dtype)
        self.values[plan.slots] = plan.values
        self.last_write[plan.slots] = self.step_count
        if read.labels is not None:
            self.recent.update(labels, plan.written)
        self._version += 1

    def step(self, q: Tensor, labels: Tensor) -> MemoryRead:
        """Read with labels, then write the batch: one training step of the memory."""
        if labels is None:
            raise ValueError("labels: step() needs labels [B]; use query() for inference")
        result = self.read(q, labels)
        self.write(result)
        return result

    def _weighted_keys(self, ids: Tensor, weights: Tensor) -> Tensor:
        """sum_j weights[b, j] * K[ids[b, j]] -> [B, d], without gathering [B, k, d]."""
        b, k = ids.shape
        rows = torch.arange(b, device=ids.device).repeat_interleave(k)
        matrix = torch.sparse_coo_tensor(torch.stack([rows, ids.reshape(-1)]), weights.reshape(-1),
                                         (b, self.config.size), is_coalesced=False,
                                         check_invariants=False)
        return torch.sparse.mm(matrix, self.keys.float())

    def __repr__(self) -> str:
        return (f"LocalMemory(size={self.config.size}, key_dim={self.config.key_dim}, k={self.config.k}, "
                f"backend={self.backend.name!r}, device={str(self.device)!r}, step={self.step_count})")
