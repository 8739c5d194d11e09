"""Omniglot training: episode sampling and one update on an episode batch.

Training (one "episode batch"): `parallel` episodes of `width` classes, each class shown
`per_class` times in random order; step t of the batch holds the t-th example of every episode.
The CNN embeds the whole batch at once; the memory then reads (with labels) and writes step by
step, and the summed memory loss trains the network once per batch (the released code's scheme).
Labels are global class ids in life-long mode, and episode-local ids (episode e, class c ->
e * width + c) in episodic mode, where the memory is emptied before every batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distmem.memory import Memory
from distmem.tasks.omniglot.data import Split


@dataclass
class EpisodeBatch:
    """indices [T, P] into the split's images; labels [T, P] memory labels; classes [T, P] class ids."""

    indices: np.ndarray
    labels: np.ndarray
    classes: np.ndarray


def sample_episodes(split: Split, rng: np.random.Generator, parallel: int, width: int, per_class: int,
                    global_labels: bool) -> EpisodeBatch:
    """`parallel` episodes of `width` distinct classes x `per_class` distinct drawings, shuffled."""
    by_class = split.by_class()
    T = width * per_class
    indices = np.empty((T, parallel), dtype=np.int64)
    classes = np.empty((T, parallel), dtype=np.int64)
    labels = np.empty((T, parallel), dtype=np.int64)
    for e in range(parallel):
        chosen = rng.choice(split.num_classes, size=width, replace=False)
        items = [(c, j, i) for j, c in enumerate(chosen)
                 for i in rng.choice(by_class[c], size=per_class, replace=False)]
        order = rng.permutation(T)
        for t, o in enumerate(order):
            c, j, i = items[o]
            indices[t, e], classes[t, e] = i, c
            labels[t, e] = c if global_labels else e * width + j
    return EpisodeBatch(indices, labels, classes)


def train_batch(model: torch.nn.Module, memory: Memory, split: Split, batch: EpisodeBatch,
                optimizer: torch.optim.Optimizer, clip_norm: float = 5.0, step_group: int = 1) -> dict[str, float]:
    """One update on an episode batch. memory: LocalMemory or ShardedMemory (read/write).

    step_group: consecutive time steps read and written as one memory step of step_group * P
    queries (1: the released scheme; more: fewer round trips to a sharded memory, but examples of
    one group do not see each other).
    """
    model.train()
    T, P = batch.indices.shape
    device = next(model.parameters()).device
    images = torch.from_numpy(split.images[batch.indices.reshape(-1)]).to(device)
    queries = model(images).view(T, P, -1)  # (T, P, key_dim)
    labels = torch.from_numpy(batch.labels).to(device)
    losses, correct = [], 0
    for t in range(0, T, step_group):
        q, y = queries[t:t + step_group].flatten(0, 1), labels[t:t + step_group].flatten()
        read = memory.read(q, y)
        memory.write(read)
        losses.append(read.loss)
        correct += int((read.prediction.cpu() == y.cpu()).sum())
    loss = torch.stack(losses).mean()
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    return {"loss": float(loss.detach()), "train_accuracy": correct / (T * P)}
