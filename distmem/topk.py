"""Exact top-k with a deterministic order: by score (descending), ties by the lower index.

torch.topk and faiss do not promise which of several equal scores they keep, yet the memory's
semantics (candidates, oldest slots) break ties by the lower slot id. These helpers make any
top-k exact under that rule; they are shared by every backend and by the sharded merge.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sort_by_score_then_id(scores: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by score descending, ties by id ascending. scores, ids: [R, m]."""
    order = torch.argsort(ids, dim=1)
    scores, ids = scores.gather(1, order), ids.gather(1, order)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return scores.gather(1, order), ids.gather(1, order)


def ordered_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of each row of `scores` [R, C] (k <= C), ties by the lower column index.

    Returns (values [R, k], indices [R, k] int64), each row sorted by (value desc, index asc).
    """
    R, C = scores.shape
    if k == C:
        return sort_by_score_then_id(scores, torch.arange(C, device=scores.device).expand(R, C))
    # one more than asked: where the (k+1)-th score is below the k-th, every score equal to the k-th
    # was kept, so only rows with a tie at the boundary need a pass over the whole row
    values, idx = torch.topk(scores, k + 1, dim=1, sorted=False)
    two, at = torch.topk(values, 2, dim=1, largest=False)  # [R, 2]: the (k+1)-th and k-th scores, and where
    keep = torch.ones_like(values, dtype=torch.bool).scatter_(1, at[:, :1], False)
    values, idx = values[keep].view(R, k), idx[keep].view(R, k)
    bad = (two[:, 0] == two[:, 1]).nonzero().squeeze(1)
    if bad.numel():
        s, t = scores[bad], two[bad, 1:]
        above, tied = s > t, s == t
        room = k - above.sum(dim=1, keepdim=True)
        take = above | (tied & (tied.cumsum(dim=1) <= room))
        fixed = take.nonzero()[:, 1].view(-1, k)  # ascending column index per row
        idx[bad] = fixed
        values[bad] = s.gather(1, fixed)
    return sort_by_score_then_id(values, idx)


def merge_topk(scores: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of concatenated candidate lists `scores`, `ids` [R, m] (m >= k), ties by lower id.

    Precondition: among equal scores, ids ascend with position, as in the concatenation of
    per-range top-k lists in range order (chunks of one search, shards of a sharded memory); every
    true top-k element must be among the inputs. One stable sort then keeps the tie rule.
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), ids.gather(1, order)
