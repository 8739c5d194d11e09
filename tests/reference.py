"""An independent, deliberately naive NumPy re-statement of shared/docs/memory-module.md.

Loops and full sorts, no shared code with distmem: the oracle the fast implementations are
checked against (age_noise = 0 unless a noise vector is given).
"""

from __future__ import annotations

import math

import numpy as np


class ReferenceMemory:
    def __init__(self, size: int, dim: int, k: int, alpha: float = 0.1) -> None:
        self.n, self.d, self.k, self.alpha = size, dim, k, alpha
        self.keys = np.zeros((size, dim), dtype=np.float64)
        self.values = np.full(size, -1, dtype=np.int64)
        self.ages = np.zeros(size, dtype=np.int64)
        self.recent: dict[int, int] = {}

    def candidates(self, q: np.ndarray) -> list[int]:
        sims = self.keys @ q
        order = sorted(range(self.n), key=lambda i: (-sims[i], i))
        return order[: self.k]

    def read(self, q: np.ndarray, y: int | None):
        """(candidates, prediction, confidence, loss or None) for one query."""
        cands = self.candidates(q)
        sims = self.keys[cands] @ q
        t = max(1.0, math.log(0.2 * self.k) / self.alpha)
        w = np.exp(t * sims - np.max(t * sims))
        confidence = w[0] / w.sum()
        loss = None
        if y is not None:
            full = list(cands)
            r = self.recent.get(y)
            if r is not None and r not in full and self.values[r] == y:
                full.append(r)
            pos = next((c for c in full if self.values[c] == y), None)
            neg = next((c for c in full if self.values[c] != y), None)
            if neg is None:
                loss = 0.0
            else:
                pos_sim = 0.0 if pos is None else float(self.keys[pos] @ q)
                loss = max(0.0, float(self.keys[neg] @ q) - pos_sim + self.alpha)
        return cands, int(self.values[cands[0]]), float(confidence), loss

    def step(self, qs: np.ndarray, ys: list[int], train: bool = True, noise: np.ndarray | None = None):
        reads = [self.read(q, y if train else None) for q, y in zip(qs, ys)]
        score = self.ages.astype(np.float64) + (0.0 if noise is None else noise)
        oldest = sorted(range(self.n), key=lambda i: (-score[i], i))[: len(ys)]
        keys, values = self.keys.copy(), self.values.copy()
        written = set()
        for b, (q, y) in enumerate(zip(qs, ys)):
            n1 = reads[b][0][0]
            if self.values[n1] == y:
                new = q + self.keys[n1]
                keys[n1], values[n1], slot = new / np.linalg.norm(new), y, n1  # a later write wins whole
            else:
                slot = oldest[b]
                keys[slot], values[slot] = q, y
            written.add(slot)
            if train:
                self.recent[y] = slot
        self.keys, self.values = keys, values
        self.ages += 1
        for slot in written:
            self.ages[slot] = 0
        return reads
