"""Exact k-NN backends over the memory's own key tensor.

A backend is stateless with respect to the keys: the memory owns one key tensor, rewrites its
rows in place every step, and passes it to `search`. So every backend is always up to date, and
no index has to be rebuilt (faiss flat indexes cannot overwrite a vector in place; the faiss
backend therefore runs faiss's brute-force kernels directly on the memory's tensor).

Both backends return exactly the same candidates: top-k by inner product, sorted, ties by the
lower slot id.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from distmem.config import MemoryConfig
from distmem.keycodes import KeyCodec, decode
from distmem.topk import merge_topk, ordered_topk, sort_by_score_then_id

BACKENDS = ("torch", "faiss", "ivf")


class BackendUnavailableError(ImportError, ValueError):
    """A backend's package is not installed (an ImportError and a ValueError)."""


class KnnBackend(Protocol):
    name: str

    def reset(self, keys: Tensor, rewritten: int = 0) -> None:
        """The memory's key tensor [N, d] was replaced (cleared, loaded, re-encoded by a step that
        rewrote `rewritten` rows). Exact backends: nothing."""
        ...

    def update(self, keys: Tensor, local: Tensor) -> None:
        """Rows local [m] of keys [N, d] were rewritten in place. Exact backends: nothing."""
        ...

    def stats(self) -> dict:
        """The backend's name and what it keeps (the approximate one: its recall over the run)."""
        ...

    def search(self, keys: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exact top-k inner products. keys [N, d], queries [B, d] on the keys' device.

        Returns (sims [B, k] float32, ids [B, k] int64), rows sorted by sim desc, ties by lower id.
        """
        ...


class _Stateless:
    """An exact backend reads the keys afresh at every search: nothing to keep current."""

    def stats(self) -> dict:
        return {"name": self.name}

    def reset(self, keys: Tensor, rewritten: int = 0) -> None:
        pass

    def update(self, keys: Tensor, local: Tensor) -> None:
        pass


class TorchExactBackend(_Stateless):
    """Brute force in torch (CPU or CUDA), scored in chunks of `chunk_size` slots with a running
    top-k, so the [B, N] score matrix is never held whole.

    prune (default: on for CPU): after the first chunk, only scores above each row's running k-th
    best can enter the top-k (a later chunk's ids are higher, so a tie never enters); those are
    picked with one comparison instead of a top-k over the chunk. On CUDA a per-chunk top-k avoids
    the host synchronisation that selecting them would cost.

    At most `FEW_QUERIES` queries on the CPU (greedy decoding, one-shot inference) are scored as
    (keys @ queries^T)^T in chunks of 8192: BLAS is up to 3x faster that way round for a thin
    query matrix (4 queries over 65,536 slots: a search in 8 ms instead of 20).
    """

    name = "torch"
    FEW_QUERIES = 32

    def __init__(self, chunk_size: int | None = None, prune: bool | None = None,
                 codec: KeyCodec | None = None) -> None:
        self.chunk_size = chunk_size
        self.prune = prune
        self.decode = codec.decode if codec is not None else decode  # int8_dim keys need their ranges

    def search(self, keys: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        on_cpu = keys.device.type == "cpu"
        # compressed keys are decoded block by block and scored against the float32 queries: the
        # CPU's BLAS has no fast half-precision product (8x slower, measured), and on a GPU a query
        # rounded to bfloat16 changed 1% of the top-1s against the CPU's (measured on an H200)
        decoded = keys.dtype != torch.float32
        queries = queries.float() if decoded else queries.to(keys.dtype)
        prune = on_cpu if self.prune is None else self.prune
        few = on_cpu and queries.shape[0] <= self.FEW_QUERIES
        # a GPU scores up to 2^28 pairs (1 GiB) at a time: 262,144 slots for 1,024 queries searched
        # 16M slots 16% faster than 65,536 did (H200), and fewer blocks mean fewer host syncs
        gpu_chunk = max(65536, (1 << 28) // max(1, queries.shape[0]))
        chunk = self.chunk_size or (gpu_chunk if not on_cpu else 8192 if few else 2048)

        def scores_of(block: Tensor) -> Tensor:  # (B, C) float32
            if decoded:
                block = self.decode(block)
            return ((block @ queries.T).T if few else queries @ block.T).float()

        first = max(chunk, k)  # the first block fills the running top-k
        best_s, best_i = ordered_topk(scores_of(keys[:first]), k)  # (B, k)
        pending: list[tuple[Tensor, Tensor]] = []  # candidates not merged yet, in slot order
        width = 0
        for start in range(first, keys.shape[0], chunk):
            scores = scores_of(keys[start:start + chunk])  # (B, C)
            if prune:  # a stale threshold is still a valid filter: merge once k have piled up
                s, i = _above(scores, best_s[:, -1:])
            else:
                s, i = ordered_topk(scores, min(k, scores.shape[1]))
            if s is not None:
                pending.append((s, i + start))
                width += s.shape[1]
            if pending and (width >= k or start + chunk >= keys.shape[0]):
                best_s, best_i = merge_topk(torch.cat([best_s] + [p[0] for p in pending], 1),
                                            torch.cat([best_i] + [p[1] for p in pending], 1), k)
                pending, width = [], 0
        return best_s, best_i


def _above(scores: Tensor, threshold: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Entries of scores [B, C] above threshold [B, 1], packed left into [B, m] in column order
    (padding: -inf, never selected). (None, None) when there are none."""
    rows, cols = (scores > threshold).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return None, None
    counts = torch.bincount(rows, minlength=scores.shape[0])
    offsets = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - offsets[rows]
    width = int(counts.max())
    s = torch.full((scores.shape[0], width), float("-inf"), device=scores.device)
    i = torch.full((scores.shape[0], width), scores.shape[1], dtype=torch.int64, device=scores.device)
    s[rows, slot] = scores[rows, cols]
    i[rows, slot] = cols
    return s, i


def import_faiss():
    """The faiss module (an optional dependency), or a clear error naming the extra to install."""
    try:
        import faiss  # noqa: PLC0415 - optional dependency, imported on use only
    except ImportError as err:
        raise BackendUnavailableError(
            "backend='faiss' needs the faiss package: pip install 'distmem[faiss]' (CPU) "
            "or 'distmem[gpu]' (CUDA); the two extras are alternatives"
        ) from err
    return faiss


class FaissBackend(_Stateless):
    """faiss brute-force inner-product search (`faiss.knn`, the kernel of IndexFlatIP) on CPU,
    and `faiss.knn_gpu` on CUDA when the installed faiss has GPU support."""

    name = "faiss"

    def __init__(self, device: torch.device, chunk_size: int | None = None) -> None:
        self.faiss = import_faiss()
        self.device = device
        self._exact = TorchExactBackend(chunk_size)  # resolves ties that straddle rank k
        self._gpu_resources = None
        if device.type == "cuda":
            if not hasattr(self.faiss, "StandardGpuResources") or self.faiss.get_num_gpus() < 1:
                raise BackendUnavailableError(
                    "backend='faiss' on a CUDA device needs faiss with GPU support: "
                    "pip install 'distmem[gpu]' instead of 'distmem[faiss]'"
                )
            import faiss.contrib.torch_utils  # noqa: F401,PLC0415 - lets knn_gpu take torch tensors
            self._gpu_resources = self.faiss.StandardGpuResources()
        elif device.type != "cpu":
            raise ValueError(f"backend='faiss' runs on 'cpu' or 'cuda', got device {device}")

    def _knn(self, keys: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        metric = self.faiss.METRIC_INNER_PRODUCT
        if self._gpu_resources is not None:
            return self.faiss.knn_gpu(self._gpu_resources, queries.float().contiguous(),
                                      keys, k, metric=metric)
        sims, ids = self.faiss.knn(queries.float().contiguous().numpy(), keys.numpy(), k, metric=metric)
        return torch.from_numpy(sims), torch.from_numpy(ids)

    def search(self, keys: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        n = keys.shape[0]
        extra = min(k + 1, n)  # one more than asked, to see ties at the boundary
        sims, ids = self._knn(keys, queries, extra)
        sims, ids = sort_by_score_then_id(sims.float(), ids.long())
        if extra > k:
            straddle = (sims[:, k - 1] == sims[:, k]).nonzero().squeeze(1)
            sims, ids = sims[:, :k].contiguous(), ids[:, :k].contiguous()
            if straddle.numel():  # equal scores beyond rank k: faiss may have kept a higher id
                sims[straddle], ids[straddle] = self._exact.search(keys, queries[straddle], k)
        return sims, ids


def make_backend(backend: str, device: torch.device, chunk_size: int | None = None,
                 config: MemoryConfig | None = None, n: int | None = None,
                 codec: KeyCodec | None = None) -> KnnBackend:
    """Backend by name ("torch" | "faiss" exact, "ivf" approximate: needs the memory's config and
    the shard's slot count n) for keys living on `device`, stored as `codec` says (default: by
    their dtype)."""
    if backend == "torch":
        return TorchExactBackend(chunk_size, codec=codec)
    if backend == "faiss":
        return FaissBackend(device, chunk_size)
    if backend == "ivf":
        from distmem.ivf import IvfBackend  # noqa: PLC0415 - it imports this module

        return IvfBackend(config, n, device, codec)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
