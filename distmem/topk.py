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
    values, idx = torch.topk(scores, k, dim=1, sorted=False)
    kth = values.min(dim=1, keepdim=True).values  # [R, 1] smallest kept score
    # Rows where some equal-to-kth score was left out may have kept a higher index: redo them.
    n_tied_all = (scores == kth).sum(dim=1)
    n_tied_kept = (values == kth).sum(dim=1)
    bad = (n_tied_all != n_tied_kept).nonzero().squeeze(1)
    if bad.numel():
        s, t = scores[bad], kth[bad]
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
