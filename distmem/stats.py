"""Evaluation statistics shared by the tasks: confidence intervals and per-shot accuracy."""

from __future__ import annotations

import math

import numpy as np


def mean_ci95(samples: np.ndarray) -> tuple[float, float]:
    """(mean, half-width of the normal 95% interval of the mean) of per-episode scores [n]."""
    samples = np.asarray(samples, dtype=np.float64)
    n = len(samples)
    if n == 0:
        return float("nan"), float("nan")
    return float(samples.mean()), float(1.96 * samples.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def wilson_interval(hits: int, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score 95% interval of a proportion, in percent (unlike the normal approximation
    it does not shrink to a point at 0% or 100%)."""
    if n == 0:
        return [float("nan"), float("nan")]
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [100 * max(0.0, centre - half), 100 * min(1.0, centre + half)]


def shots_seen(labels: np.ndarray) -> np.ndarray:
    """labels [E, T] -> [E, T]: how many times each example's class was shown before in its episode."""
    seen = np.zeros_like(labels)
    for e in range(labels.shape[0]):
        counts: dict[int, int] = {}
        for t, y in enumerate(labels[e]):
            seen[e, t] = counts.get(int(y), 0)
            counts[int(y)] = seen[e, t] + 1
    return seen


def per_shot_accuracy(correct: np.ndarray, seen: np.ndarray, max_shot: int) -> dict[str, dict[str, float]]:
    """k-shot accuracy (k = 1..max_shot) over episodes: correct, seen [E, T]; every episode must hold
    the same number of k-shot presentations. Returns {"1": {"accuracy", "ci95"}, ...} in percent."""
    episodes = correct.shape[0]
    out = {}
    for k in range(1, max_shot + 1):
        per_episode = correct[seen == k].reshape(episodes, -1).mean(axis=1) * 100
        accuracy, ci95 = mean_ci95(per_episode)
        out[str(k)] = {"accuracy": accuracy, "ci95": ci95}
    return out
