"""`MemoryShard`: the slots [lo, hi) of a memory, with durable snapshots and a write log.

A plain class, used in-process by `LocalMemory` (one shard holding every slot) and wrapped by a
thin Ray actor in the sharded memory. It searches its own slots, offers its oldest slots, and
applies the writes a step assigns to it; the merging and planning are in `distmem.merge`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from distmem import rules, storage
from distmem.backends import make_backend
from distmem.config import MemoryConfig
from distmem.keycodes import KeyCodec
from distmem.rules import ShardWrite
from distmem.validation import check_state


class MemoryShard:
    """Keys [n, d], values [n], last-write steps [n] and recent slots for global slots [lo, hi).

    storage: a folder for snapshots (every `snapshot_every` steps) and the log of the writes
    since; when it holds them, the shard starts from there (crash recovery). None: in memory only.
    """

    def __init__(self, config: MemoryConfig, lo: int, hi: int, backend: str = "torch",
                 device: torch.device | str = "cpu", storage_dir: str | os.PathLike | None = None,
                 snapshot_every: int = 100) -> None:
        if not 0 <= lo < hi <= config.size:
            raise ValueError(f"shard range [{lo}, {hi}) must lie inside [0, {config.size}) and be non-empty")
        if backend == "faiss" and config.key_dtype != "float32":
            raise ValueError(f"key_dtype={config.key_dtype!r} needs backend='torch'; faiss searches float32 keys")
        self.config, self.lo, self.hi, self.n = config, lo, hi, hi - lo
        self.device = torch.device(device)
        self.codec = KeyCodec(config.key_dtype, config.key_dim, hi - lo, self.device, config.key_fit_after,
                              config.key_refit_every)
        self.backend = make_backend(backend, self.device, config.chunk_size, config, hi - lo, self.codec)
        self.storage_dir = Path(storage_dir) if storage_dir is not None else None
        self.snapshot_every = snapshot_every
        self.generation = 0  # changed by every clear / load: a read of an older generation is stale
        self.clear(persist=False)
        if self.storage_dir is not None:
            self.storage_dir.mkdir(parents=True, exist_ok=True)
            self._recover()

    # -- state -----------------------------------------------------------------------------------
    def set_generation(self, generation: int) -> None:
        """Mark the state as new (after a clear or a load), durably when the shard has storage."""
        self.generation = int(generation)
        if self.storage_dir is not None:
            tmp = self.storage_dir / "generation.tmp"
            tmp.write_text(str(self.generation))
            os.replace(tmp, self.storage_dir / "generation")

    def clear(self, persist: bool = True) -> None:
        """Empty every slot (on disk too: no snapshot and no log means an empty shard)."""
        n = self.n
        self.codec.reset()
        self.keys = self.codec.empty(n)
        self.values = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        self.last_write = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.step = 0
        self.recent = rules.RecentSlots(self.device)
        self.backend.reset(self.keys)
        if persist and self.storage_dir is not None:
            self._drop_logs()
            (self.storage_dir / "snapshot.arrow").unlink(missing_ok=True)

    def state(self, copy: bool = True) -> dict[str, Tensor]:
        """On the CPU: keys [n, d], values [n], ages [n], step, recent_labels/slots/seqs [L].
        copy=False may return views of the live tensors (for writing them out at once)."""
        keys, values = self.keys.cpu(), self.values.cpu()
        if keys.dtype == torch.int8:  # the state holds float keys; decoding makes a fresh tensor
            keys = self.codec.decode(keys)
        return {"keys": keys.clone() if copy and keys is self.keys else keys,
                "values": values.clone() if copy else values, "ages": (self.step - self.last_write).cpu(),
                "step": torch.tensor(self.step), **self.recent.state()}

    def load_state(self, state: dict[str, Tensor], persist: bool = True, copy: bool = True) -> None:
        """Replace the state of this range: keys [n, d], values [n], ages [n], step; recent_* with
        global slot ids in [lo, hi) (recent_seqs optional). copy=False adopts the given tensors
        where it can (the caller gives them up), which spares a copy of the keys."""
        checked = check_state(state, self.n, self.config.key_dim, lo=self.lo)
        step = int(checked["step"])
        keys = checked["keys"].to(self.device)
        self.codec.fit(keys)  # int8_dim: ranges fitted to the loaded keys, if enough are written
        keys = self.codec.encode(keys)
        if copy and keys is checked["keys"]:  # never alias the caller's tensor
            keys = keys.clone()
        self.keys = keys.contiguous()
        self.values = checked["values"].to(self.device).clone()
        self.last_write = step - checked["ages"].to(self.device)
        self.step = step
        self.recent = rules.RecentSlots(self.device)
        if "recent_labels" in checked:
            self.recent.set(*(checked[n].to(self.device) for n in ("recent_labels", "recent_slots", "recent_seqs")))
        self.backend.reset(self.keys)
        if persist:
            self._snapshot()

    # -- read ------------------------------------------------------------------------------------
    def search(self, queries: Tensor, labels: Tensor | None = None, k: int | None = None) -> dict[str, Tensor]:
        """Local top-k (k: default config.k) of queries [B, d] (unit-norm, float32) and the few
        keys a reader needs.

        sims / ids (global) / values [B, k_s], k_s = min(k, n); first_key [B, d] (K of the local
        top-1); step: the updates applied so far; generation (see set_generation). With labels [B]:
        pos_key / neg_key [B, d] (local first positive / negative candidate) and this shard's
        recent slot per label: recent_slot, recent_seq [B] (-1: none), recent_valid [B] (still
        holds the label), recent_key [B, d].
        """
        queries = queries.to(self.device, torch.float32)
        sims, ids = self.backend.search(self.keys, queries, min(k or self.config.k, self.n))
        values = self.values[ids]
        out = {"sims": sims, "ids": ids + self.lo, "values": values, "first_key": self._key(ids[:, 0]),
               "step": torch.tensor(self.step), "generation": torch.tensor(self.generation)}
        if labels is not None:
            labels = labels.to(self.device)
            pos_col, _, neg_col, _ = rules.positive_negative(values, labels)
            out["pos_key"] = self._key(ids.gather(1, pos_col[:, None])[:, 0])
            out["neg_key"] = self._key(ids.gather(1, neg_col[:, None])[:, 0])
            slot, seq = self.recent.lookup(labels)
            local = (slot - self.lo).clamp(min=0)
            out.update(recent_slot=slot, recent_seq=seq,
                       recent_valid=(slot >= 0) & (self.values[local] == labels), recent_key=self._key(local))
        return out

    def weighted_keys(self, ids: Tensor, weights: Tensor) -> Tensor:
        """sum_j weights[b, j] * K[ids[b, j]] over the ids [B, k] (global) inside this shard. [B, d]."""
        ids, weights = ids.to(self.device), weights.to(self.device)
        mine = (ids >= self.lo) & (ids < self.hi)
        local = torch.where(mine, ids - self.lo, 0)
        weights = torch.where(mine, weights, 0.0)
        if self.keys.dtype != torch.float32:  # small gather instead of a float copy of every key
            return (weights.unsqueeze(2) * self.codec.decode(self.keys[local])).sum(1)
        return F.embedding_bag(local, self.keys, per_sample_weights=weights.float(), mode="sum")

    def _key(self, local_ids: Tensor) -> Tensor:
        return self.codec.decode(self.keys[local_ids])

    # -- write -----------------------------------------------------------------------------------
    def oldest(self, step: int, count: int) -> tuple[Tensor, Tensor]:
        """This shard's `count` oldest slots at update `step` by age + noise, oldest first, ties by
        lower id: (scores [c] float64, global ids [c]), c = min(count, n)."""
        self._expect_step(step)
        scores, ids = rules.oldest_slots(self.last_write, self.step, min(count, self.n), self.config.age_noise,
                                         self.config.seed, self.lo)
        return scores, ids + self.lo

    def apply(self, step: int, write: ShardWrite) -> bool:
        """Apply update `step` (log first, then memory). A step already applied is skipped, so a
        retried call is harmless. Returns whether it was applied now."""
        if step < self.step:
            return False
        self._expect_step(step)
        if self.storage_dir is not None:
            storage.write_log_entry(self.storage_dir / f"log-{step:012d}.arrow", step, write)
        self._apply(step, write)
        if self.storage_dir is not None and self.step % self.snapshot_every == 0:
            self._snapshot()
        return True

    def _apply(self, step: int, write: ShardWrite) -> None:
        local = write.slots.to(self.device) - self.lo
        self.keys[local] = self.codec.encode(write.keys.to(self.device))
        if self.codec.wrote(local.numel()):  # int8_dim: new ranges re-encode every key: the index restarts
            self.codec.refit(self.keys)
            self.backend.reset(self.keys, rewritten=local.numel())
        else:
            self.backend.update(self.keys, local)
        self.values[local] = write.values.to(self.device)
        self.step = step + 1
        self.last_write[local] = self.step
        if write.recent_labels.numel():
            self.recent.update(write.recent_labels.to(self.device), write.recent_slots.to(self.device),
                               write.recent_seqs.to(self.device))

    def _expect_step(self, step: int) -> None:
        if step != self.step:
            raise ValueError(f"step: shard [{self.lo}, {self.hi}) is at update {self.step}, got {step}")

    # -- durability ------------------------------------------------------------------------------
    def _snapshot(self) -> None:
        if self.storage_dir is None:
            return
        storage.write_memory_file(self.storage_dir / "snapshot.arrow", self.config, self.state(copy=False),
                                  lo=self.lo)
        self._drop_logs()

    def _drop_logs(self) -> None:
        for log in self.storage_dir.glob("log-*.arrow"):
            log.unlink()

    def _recover(self) -> None:
        """Latest snapshot (none: empty), then the logged steps that follow it, in order."""
        if (self.storage_dir / "generation").exists():
            self.generation = int((self.storage_dir / "generation").read_text())
        snapshot = self.storage_dir / "snapshot.arrow"
        if snapshot.exists():
            _, state, _ = storage.read_memory_file(snapshot)
            self.load_state(state, persist=False, copy=False)
        for log in sorted(self.storage_dir.glob("log-*.arrow")):
            step, write = storage.read_log_entry(log)
            if step == self.step:
                self._apply(step, write)
