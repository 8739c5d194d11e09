"""Checks on what callers hand the memory. Each error names the argument and what was expected;
they run before any state changes, so a rejected call leaves the memory as it was."""

from __future__ import annotations

import torch
from torch import Tensor

from distmem.config import MemoryConfig
from distmem.rules import write_seq


def check_queries(q: object, config: MemoryConfig, name: str = "q") -> Tensor:
    """q: unit-norm, finite float tensor [B, key_dim] with B >= 1."""
    if not isinstance(q, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, {config.key_dim}], got {type(q).__name__}")
    if not q.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {q.dtype}")
    if q.dim() != 2 or q.shape[1] != config.key_dim or q.shape[0] < 1:
        raise ValueError(f"{name} must have shape [B, {config.key_dim}] with B >= 1, got {list(q.shape)}")
    with torch.no_grad():
        if not torch.isfinite(q).all():
            raise ValueError(f"{name} must be finite; it holds NaN or inf")
        norms = q.float().norm(dim=1)
        tol = 1e-3 if q.dtype in (torch.float32, torch.float64) else 1e-2
        worst = (norms - 1).abs().max().item()
        if worst > tol:
            raise ValueError(f"{name} rows must be unit-norm (L2 normalise the queries); "
                             f"largest | ||q|| - 1 | is {worst:.3g}")
    return q


def check_labels(labels: object, batch: int, name: str = "labels") -> Tensor:
    """labels: int64 tensor [batch] of non-negative ids."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 of shape [{batch}], got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype torch.int64, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{name} must have shape [{batch}] (one per query), got {list(labels.shape)}")
    if batch and labels.min().item() < 0:
        raise ValueError(f"{name} must be >= 0 (-1 marks an empty slot), got {labels.min().item()}")
    return labels


def check_k(k: object, config: MemoryConfig, labels: object) -> int:
    """k: the candidates a read returns, an int in [1, config.k]; None: config.k. A read with
    labels always uses config.k (its loss and recent slot are defined over those)."""
    if k is None:
        return config.k
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int in [1, {config.k}] or None, got {type(k).__name__}")
    if not 1 <= k <= config.k:
        raise ValueError(f"k must be in [1, {config.k}] (the config's k), got {k}")
    if labels is not None and k != config.k:
        raise ValueError(f"k: a read with labels uses the config's k = {config.k} candidates (the loss depends "
                         f"on them); pass a smaller k only to a read without labels, got k={k}")
    return k


def check_batch_fits(batch: int, config: MemoryConfig, name: str = "q") -> None:
    if batch > config.size:
        raise ValueError(f"{name} has a batch of {batch} but the memory has {config.size} slots; "
                         f"a write needs batch <= size")


def check_state(state: object, n: int, d: int, lo: int = 0) -> dict[str, Tensor]:
    """A mapping with "keys" [n, d] float, "values" [n] int64 >= -1, "ages" [n] int64 >= 0, and
    optionally "step" (int) and "recent_labels"/"recent_slots"(/"recent_seqs") [L] int64, the
    slots being global ids in [lo, lo + n). Missing recent_seqs get the default order."""
    if not hasattr(state, "keys") or not hasattr(state, "__getitem__"):
        raise TypeError(f"state must be a mapping, got {type(state).__name__}")
    out: dict[str, Tensor] = {}
    for name in ("keys", "values", "ages"):
        if name not in state:
            raise ValueError(f"state is missing {name!r}; expected keys, values and ages")
        if not isinstance(state[name], Tensor):
            raise TypeError(f"state[{name!r}] must be a torch.Tensor, got {type(state[name]).__name__}")
    keys, values, ages = state["keys"], state["values"], state["ages"]
    if not keys.is_floating_point() or list(keys.shape) != [n, d]:
        raise ValueError(f"state['keys'] must be a float tensor [{n}, {d}], got {keys.dtype} {list(keys.shape)}")
    # in blocks: no temporaries the size of a whole memory
    if not all(torch.isfinite(keys[i:i + (1 << 18)]).all() for i in range(0, n, 1 << 18)):
        raise ValueError("state['keys'] must be finite")
    for name, tensor, low in (("values", values, -1), ("ages", ages, 0)):
        if tensor.dtype != torch.int64 or list(tensor.shape) != [n]:
            raise ValueError(f"state[{name!r}] must be an int64 tensor [{n}], got {tensor.dtype} {list(tensor.shape)}")
        if tensor.min().item() < low:
            raise ValueError(f"state[{name!r}] must be >= {low}")
    out.update(keys=keys, values=values, ages=ages)
    step = state["step"] if "step" in state else 0
    step = int(step.item()) if isinstance(step, Tensor) else step
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"state['step'] must be an int >= 0, got {step!r}")
    out["step"] = torch.tensor(step)
    has = ("recent_labels" in state, "recent_slots" in state)
    if any(has):
        if not all(has):
            raise ValueError("state must hold both 'recent_labels' and 'recent_slots', or neither")
        rl, rs = state["recent_labels"], state["recent_slots"]
        if (not isinstance(rl, Tensor) or not isinstance(rs, Tensor) or rl.dtype != torch.int64
                or rs.dtype != torch.int64 or rl.dim() != 1 or rl.shape != rs.shape):
            raise ValueError("state['recent_labels'] and state['recent_slots'] must be int64 tensors [L]")
        if rl.numel() and (rl.min() < 0 or rs.min() < lo or rs.max() >= lo + n
                           or rl.unique().numel() != rl.numel()):
            raise ValueError(f"state['recent_labels'] must be distinct ids >= 0 and "
                             f"state['recent_slots'] slot ids in [{lo}, {lo + n})")
        out.update(recent_labels=rl, recent_slots=rs)
        if "recent_seqs" in state:
            seqs = state["recent_seqs"]
            if not isinstance(seqs, Tensor) or seqs.dtype != torch.int64 or seqs.shape != rl.shape:
                raise ValueError("state['recent_seqs'] must be an int64 tensor shaped like state['recent_labels']")
        else:  # no order known: as if written at the last step, in slot order
            seqs = write_seq(max(step - 1, 0), torch.argsort(torch.argsort(rs)))
        out["recent_seqs"] = seqs
    return out
