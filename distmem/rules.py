"""The memory's rules (`shared/docs/memory-module.md`) as pure tensor functions.

Shared by `LocalMemory` and the sharded memory, so both implement one semantics. Nothing here
holds state except `RecentSlots`, the label -> slot table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distmem.topk import ordered_topk

_MASK32 = 0xFFFFFFFF


def _fmix32(x: Tensor | int) -> Tensor | int:
    """murmur3's 32-bit finaliser; works on Python ints and on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def age_noise(seed: int, step: int, start: int, count: int, width: float,
              device: torch.device | str = "cpu") -> Tensor:
    """Uniform noise in [-width, width] for slots start..start+count-1 at update `step`. [count] float64.

    A counter-based generator: the noise of a slot depends only on (seed, step, slot id), so a
    memory split over any number of shards draws exactly the noise of one local memory.
    """
    slots = torch.arange(start, start + count, dtype=torch.int64, device=device)
    return age_noise_of(seed, step, slots, width)


def age_noise_of(seed: int, step: int, slots: Tensor, width: float) -> Tensor:
    """`age_noise` of the given slot ids [m] (int64). [m] float64."""
    seed_mix = _fmix32(seed & _MASK32) ^ (((seed >> 32) * 0x9E3779B1) & _MASK32)
    key = _fmix32(seed_mix ^ ((step * 0x632BE5AB) & _MASK32))
    h = (((slots & _MASK32) ^ key) * 0x27D4EB2F) & _MASK32
    h = _fmix32(h ^ (slots >> 32))
    h = _fmix32((h + key) & _MASK32)
    unit = h.double() / float(1 << 32)  # [0, 1)
    return (2.0 * unit - 1.0) * width


def oldest_slots(last_write: Tensor, step: int, count: int, width: float = 0.0, seed: int = 0,
                 first_id: int = 0) -> tuple[Tensor, Tensor]:
    """The `count` oldest slots by age + noise, oldest first, ties by lower slot id.

    last_write [N] int64: the step of each slot's last write, so its age is step - last_write; the
    noise is `age_noise(seed, step, ...)` of slot id first_id + i, width `width`. Returns (scores
    [count] float64, slot ids [count], 0-based), 0 <= count <= N.

    Only slots that can win are scored: with noise in [-width, width), a slot more than 2 width
    younger than the count-th oldest scores below count others, so an O(N) count of the write
    steps replaces hashing and ranking every slot (at 16M slots: 2 s a step).
    """
    if count == 0:
        return torch.zeros(0, dtype=torch.float64, device=last_write.device), last_write.new_zeros(0)
    low, high = int(last_write.min()), int(last_write.max())
    if high - low <= 4 * len(last_write):  # a histogram of the write steps finds it fastest
        counts = torch.bincount(last_write - low if low else last_write, minlength=1)
        kth = low + int(torch.searchsorted(counts.cumsum(0), count))
    else:  # ages loaded from a file may span any range
        kth = int(torch.kthvalue(last_write.cpu(), count).values)
    cand = torch.nonzero(last_write <= kth + math.floor(2 * width)).squeeze(1)  # ascending ids
    score = (step - last_write[cand]).double()
    if width > 0:
        score = score + age_noise_of(seed, step, cand + first_id, width)
    scores, pos = ordered_topk(score.unsqueeze(0), count)
    return scores[0], cand[pos[0]]


def positive_negative(cand_values: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """First candidate column whose value equals / differs from the label.

    cand_values [B, m], labels [B]. Returns (pos_col, has_pos, neg_col, has_neg), each [B].
    """
    same = cand_values == labels.unsqueeze(1)
    has_pos, has_neg = same.any(dim=1), (~same).any(dim=1)
    # argmax returns the first maximal entry
    return same.byte().argmax(dim=1), has_pos, (~same).byte().argmax(dim=1), has_neg


def margin_loss(query: Tensor, pos_keys: Tensor, has_pos: Tensor, neg_keys: Tensor,
                has_neg: Tensor, alpha: float) -> Tensor:
    """Mean over b of max(0, q.K[n] - q.K[p] + alpha); q.K[p] = 0 without a positive, 0 without a
    negative. query [B, d] (differentiable), keys [B, d] (constants). Returns a scalar."""
    pos_sim = torch.where(has_pos, (query * pos_keys).sum(dim=1), torch.zeros_like(query[:, 0]))
    neg_sim = (query * neg_keys).sum(dim=1)
    per_example = torch.where(has_neg, F.relu(neg_sim - pos_sim + alpha), torch.zeros_like(pos_sim))
    return per_example.mean()


def soft_confidence(query: Tensor, sims: Tensor, nearest_key: Tensor, mean_key: Tensor,
                    temperature: float) -> Tensor:
    """Softmax weight of the nearest neighbour, softmax(t * sims)[:, 0], differentiable in `query`.

    The value comes from the search's similarities; the gradient is the exact one,
    t * w0 * (K[n1] - sum_j w_j K[c_j]), so the k candidate keys are never gathered on the caller.
    query [B, d], sims [B, k], nearest_key / mean_key [B, d] (mean_key = sum_j w_j K[c_j]).
    """
    w0 = torch.softmax(temperature * sims, dim=1)[:, 0]
    direction = ((query - query.detach()) * (nearest_key - mean_key)).sum(dim=1)  # value 0
    return w0 + w0 * temperature * direction


@dataclass
class WritePlan:
    """Where one batch writes: unique slots [U] with their final keys [U, d] and values [U], and
    the slot each example wrote [B] (before later examples overwrote it)."""

    slots: Tensor
    keys: Tensor
    values: Tensor
    written: Tensor


def plan_writes(query: Tensor, labels: Tensor, nearest: Tensor, nearest_values: Tensor,
                nearest_keys: Tensor, oldest: Tensor) -> WritePlan:
    """The paper's update for one batch, decided on the memory as it was before the batch.

    Hit (V[n1] == y): n1 gets normalize(q + K[n1]). Miss: example b takes oldest[b], key q.
    Batch order: when two examples write one slot, the later one wins.
    query, nearest_keys [B, d]; labels, nearest, nearest_values, oldest [B].
    """
    hit = nearest_values == labels
    written = torch.where(hit, nearest, oldest)
    new_keys = torch.where(hit.unsqueeze(1), F.normalize(query + nearest_keys, dim=1), query)
    slots, inverse = torch.unique(written, return_inverse=True)
    position = torch.arange(len(written), device=written.device)
    last = torch.zeros(len(slots), dtype=torch.int64, device=written.device)
    last.scatter_reduce_(0, inverse, position, reduce="amax", include_self=False)
    return WritePlan(slots=slots, keys=new_keys[last], values=labels[last], written=written)


@dataclass
class ShardWrite:
    """The part of one step's writes that lands in one shard: final keys [U, d] and values [U]
    of global slots [U], and the recent-slot updates (labels, global slots, seqs) [R]."""

    slots: Tensor
    keys: Tensor
    values: Tensor
    recent_labels: Tensor
    recent_slots: Tensor
    recent_seqs: Tensor


class RecentSlots:
    """R: label -> the slot most recently written for it in training, with the write's sequence
    number (step << 32 | position in the step's batch), so that per-shard tables combine into the
    global one by taking the largest sequence number. Sorted int64 tensors."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        self.labels, self.slots, self.seqs = empty, empty.clone(), empty.clone()

    def lookup(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(slot, seq) of each label [B]; -1 where the label has none."""
        missing = torch.full_like(labels, -1)
        if self.labels.numel() == 0:
            return missing, missing.clone()
        pos = torch.searchsorted(self.labels, labels).clamp(max=len(self.labels) - 1)
        found = self.labels[pos] == labels
        return torch.where(found, self.slots[pos], missing), torch.where(found, self.seqs[pos], missing)

    def update(self, labels: Tensor, slots: Tensor, seqs: Tensor) -> None:
        """Set R[labels[b]] = slots[b] where seqs[b] is the newest for that label."""
        all_labels = torch.cat([self.labels, labels])
        all_seqs = torch.cat([self.seqs, seqs])
        uniq, inverse = torch.unique(all_labels, return_inverse=True)  # sorted
        newest = torch.full((len(uniq),), -1, dtype=torch.int64, device=uniq.device)
        newest.scatter_reduce_(0, inverse, all_seqs, reduce="amax", include_self=True)
        take = torch.zeros(len(uniq), dtype=torch.int64, device=uniq.device)
        is_newest = all_seqs == newest[inverse]
        take.scatter_reduce_(0, inverse[is_newest], torch.arange(len(all_labels), device=uniq.device)[is_newest],
                             reduce="amax", include_self=False)
        self.labels, self.slots, self.seqs = uniq, torch.cat([self.slots, slots])[take], newest

    def set(self, labels: Tensor, slots: Tensor, seqs: Tensor) -> None:
        order = torch.argsort(labels)
        self.labels, self.slots, self.seqs = labels[order].clone(), slots[order].clone(), seqs[order].clone()

    def state(self) -> dict[str, Tensor]:
        return {"recent_labels": self.labels.cpu().clone(), "recent_slots": self.slots.cpu().clone(),
                "recent_seqs": self.seqs.cpu().clone()}


def write_seq(step: int, positions: Tensor) -> Tensor:
    """Sequence number of the write at `positions` of the batch of update `step`."""
    return (step << 32) | positions
