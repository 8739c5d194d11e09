"""The reader's and the writers' side of the memory, shared by `LocalMemory` and the sharded
memory: per-shard replies merged into one exact read, and one step's write requests (from any
number of writers, in rank order) planned into per-shard writes.

Only the math that needs gradients runs here, on the caller; shards send ids, similarities and
values for their k candidates plus a few keys per query.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from distmem import rules
from distmem.config import MemoryConfig
from distmem.rules import ShardWrite
from distmem.topk import merge_topk
from distmem.validation import check_batch_fits, check_k, check_labels, check_queries

Reply = dict[str, Tensor]


@dataclass
class MemoryRead:
    """What one read returns; pass it to the memory's `write` to store the same batch.

    prediction [B] int64: V[n1], the value of the nearest neighbour (-1 if that slot is empty).
    confidence [B]: softmax weight of n1 over the k candidates, differentiable w.r.t. the query.
    loss: mean margin loss (scalar, differentiable w.r.t. the query), None for a read without labels.
    ids, sims, values [B, k]: the candidates (sorted by similarity, ties by lower slot id); k is the
    config's, or the smaller k asked of a read without labels (confidence is then over those k).
    positive, negative [B]: the slots used by the loss (-1: none), None without labels.
    query [B, d] (detached, float32) and labels [B] (or None) as read.
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
    version: tuple  # identifies the memory state the read was made on


@dataclass
class WriteRequest:
    """One writer's part of a step: queries [B, d], labels [B], and the nearest neighbour of each
    query as read (ids, values [B], keys [B, d]). train: whether recent slots are updated."""

    query: Tensor
    labels: Tensor
    nearest: Tensor
    nearest_values: Tensor
    nearest_keys: Tensor
    train: bool


def read(config: MemoryConfig, q: Tensor, labels: Tensor | None,
         search: Callable[[Tensor, Tensor | None, int], Sequence[Reply]],
         weighted_keys: Callable[[Tensor, Tensor], Tensor], version: tuple, k: int | None = None) -> MemoryRead:
    """One read over shards of the top-k candidates (k: see `check_k`). search(queries, labels, k)
    -> the replies of every shard, in slot order;
    weighted_keys(ids, weights) -> sum over shards of sum_j weights * K[ids] [B, d], called only
    when q requires a gradient (for the confidence's)."""
    q = check_queries(q, config)
    k = check_k(k, config, labels)
    if labels is not None:
        labels = check_labels(labels, q.shape[0])
        check_batch_fits(q.shape[0], config)
    replies = search(q.detach().float(), labels, k)
    device = replies[0]["sims"].device  # merge where the shards answered (CPU for remote shards)
    query = q.float().to(device)  # differentiable
    labels = labels.to(device) if labels is not None else None
    b = q.shape[0]
    rows = torch.arange(b, device=device)
    shard_of = torch.cat([torch.full_like(r["ids"], i) for i, r in enumerate(replies)], 1)
    positions = torch.arange(shard_of.shape[1], device=device).expand(b, -1)
    sims, order = merge_topk(torch.cat([r["sims"] for r in replies], 1), positions, k)
    ids = torch.cat([r["ids"] for r in replies], 1).gather(1, order)
    values = torch.cat([r["values"] for r in replies], 1).gather(1, order)
    shard_of = shard_of.gather(1, order)

    def key_of(name: str, shard: Tensor) -> Tensor:  # [B, d]: replies[shard[b]][name][b]
        return torch.stack([r[name] for r in replies])[shard, rows]

    nearest_key = key_of("first_key", shard_of[:, 0])
    t = config.inverse_temperature
    if query.requires_grad:  # the confidence's gradient needs sum_j w_j K[c_j]: one more small call
        mean_key = weighted_keys(ids, torch.softmax(t * sims, dim=1)).to(device)
    else:  # nothing to differentiate: the confidence's value needs no keys
        mean_key = nearest_key
    confidence = rules.soft_confidence(query, sims, nearest_key, mean_key, t)
    loss = positive = negative = None
    if labels is not None:
        # The first positive / negative of the global list is its shard's first local one.
        pos_col, has_pos, neg_col, has_neg = rules.positive_negative(values, labels)
        positive = torch.where(has_pos, ids.gather(1, pos_col[:, None])[:, 0], -1)
        negative = torch.where(has_neg, ids.gather(1, neg_col[:, None])[:, 0], -1)
        pos_key = key_of("pos_key", shard_of.gather(1, pos_col[:, None])[:, 0])
        neg_key = key_of("neg_key", shard_of.gather(1, neg_col[:, None])[:, 0])
        # The recent slot: the newest write for the label over all shards, if it still holds it.
        newest = torch.stack([r["recent_seq"] for r in replies]).argmax(dim=0)  # (B,) shard index
        recent = torch.stack([r["recent_slot"] for r in replies])[newest, rows]
        valid = torch.stack([r["recent_valid"] for r in replies])[newest, rows] & (recent >= 0)
        use_recent = ~has_pos & valid
        positive = torch.where(use_recent, recent, positive)
        pos_key = torch.where(use_recent[:, None], key_of("recent_key", newest), pos_key)
        loss = rules.margin_loss(query, pos_key, positive >= 0, neg_key, has_neg, config.alpha)
    return MemoryRead(prediction=values[:, 0], confidence=confidence, loss=loss, ids=ids, sims=sims,
                      values=values, positive=positive, negative=negative, query=query.detach(),
                      labels=labels, nearest_key=nearest_key, version=version)


def write_request(config: MemoryConfig, read_: MemoryRead, labels: Tensor | None) -> WriteRequest:
    """Check a write of `read_` with `labels` (default: the labels it was read with)."""
    if not isinstance(read_, MemoryRead):
        raise TypeError(f"read must be the MemoryRead returned by read(), got {type(read_).__name__}")
    batch = read_.query.shape[0]
    if labels is None:
        if read_.labels is None:
            raise ValueError("labels: this read was made without labels, so write() needs labels [B]")
        labels = read_.labels
    labels = check_labels(labels, batch).to(read_.query.device)
    check_batch_fits(batch, config, name="read.query")
    return WriteRequest(query=read_.query, labels=labels, nearest=read_.ids[:, 0],
                        nearest_values=read_.values[:, 0], nearest_keys=read_.nearest_key,
                        train=read_.labels is not None)


def merge_oldest(offers: Sequence[tuple[Tensor, Tensor]], count: int) -> Tensor:
    """The `count` globally oldest slots from each shard's own oldest (scores, ids), in slot order."""
    scores = torch.cat([o[0] for o in offers]).unsqueeze(0)
    ids = torch.cat([o[1] for o in offers]).unsqueeze(0)
    return merge_topk(scores, ids, count)[1][0]


def plan_step(step: int, requests: Sequence[WriteRequest], oldest: Tensor,
              ranges: Sequence[tuple[int, int]]) -> list[ShardWrite]:
    """One update from the writers' requests, concatenated in rank order, split by shard range."""
    cat = lambda name: torch.cat([getattr(r, name) for r in requests])  # noqa: E731
    labels = cat("labels")
    plan = rules.plan_writes(cat("query"), labels, cat("nearest"), cat("nearest_values"), cat("nearest_keys"),
                             oldest)
    train = torch.cat([torch.full((len(r.labels),), r.train, device=labels.device) for r in requests])
    seqs = rules.write_seq(step, torch.arange(len(labels), device=labels.device))
    writes = []
    for lo, hi in ranges:
        mine = (plan.slots >= lo) & (plan.slots < hi)
        recent = train & (plan.written >= lo) & (plan.written < hi)
        writes.append(ShardWrite(slots=plan.slots[mine], keys=plan.keys[mine], values=plan.values[mine],
                                 recent_labels=labels[recent], recent_slots=plan.written[recent],
                                 recent_seqs=seqs[recent]))
    return writes
