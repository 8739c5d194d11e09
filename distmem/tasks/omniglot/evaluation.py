"""The released one-shot evaluation protocol on Omniglot.

Examples one at a time, each first read (no labels, no dropout) then written with its label;
k-shot accuracy counts presentations of a class seen exactly k times before in the episode; every
episode starts from an empty memory. `one_shot_predictions` plays it for many episodes at once.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distmem.stats import per_shot_accuracy, shots_seen
from distmem.tasks.omniglot.data import Split
from distmem.tasks.omniglot.training import sample_episodes


@torch.no_grad()
def embed(model: torch.nn.Module, images: np.ndarray, batch_size: int = 1000) -> Tensor:
    """Unit-norm queries [n, key_dim] (on the CPU) of images [n, 28, 28], in eval mode (no dropout)."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(torch.from_numpy(images[i:i + batch_size]).to(device)).cpu()
                      for i in range(0, len(images), batch_size)])


def one_shot_predictions(queries: Tensor, labels: Tensor) -> Tensor:
    """The one-shot protocol on E episodes at once, each on an empty memory.

    queries [E, T, d] unit-norm, labels [E, T]. Returns predictions [E, T] (-1: empty memory).
    Equal to a `LocalMemory` (age_noise 0, size >= T) emptied per episode, read without labels
    then written with the label at each step: the nearest key (ties: lower slot) gives the
    prediction; a hit merges into that slot, a miss fills the next empty slot.
    """
    E, T, d = queries.shape
    keys = torch.zeros(E, T, d)
    values = torch.full((E, T), -1, dtype=torch.int64)
    used = torch.zeros(E, dtype=torch.int64)
    rows = torch.arange(E)
    preds = torch.empty(E, T, dtype=torch.int64)
    for t in range(T):
        q, y = queries[:, t], labels[:, t]
        nearest = torch.einsum("ed,esd->es", q, keys).argmax(dim=1)  # first maximum: lower slot
        preds[:, t] = values[rows, nearest]
        hit = preds[:, t] == y
        slot = torch.where(hit, nearest, used)
        keys[rows, slot] = torch.where(hit[:, None], F.normalize(q + keys[rows, nearest], dim=1), q)
        values[rows, slot] = y
        used += (~hit).long()
    return preds


def evaluate(queries: Tensor, split: Split, ways: int, episodes: int, per_class: int = 10, max_shot: int = 5,
             seed: int = 0) -> dict[str, dict[str, float]]:
    """k-shot accuracy (k = 1..max_shot) with 95% confidence intervals over `episodes` episodes.

    queries [n, d]: the split's images embedded once (`embed`). Returns {"1": {"accuracy",
    "ci95"}, ...} in percent.
    """
    if not 1 <= max_shot < per_class:
        raise ValueError(f"max_shot: expected 1 <= max_shot < per_class={per_class} (a k-shot presentation needs "
                         f"k earlier drawings of its class), got {max_shot}")
    if not 2 <= ways <= split.num_classes:
        raise ValueError(f"ways: expected 2 <= ways <= {split.num_classes} (the split's classes), got {ways}")
    rng = np.random.default_rng(seed)
    batch = sample_episodes(split, rng, episodes, ways, per_class, global_labels=False)
    idx, labels = batch.indices.T, batch.labels.T  # (E, T)
    preds = one_shot_predictions(queries[torch.from_numpy(idx)], torch.from_numpy(labels)).numpy()
    return per_shot_accuracy(preds == labels, shots_seen(labels), max_shot)


def subset_classes(split: Split, num_classes: int, seed: int = 0) -> Split:
    """The images of `num_classes` random classes of `split`, relabelled 0..num_classes-1."""
    if num_classes >= split.num_classes:
        return split
    chosen = np.random.default_rng(seed).choice(split.num_classes, num_classes, replace=False)
    remap = np.full(split.num_classes, -1)
    remap[chosen] = np.arange(num_classes)
    keep = remap[split.labels] >= 0
    return Split(split.images[keep], remap[split.labels[keep]], num_classes)
