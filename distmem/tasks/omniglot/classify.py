"""Classify new images one-shot with a trained Omniglot checkpoint.

    clf = OneShotClassifier.from_checkpoint("runs/omniglot-default-...")   # a run folder or checkpoint
    clf.remember(support_images, ["alpha", "beta", "gamma"])               # [n, 28, 28] + n labels
    labels, similarity = clf.predict(query_images)                         # [m, 28, 28]

The support images are written one at a time into a fresh memory of the checkpoint's size (the
one-shot protocol of the evaluation: read, then write with the label); `predict` only reads. The
trained network embeds both; nothing of the training memory is used.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
import torch

from distmem import checkpoints
from distmem.cli import from_dict
from distmem.config import MemoryConfig
from distmem.memory import LocalMemory
from distmem.models.omniglot import OmniglotNet
from distmem.runs import RunStore
from distmem.tasks.omniglot.config import OmniglotRunConfig
from distmem.tasks.omniglot.evaluation import embed


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The model.pt of a run folder (its latest checkpoint), a checkpoint folder, or the file itself."""
    path = Path(path)
    latest = checkpoints.latest(RunStore(path)) if path.is_dir() else None
    if latest is not None:
        path = path / latest
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no model.pt at {path}; expected a run folder (with "
                                f"checkpoints/latest.json), a checkpoint folder or a model.pt file")
    return path


def load_network(path: str | os.PathLike) -> tuple[OmniglotNet, OmniglotRunConfig]:
    """The trained network (eval mode, CPU) and the run config saved in a checkpoint (see find_checkpoint)."""
    model_pt = find_checkpoint(path)
    saved = checkpoints.read_payload(model_pt.read_bytes(), str(model_pt))
    cfg = from_dict(OmniglotRunConfig, saved["config"])
    net = OmniglotNet(cfg.model_config())
    net.load_state_dict(saved["model"])
    return net.eval(), cfg


def _check_images(images: np.ndarray, name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) == 0:
        raise ValueError(f"{name}: expected images [n, 28, 28] with n >= 1 (see "
                         f"distmem.tasks.omniglot.data.load_image), got shape {list(images.shape)}")
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"{name}: expected floating images in [0, 1], got dtype {images.dtype}")
    if not np.isfinite(images).all():
        raise ValueError(f"{name}: contains NaN or infinity")
    return images.astype(np.float32, copy=False)


class OneShotClassifier:
    """A trained network + a fresh memory: `remember` labelled images, `predict` the labels of others."""

    def __init__(self, net: OmniglotNet, memory_config: MemoryConfig) -> None:
        self.net = net.eval()
        # no age noise: the evaluation protocol's memory, deterministic
        self.memory = LocalMemory(MemoryConfig(size=memory_config.size, key_dim=memory_config.key_dim,
                                               k=min(memory_config.k, memory_config.size), age_noise=0.0),
                                  backend="torch", device="cpu")
        self.labels: list[Hashable] = []  # memory value v <-> self.labels[v]

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> OneShotClassifier:
        net, cfg = load_network(path)
        return cls(net, cfg.memory_config())

    def remember(self, images: np.ndarray, labels: Sequence[Hashable]) -> None:
        """Write images [n, 28, 28] (float, ink bright, in [0, 1]) with their labels (any hashables), in order."""
        images = _check_images(images, "images")
        labels = list(labels)
        if len(labels) != len(images):
            raise ValueError(f"labels: expected one label per image ({len(images)}), got {len(labels)}")
        ids = {label: i for i, label in enumerate(self.labels)}
        for label in labels:
            ids.setdefault(label, len(ids))
        queries = embed(self.net, images)
        self.labels = list(ids)
        for q, v in zip(queries, [ids[label] for label in labels]):
            self.memory.step(q[None], torch.tensor([v]))

    def predict(self, images: np.ndarray) -> tuple[list[Hashable], np.ndarray]:
        """(labels of the nearest remembered keys, their cosine similarity [m]) for images [m, 28, 28].

        Only remembered slots answer (an empty slot's zero key never does); ties go to the lower slot.
        """
        images = _check_images(images, "images")
        filled = torch.nonzero(self.memory.values >= 0).squeeze(1)
        if len(filled) == 0:
            raise ValueError("memory is empty: remember() some labelled images before predict()")
        sims = embed(self.net, images) @ self.memory.keys[filled].T  # (m, filled)
        best, nearest = sims.max(dim=1)  # first maximum: lower slot
        values = self.memory.values[filled[nearest]]
        return [self.labels[int(v)] for v in values], best.numpy()

    def clear(self) -> None:
        """Forget every remembered image."""
        self.memory.clear()
        self.labels = []
