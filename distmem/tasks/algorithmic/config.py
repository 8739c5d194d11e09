"""The Neural GPU's algorithmic run config and its presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from distmem.cli import check_fields, option
from distmem.models.neural_gpu import NEURAL_GPU_PRESETS, NeuralGPUConfig
from distmem.tasks.algorithmic.data import Curriculum, vocabulary


@dataclass(frozen=True)
class AlgorithmicRunConfig:
    """Everything an algorithmic run needs; saved with every checkpoint (config.json in the run folder)."""

    preset: str = option("default", "the preset this config started from")
    task: Literal["badd", "bmul", "rev", "copy", "sort"] = option("badd", "the algorithm to learn")
    symbols: int = option(8, "rev / copy / sort: letters in the alphabet")
    model: Literal["tiny", "small", "paper"] = option("tiny", "model size (neural_gpu.NEURAL_GPU_PRESETS)")
    nmaps: int = option(0, "channels of the tape (0: the model preset's)")
    height: int = option(0, "rows of the tape (0: the model preset's)")
    cell: Literal["cgru", "dcgru"] = option(
        "cgru", "the step's cell: cgru (Kaiser & Sutskever) or dcgru (Freivalds & Liepins' diagonal gates, hard gates)")
    saturation: float = option(0.0, "dcgru: weight of the saturation cost in the loss")
    saturation_share: float = option(
        0.0, "dcgru: cap the weighted saturation cost at this share of the step's cross-entropy, so it fades as "
             "the fit gets exact (Freivalds & Liepins keep it at lr x loss; 0: the fixed --saturation)")
    saturation_share_at: int = option(0, "the step from which --saturation-share applies (before it: the fixed "
                                         "weight, which the first steps need)")
    snap: float = option(
        0.0, "dcgru, inference only: set an update gate within this of 0 or 1 to exactly 0 or 1, so a held "
             "value does not leak over a long tape (0: off)")
    snap_grid: tuple[float, ...] = option(
        (), "after training, also score the weights' averages at the validation length with each of these "
            "roundings, and test the best model with its best rounding (the rounding a run holds its values "
            "best with differs from run to run; empty: --snap only)")
    snap_from: int = option(
        0, "dcgru: from this step on, training rounds the update gates by --snap too (the gradient passes "
           "straight through), so that it fits the function inference runs (0: never)")
    extended: bool = option(False, "the Extended Neural GPU (a decoder tape) instead of the Neural GPU")
    workers: int = option(2, "data-parallel trainers (Ray Train)")
    cpus_per_worker: int = option(0, "CPUs each trainer reserves (0: the cluster's CPUs / workers)")
    threads: int = option(0, "torch threads per trainer (0: its CPUs)")
    steps: int = option(6000, "training steps (one batch per trainer each)")
    batch_size: int = option(16, "instances per trainer per step")
    lr: float = option(1e-3, "Adam learning rate")
    lr_end: float = option(0.0, "cosine-anneal the learning rate from --lr to this at the last step (0: keep --lr)")
    lr_drop_at: int = option(0, "multiply the learning rate by --lr-drop from this step on (0: never)")
    lr_drop: float = option(0.1, "the factor --lr-drop-at applies")
    ema_from: int = option(0, "keep an exponential moving average of the weights from this step on (0: none): "
                                  "every eval scores it beside the weights; the test takes whichever validated best")
    ema_decay: float = option(0.999, "the average's decay per step (its horizon: about 1 / (1 - decay) steps)")
    clip_norm: float = option(1.0, "gradient-norm clipping")
    clip_relative: float = option(
        0.0, "from --clip-relative-from on, clip each gradient element to this many times the root of Adam's "
             "running mean square of it, so that one sudden gradient after a quiet stretch cannot move every "
             "weight by several learning rates at once (Freivalds & Liepins clip AdaMax alike; 0: off)")
    clip_relative_from: int = option(0, "the step from which --clip-relative applies")
    dropout: float = option(0.0, "dropout on the tape before every step (dcgru: on the cell's candidate)")
    grad_noise: float = option(0.0, "gradient noise: N(0, eta / (1 + step)^0.55) added to every gradient (eta)")
    curriculum_start: int = option(3, "curriculum: the longest training length at step 0")
    curriculum_every: int = option(200, "curriculum: steps between growths of the longest length by one")
    max_length: int = option(20, "the longest training length (the curriculum's end)")
    extra_steps: float = option(
        0.0, "training only: run a batch of length n for n + r steps, r drawn uniformly from 0..F x n each step "
             "(the same for every trainer), so that the answer must hold on the tape after it is computed, as "
             "it must over a long test tape (inference runs n steps; 0: off)")
    bins: tuple[int, ...] = option(
        (), "train every step on a batch of each of these bins, each capped at the curriculum's longest so "
            "far, the loss their mean (Freivalds & Liepins' every-bin step): a bin of length L holds --batch-size "
            "instances of lengths above the previous bin's up to L, padded to L (empty: one length a step, "
            "drawn by the curriculum)")
    shared_length: bool = option(
        False, "every trainer draws a step's length from one generator (seed, step), so none waits at the "
               "gradient's all-reduce for another's longer batch (off: each its own, the measured presets)")
    test_lengths: tuple[int, ...] = option((20, 50, 100, 200, 400), "lengths of the generalisation test")
    test_instances: int = option(1024, "fresh instances per test length")
    eval_every: int = option(500, "steps between points of the accuracy curve (at the longest training length)")
    eval_instances: int = option(256, "instances per point of the accuracy curve")
    validation_length: int = option(0, "also score this longer length at every eval (0: none), on instances the "
                                       "test never sees; the test then takes the checkpoint that scored best")
    validation_from: int = option(0, "score --validation-length only at evals from this step on (long lengths "
                                     "cost: one eval at 200 takes about 30 s on one core)")
    log_every: int = option(50, "steps between points of the training curve")
    checkpoint_every: int = option(500, "steps between checkpoints")
    seed: int = option(0, "seed of the instances, the initialisation and the noise")

    def __post_init__(self) -> None:
        check_fields(self, at_least_one=("workers", "steps", "batch_size", "test_instances", "eval_instances",
                                         "log_every", "checkpoint_every", "curriculum_every"),
                     non_negative=("cpus_per_worker", "threads", "nmaps", "height", "eval_every", "grad_noise",
                                   "saturation", "saturation_share", "lr_end",
                                   "validation_length", "lr_drop_at", "saturation_share_at", "ema_from",
                                   "validation_from", "snap_from", "clip_relative", "clip_relative_from",
                                   "extra_steps"),
                     positive_finite=("lr", "lr_drop"))
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"--ema-decay: expected a number in (0, 1), got {self.ema_decay!r}")
        if self.snap_grid and (not all(0 < u < 0.5 for u in self.snap_grid) or self.cell != "dcgru"
                               or not self.validation_length):
            raise ValueError(f"--snap-grid: expected roundings in (0, 0.5) of a dcgru run with a --validation-length, "
                             f"got {self.snap_grid!r} (cell {self.cell}, validation length {self.validation_length})")
        if self.snap_from and not self.snap:
            raise ValueError("--snap-from: training rounds the gates by --snap: expected --snap > 0")
        vocabulary(self.task, self.symbols)
        curriculum = self.curriculum()
        if self.bins and (list(self.bins) != sorted(set(self.bins)) or self.bins[0] < curriculum.shortest
                          or self.bins[-1] > self.max_length):
            raise ValueError(f"--bins: expected increasing lengths in {curriculum.shortest}..{self.max_length} "
                             f"(--max-length), got {self.bins!r}")
        if not self.test_lengths or min(self.test_lengths) < 3:
            raise ValueError(f"--test-lengths: expected comma-separated lengths >= 3, got {self.test_lengths!r}")
        self.model_config()

    def curriculum(self) -> Curriculum:
        return Curriculum(start=self.curriculum_start, longest=self.max_length, every=self.curriculum_every,
                          shortest=3 if self.task in ("badd", "bmul") else 1)

    def model_config(self) -> NeuralGPUConfig:
        vocab = vocabulary(self.task, self.symbols)
        sizes = {**NEURAL_GPU_PRESETS[self.model], **({"nmaps": self.nmaps} if self.nmaps else {}),
                 **({"height": self.height} if self.height else {})}
        return NeuralGPUConfig(in_vocab=vocab.in_size, out_vocab=vocab.out_size, dropout=self.dropout,
                               extended=self.extended, cell=self.cell, saturation=self.saturation, snap=self.snap,
                               **sizes)


# the improved Neural GPU (Freivalds & Liepins): diagonal gates, hard gates with a saturation
# cost, a one-row tape of 48 channels and dropout 0.5 on the candidate (their badd settings);
# chosen on fresh validation instances (docs/experiments.md)
IMPROVED = dict(cell="dcgru", height=1, nmaps=48, dropout=0.5, saturation=1e-3, lr=3e-3)

PRESETS: dict[str, dict] = {
    # CI smoke run: a few steps, short test lengths, few instances
    "quick": dict(IMPROVED, steps=20, curriculum_every=5, max_length=8, test_lengths=(8, 16), test_instances=32,
                  eval_every=10, eval_instances=16, log_every=5, checkpoint_every=10, validation_length=12,
                  ema_from=5, ema_decay=0.9, snap=0.1, snap_grid=(0.05, 0.2)),
    # the measured CPU run. Once the training lengths fit (20,000), the saturation cost falls to 1%
    # of the cross-entropy, and a moving average of the weights (horizon 2,000 steps) holds the
    # answers at length 200, where the weights themselves drift; at inference, update gates within
    # 0.1 of 0 or 1 are rounded to it, or within another of the grid's roundings where the averages
    # validate better with it (chosen on validation instances, docs/experiments.md)
    "default": dict(IMPROVED, steps=26_000, eval_every=2000, checkpoint_every=2000, validation_length=200,
                    validation_from=24_000, saturation_share=0.01, saturation_share_at=20_000, ema_from=20_000,
                    ema_decay=0.9995, snap=0.1, snap_grid=(0.05, 0.15, 0.2, 0.25)),
    # the first measured run: Kaiser & Sutskever's CGRU, 4 rows of 24 channels (docs/experiments.md)
    "cgru": dict(steps=10_000, eval_every=1000, checkpoint_every=1000),
}
