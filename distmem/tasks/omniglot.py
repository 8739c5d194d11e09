"""Omniglot one-shot learning with the memory: episode sampling, training and evaluation.

Training (one "episode batch"): `parallel` episodes of `width` classes, each class shown
`per_class` times in random order; step t of the batch holds the t-th example of every episode.
The CNN embeds the whole batch at once; the memory then reads (with labels) and writes step by
step, and the summed memory loss trains the network once per batch (the released code's scheme).
Labels are global class ids in life-long mode, and episode-local ids (episode e, class c ->
e * width + c) in episodic mode, where the memory is emptied before every batch.

Evaluation is the released protocol: examples one at a time, each first read (no labels, no
dropout) then written with its label; k-shot accuracy counts presentations of a class seen
exactly k times before in the episode; every episode starts from an empty memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distmem.config import MemoryConfig
from distmem.data.omniglot import Split
from distmem.models.omniglot import OmniglotModelConfig


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


def train_batch(model: torch.nn.Module, memory, split: Split, batch: EpisodeBatch,
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


def train_batches(model: torch.nn.Module, memory, train: Split, optimizer: torch.optim.Optimizer,
                  cfg: "OmniglotRunConfig", rank: int = 0, start: int = 0,
                  curve: Callable[[], dict[str, dict[str, float]]] | None = None
                  ) -> Iterator[tuple[int, dict[str, float], dict[str, dict[str, float]] | None]]:
    """The training loop of trainer `rank` from batch `start` to `cfg.batches`, one update per batch.

    Episodic mode empties `memory` before every batch; life-long mode never does. Each batch's
    episodes and dropout are drawn from (seed, rank, batch), so a run resumed from a checkpoint at
    batch `start` continues exactly as the uninterrupted run. `curve` (an evaluation on held-out
    classes) runs every `cfg.eval_every` batches and after the last. Yields (batches done,
    train_batch's metrics, the curve's result or None) after each batch.
    """
    for b in range(start, cfg.batches):
        if cfg.mode == "episodic":
            memory.clear()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, b)
        seeds = np.random.SeedSequence([cfg.seed, rank, b])
        torch.manual_seed(int(seeds.generate_state(1, np.uint64)[0] >> 1))  # dropout
        batch = sample_episodes(train, np.random.default_rng(seeds), cfg.parallel, cfg.width, cfg.per_class,
                                global_labels=cfg.mode == "lifelong")
        metrics = train_batch(model, memory, train, batch, optimizer, cfg.clip_norm, cfg.step_group)
        done = b + 1
        point = curve() if curve is not None and (done % cfg.eval_every == 0 or done == cfg.batches) else None
        yield done, metrics, point


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


def shots_seen(labels: np.ndarray) -> np.ndarray:
    """[E, T]: how many times each example's class was shown before in its episode."""
    seen = np.zeros_like(labels)
    for e in range(labels.shape[0]):
        counts: dict[int, int] = {}
        for t, y in enumerate(labels[e]):
            seen[e, t] = counts.get(int(y), 0)
            counts[int(y)] = seen[e, t] + 1
    return seen


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
    seen = shots_seen(labels)
    out = {}
    for k in range(1, max_shot + 1):
        mask = seen == k
        per_episode = (preds == labels)[mask].reshape(episodes, -1).mean(axis=1) * 100  # same count per episode
        out[str(k)] = {"accuracy": float(per_episode.mean()),
                       "ci95": float(1.96 * per_episode.std(ddof=1) / math.sqrt(episodes)) if episodes > 1 else 0.0}
    return out


@dataclass
class OmniglotRunConfig:
    """Everything a run needs; saved with every checkpoint (config.json in the run folder)."""

    preset: str = "default"
    mode: str = "episodic"          # "episodic" (released code) or "lifelong" (one memory, never emptied)
    split: str = "released"         # "released" or "vinyals"
    workers: int = 1                # data-parallel trainers (Ray Train)
    cpus_per_worker: int = 0        # CPUs each trainer reserves (0: the cluster's CPUs / workers)
    shards: int = 1                 # memory shards (life-long mode)
    step_group: int = 1             # time steps per memory step (see train_batch; >1 for a cheaper life-long mode)
    batches: int = 300              # episode batches (optimizer updates) to train for
    parallel: int = 16              # episodes per batch, per worker
    width: int = 5                  # classes per training episode
    per_class: int = 10             # drawings of each class per training episode
    lr: float = 1e-4
    lr_schedule: str = "constant"   # "constant" or "cosine" (decays lr to 0 over `batches`)
    clip_norm: float = 5.0
    memory_size: int = 8192
    key_dim: int = 256
    k: int = 256
    age_noise: float = 8.0
    backend: str = "torch"
    conv_norm: bool = False         # BatchNorm after each convolution (not in the released CNN; see OmniglotModelConfig)
    eval_every: int = 50            # batches between points of the accuracy curve
    curve_classes: int = 100        # test classes used for the curve (the final table uses all)
    curve_episodes: int = 300
    eval_episodes: int = 1000
    checkpoint_every: int = 100
    seed: int = 0
    data: str | None = None         # folder with the Omniglot zips (default ../shared/data/omniglot)
    cache: str | None = None        # decoded-image cache (default ~/.cache/distmem)

    def model_config(self) -> OmniglotModelConfig:
        """The network this run trains (key size, batch norm after the convolutions)."""
        return OmniglotModelConfig(key_dim=self.key_dim, batch_norm=self.conv_norm)

    def memory_config(self) -> MemoryConfig:
        """The memory this run trains with (size, key size, k, age noise, seed)."""
        return MemoryConfig(size=self.memory_size, key_dim=self.key_dim, k=self.k, age_noise=self.age_noise,
                            seed=self.seed)


PRESETS: dict[str, dict] = {
    # CI smoke run: a few batches, small evaluation (well under two minutes with Ray start-up)
    "quick": dict(batches=4, parallel=4, conv_norm=True, eval_every=2, curve_classes=30, curve_episodes=50,
                  eval_episodes=100, checkpoint_every=2),
    # under 15 minutes on 2 CPU cores (the paper: 1e-4, 16 episodes a batch, no conv batch norm):
    # measured at equal compute, 8 episodes a batch, batch norm after the convolutions and lr 2e-3
    # with cosine decay learn fastest (see the README)
    "default": dict(batches=180, parallel=8, conv_norm=True, lr=2e-3, lr_schedule="cosine", eval_every=36,
                    checkpoint_every=36),
    # the paper's settings (Adam 1e-4, memory 8192, key 256, k 256): hours on a GPU
    "paper": dict(batches=60000, lr=1e-4, eval_every=1000, checkpoint_every=1000, curve_episodes=500),
}


def learning_rate(cfg: OmniglotRunConfig, batch: int) -> float:
    """The learning rate of update `batch` (0-based); a pure function of the batch, so resuming is exact."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * batch / cfg.batches))
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")


def subset_classes(split: Split, num_classes: int, seed: int = 0) -> Split:
    """The images of `num_classes` random classes of `split`, relabelled 0..num_classes-1."""
    if num_classes >= split.num_classes:
        return split
    chosen = np.random.default_rng(seed).choice(split.num_classes, num_classes, replace=False)
    remap = np.full(split.num_classes, -1)
    remap[chosen] = np.arange(num_classes)
    keep = remap[split.labels] >= 0
    return Split(split.images[keep], remap[split.labels[keep]], num_classes)
