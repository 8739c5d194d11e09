"""The approximate k-NN backend: faiss inverted lists (IndexIVF) over the memory's keys, kept
current by the memory's in-place slot rewrites.

- Every slot of the shard is in the index under its own id (empty slots too: a zero key), so a
  rewrite is one `update_vectors` (the direct map finds the slot's list) and the next search
  sees it.
- Until the first training the search is exact (a fresh memory is small and its keys move
  fastest). The centroids are trained (k-means on a sample of the written keys) once
  `ivf_train_after` x N slot writes have happened since the memory was emptied or loaded, and
  re-trained after every further `ivf_retrain_every` x N slot writes (the keys drift as the
  network trains; 0: never). A (re-)training rebuilds the index from the current keys.
- Every `ivf_check_every` searches it compares the first 32 queries' candidates with the exact
  search and records the recall (`stats()`), so a run shows how the recall holds as keys drift.
- With recall targets (`ivf_target_recall_at_1`, `ivf_target_recall_at_k` > 0) each check also
  sets nprobe: from the probe rank of each exact candidate's list it knows the fewest lists that
  would have met both targets on its queries, and probes `PROBE_MARGIN` times the most that any
  of the last `RECENT_CHECKS` checks needed (32 queries give a noisy figure, and the keys keep
  drifting until the next check). nprobe may fall as well as rise. It is kept per k, the
  candidates a search asks for: one memory may serve several (the rare-symbol protocol writes
  with k = 1, which needs few lists, and decodes with k = 256, which needs many). The first
  search for a k that no check has sized runs exact and is checked, which sizes it (another k's
  figure says little of what this one needs). A (re-)training moves every key to new lists, so
  the checks' figures no longer say what the next search needs: right after it, the last
  search's first 32 queries are sized against the new lists the same way (recorded in
  `stats()["sizings"]`, not as checks: no search used those probes), and that figure joins the
  window.
- Scanning many lists costs more than the exact search (faiss scans a list slot by slot; the
  exact search is one matrix product): with recall targets, a search whose sized nprobe exceeds
  `ivf_exact_share` of the lists runs the exact search instead. Its check still sizes nprobe from
  the list ranks, so the index takes over again once the queries need fewer lists.
- The lists live in host memory (faiss's CPU IndexIVF, which rewrites a vector in place; its GPU
  IVF cannot): on a GPU memory the keys stay on the GPU too, and each step moves
  only its queries, candidate ids and rewritten keys between the two.
- The lists hold each key as the memory stores it: float32 (IndexIVFFlat), or for a compressed
  memory the same 16 or 8 bits (IndexIVFScalarQuantizer over the keys, not residuals: fp16 /
  bf16; for "int8" keys a uniform quantiser whose levels are the codes -127..127 themselves, for
  "int8_dim" keys a per-dimension one whose levels are the memory's own offset + step x code), so
  the scores faiss returns are the memory's own (to float rounding) and need no re-scoring.
  New int8_dim ranges re-encode every key, so the shard then rebuilds the index (`reset`).
  (A trained 8-bit quantiser of its own picked the wrong candidates among close keys.) The
  candidates are sorted by (score, lower id), as the exact backends do; a query whose probed
  lists hold fewer than k slots falls back to the exact search.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from distmem.backends import TorchExactBackend, import_faiss
from distmem.config import MemoryConfig
from distmem.keycodes import INT8_SCALE, KeyCodec
from distmem.topk import sort_by_score_then_id

PROBE_MARGIN = 1.5  # probes per probe the checks found needed: headroom for the drift until the next check
RECENT_CHECKS = 8  # nprobe covers the most any of these last checks needed (one check's figure is noisy)
CHECK_QUERIES = 32


def default_lists(n: int) -> int:
    """About 4 sqrt(n) lists (a power of two), at least 1 and at most n / 39 (faiss's minimum
    training points per centroid)."""
    return max(1, min(2 ** round(math.log2(4 * math.sqrt(n))), n // 39))


class IvfBackend:
    """Inverted lists over one shard's keys [n, d]; `update` after each in-place rewrite, `reset`
    after the key tensor was replaced (clear, load)."""

    name = "ivf"

    def __init__(self, config: MemoryConfig, n: int, device: torch.device, codec: KeyCodec | None = None) -> None:
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='ivf' keeps its keys on 'cpu' or 'cuda', got device {device}")
        self.faiss = import_faiss()
        self.n, self.d = n, config.key_dim
        self.lists = min(config.ivf_lists or default_lists(n), max(1, n // 39))
        self.nprobe = self.first_probe = config.ivf_probe
        self.train_after = max(1, math.ceil(config.ivf_train_after * n))
        self.retrain_every = math.ceil(config.ivf_retrain_every * n)
        self.codes = {"float32": None, "float16": "QT_fp16", "bfloat16": "QT_bf16",
                      "int8": "QT_8bit_uniform", "int8_dim": "QT_8bit"}[config.key_dtype]
        self.codec = codec or KeyCodec(config.key_dtype, config.key_dim, n, device)
        self.score_scale = 1 / INT8_SCALE if config.key_dtype == "int8" else 1.0  # codes are round(127 x)
        self.seed = config.seed
        self._exact = TorchExactBackend(config.chunk_size, codec=self.codec)
        self.check_every = config.ivf_check_every
        self.k = config.k
        self.target_1, self.target_k = config.ivf_target_recall_at_1, config.ivf_target_recall_at_k
        self.exact_share = config.ivf_exact_share
        self.index = None
        self.writes = 0        # slot writes since the last training (or reset)
        self.total_writes = 0
        self.trainings = 0
        self.searches = 0
        self.exact_searches = 0  # searches since the first training that ran exact (see searches_exactly)
        self.checks: list[dict[str, float]] = []  # recall against the exact search, over the run
        self.sizings: list[dict[str, int]] = []  # nprobe sized right after each (re-)training
        self.needed: dict[int, list[int]] = {}  # by k: lists needed by the last RECENT_CHECKS checks and sizings
        self.probes: dict[int, int] = {}  # by k: the nprobe those figures set (recall targets only)
        self.recent: tuple[Tensor, int] | None = None  # the last search's first CHECK_QUERIES queries, and its k

    # -- keeping the index current -------------------------------------------------------------
    def reset(self, keys: Tensor, rewritten: int = 0) -> None:
        """The shard's keys were replaced: drop the index; train at once if the keys are mostly
        written (a loaded memory), else after `train_after` writes. `rewritten`: rows written by
        the step that replaced them (an int8_dim re-fit), counted as writes."""
        self.total_writes += rewritten
        self.index = None
        self.writes = int(self.codec.written(keys).sum())
        self._maybe_train(keys)

    def update(self, keys: Tensor, local: Tensor) -> None:
        """Rows `local` [m] (int64, distinct) of keys [n, d] were just rewritten."""
        self.writes += int(local.numel())
        self.total_writes += int(local.numel())
        if self.index is not None:
            ids = local.cpu().numpy().astype(np.int64)
            self.index.update_vectors(ids, self._vectors(keys[local]))
        self._maybe_train(keys)

    def _maybe_train(self, keys: Tensor) -> None:
        due = self.train_after if self.index is None else self.retrain_every
        if due and self.writes >= due:
            self.train(keys)

    def train(self, keys: Tensor) -> None:
        """k-means on up to 40 sampled written keys per list, then every slot added under its id."""
        written = torch.nonzero(self.codec.written(keys)).squeeze(1)
        if written.numel() < self.lists:
            return
        rng = np.random.default_rng([self.seed, self.trainings])
        take = rng.choice(written.numel(), min(written.numel(), 40 * self.lists), replace=False)
        sample = self._vectors(keys[written[torch.from_numpy(np.sort(take))]])
        quantizer = self.faiss.IndexFlatIP(self.d)
        metric = self.faiss.METRIC_INNER_PRODUCT
        if self.codes:  # the index's codes as compact as the memory's keys
            index = self.faiss.IndexIVFScalarQuantizer(quantizer, self.d, self.lists,
                                                        getattr(self.faiss.ScalarQuantizer, self.codes), metric,
                                                        False)  # by_residual off: the stored keys, exactly
        else:
            index = self.faiss.IndexIVFFlat(quantizer, self.d, self.lists, metric)
        index.cp.seed = self.seed + self.trainings
        index.cp.niter = 10  # k-means iterations (faiss: 25); the keys drift anyway
        index.cp.spherical = True  # unit centroids: an inner-product assignment would favour long ones
        index.train(sample)
        if self.codes == "QT_8bit_uniform":  # levels -127.5 + (c + 0.5) = c - 127: the int8 codes, exactly
            self.faiss.copy_array_to_vector(np.array([-127.5, 255.0], dtype=np.float32), index.sq.trained)
        if self.codes == "QT_8bit":  # per dimension vmin + (u + 0.5) vdiff / 255 with u = c + 127: offset + step c
            step, offset = self.codec.step.cpu().double(), self.codec.offset.cpu().double()
            trained = torch.cat([offset - 127.5 * step, 255 * step]).float().numpy()
            self.faiss.copy_array_to_vector(trained, index.sq.trained)
        for start in range(0, self.n, 1 << 20):  # ids 0..n-1 in order: the direct map is an array
            index.add(self._vectors(keys[start:start + (1 << 20)]))
        index.make_direct_map()
        index.nprobe = min(self.nprobe, self.lists)
        self.index, self.writes = index, 0
        self.trainings += 1
        if self.recent is not None:  # kept only with recall targets
            queries, k = self.recent
            _, exact = self._exact.search(keys, queries, k)
            needed = self.probes_needed(queries, exact)
            self._size(needed, k)
            self.sizings = self.sizings[-999:] + [{"search": self.searches, "trainings": self.trainings, "k": k,
                                                   "probes_needed": needed, "nprobe_next": self.nprobe}]

    # -- search ----------------------------------------------------------------------------------
    def search(self, keys: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-k candidates of queries [B, d] by the probed lists: (sims [B, k], ids [B, k]),
        sorted by score, ties by the lower id; exact until the first training."""
        if self.targeted:  # for the sizing at the next (re-)training
            self.recent = queries[:CHECK_QUERIES].detach().clone(), k
        if self.index is None:
            return self._exact.search(keys, queries, k)
        self.searches += 1
        if self.probes:  # sized by the recall targets' checks
            self.index.nprobe = self.probes_for(k)
        exact, unsized = self.searches_exactly(k), self.unsized(k)
        if exact:
            self.exact_searches += 1
            sims, ids = self._exact.search(keys, queries, k)
        else:
            sims, ids = self._probe(keys, queries, k)
        if unsized or (self.check_every and (self.searches - 1) % self.check_every == 0):  # 1, 1 + every, ...
            self._check(keys, queries[:CHECK_QUERIES], ids[:CHECK_QUERIES], k, exact)
        return sims, ids

    @property
    def targeted(self) -> bool:
        """Whether recall targets size nprobe (either target above 0)."""
        return bool(self.target_1 or self.target_k)

    def unsized(self, k: int) -> bool:
        """With recall targets: no check or sizing has set nprobe for k yet."""
        return self.targeted and k not in self.probes

    def probes_for(self, k: int) -> int:
        """nprobe for a search of k candidates: what the checks sized for k, else ivf_probe."""
        return self.probes.get(k, min(self.lists, self.first_probe))

    def searches_exactly(self, k: int) -> bool:
        """Whether a search of k candidates runs exact: with recall targets, when no check has
        sized k yet or its nprobe would scan more than `exact_share` of the lists."""
        return self.unsized(k) or (self.targeted and self.probes_for(k) > self.exact_share * self.lists)

    def _probe(self, keys: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """faiss's search of the probed lists, sorted by (score, lower id)."""
        sims, ids = self.index.search(_float32(queries), k)
        sims, ids = torch.from_numpy(sims).to(keys.device), torch.from_numpy(ids).to(keys.device)
        short = (ids < 0).any(1)
        ids = ids.clamp(min=0)
        if self.score_scale != 1.0:
            sims = sims * self.score_scale
        sims, ids = sort_by_score_then_id(sims, ids)
        if short.any():  # the probed lists held fewer than k slots
            rows = short.nonzero().squeeze(1)
            sims[rows], ids[rows] = self._exact.search(keys, queries[rows], k)
        return sims, ids

    def _vectors(self, stored: Tensor) -> np.ndarray:
        """Stored keys as the index takes them: float32 values; int8 codes unscaled (the uniform
        quantiser's levels); int8_dim keys decoded (faiss encodes them back to the same codes)."""
        return _float32(self.codec.decode(stored) if self.codes == "QT_8bit" else stored)

    def _check(self, keys: Tensor, queries: Tensor, ids: Tensor, k: int, searched_exactly: bool = False) -> None:
        """Record the recall of this search's first queries against the exact search (1 when the
        search ran exact: `exact` in the record); with recall targets, set nprobe from what these
        queries needed."""
        exact = ids if searched_exactly else self._exact.search(keys, queries, k)[1]
        at_1, at_k = recall_at(exact, ids)
        check = {"search": self.searches, "writes": self.total_writes, "trainings": self.trainings, "k": k,
                 "nprobe": int(self.index.nprobe), "exact": searched_exactly, "recall_at_1": at_1, "recall_at_k": at_k}
        self.checks = self.checks[-999:] + [check]
        if self.targeted:
            check["probes_needed"] = self.probes_needed(queries, exact)
            self._size(check["probes_needed"], k)
            check["nprobe_next"] = self.nprobe

    def _size(self, needed: int, k: int) -> None:
        """nprobe: PROBE_MARGIN x the most lists that this and the last figures needed."""
        window = self.needed[k] = self.needed.get(k, [])[-(RECENT_CHECKS - 1):] + [needed]
        # the index's own nprobe is set by each search, from probes_for(its k)
        self.nprobe = self.probes[k] = min(self.lists, math.ceil(PROBE_MARGIN * max(window)))

    def probes_needed(self, queries: Tensor, exact: Tensor) -> int:
        """The fewest lists to probe for recall@1 >= target_1 and recall@k >= target_k on queries
        [B, d] whose exact top-k slots are exact [B, k]: a query probes its lists in the order of
        its centroid scores, so a candidate is found from the probe rank of its list on."""
        b, k = exact.shape
        _, order = self.index.quantizer.search(_float32(queries), self.lists)  # [B, L] lists, probe order
        rank = np.empty_like(order)
        rank[np.arange(b)[:, None], order] = np.arange(self.lists)
        slots = exact.cpu().numpy()
        lists = np.array([self.index.direct_map.get(int(s)) >> 32 for s in slots.ravel()]).reshape(b, k)
        ranks = rank[np.arange(b)[:, None], lists]  # [B, k] lists probed before each candidate's
        needed = 1
        for target, found in ((self.target_1, ranks[:, 0]), (self.target_k, ranks.ravel())):
            if target:  # the ceil(target x count)-th smallest rank, plus one
                needed = max(needed, int(np.sort(found)[math.ceil(target * found.size) - 1]) + 1)
        return needed

    def stats(self) -> dict:
        """Lists, probes, trainings, searches since the first training (and how many of them ran exact),
        and the recall checks so far (every `ivf_check_every` searches)."""
        return {"name": self.name, "lists": self.lists, "nprobe": self.nprobe, "trainings": self.trainings,
                "writes": self.total_writes, "searches": self.searches, "exact_searches": self.exact_searches,
                "checks": list(self.checks), "sizings": list(self.sizings)}


def recall_at(want: Tensor, got: Tensor) -> tuple[float, float]:
    """(recall@1, recall@k) of candidate ids got [B, k] against the exact ones want [B, k]."""
    want, got = want.cpu(), got.cpu()
    at_k = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(want, got)) / want.numel()
    return float((want[:, 0] == got[:, 0]).float().mean()), at_k


def _float32(x: Tensor) -> np.ndarray:
    """Stored keys (or queries) as the index takes them: float32 values, int8 codes unscaled."""
    return np.ascontiguousarray(x.detach().float().cpu().numpy())
