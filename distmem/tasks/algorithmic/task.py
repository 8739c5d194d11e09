"""The algorithmic tasks as a `distmem.training.Task`: the Neural GPU (no memory: these tasks need
none) on seeded random instances under the length curriculum, and their sequence accuracy."""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from distmem.memory import Memory
from distmem.models.neural_gpu import NeuralGPU
from distmem.tasks.algorithmic.config import AlgorithmicRunConfig
from distmem.tasks.algorithmic.data import batch, decode, instance_ids, tape_length, vocabulary
from distmem.training import MemorySpec, Schedule


def sequence_accuracy(model: NeuralGPU, cfg: AlgorithmicRunConfig, length: int, instances: int, seed: int,
                      batch_size: int = 64) -> float:
    """The share (%) of `instances` fresh instances of tape length `length` (seeded by `seed`)
    whose every output position the model gets right (greedy)."""
    return 100.0 * sequence_right(model, cfg, length, instances, seed, batch_size) / instances


def sequence_right(model: NeuralGPU, cfg: AlgorithmicRunConfig, length: int, instances: int, seed: int,
                   batch_size: int = 64, part: int = 0, parts: int = 1) -> int:
    """How many of those instances the model gets wholly right; with `parts`, only those in the
    `part`-th of `parts` runs of consecutive batches (the draws stay the same, so the parts' counts
    sum to the whole's)."""
    if not 0 <= part < parts:
        raise ValueError(f"part: expected 0 <= part < parts = {parts}, got {part}")
    rng = np.random.default_rng([seed, length])
    starts = range(0, instances, batch_size)
    first, end = part * len(starts) // parts, (part + 1) * len(starts) // parts
    was_training = model.training
    model.eval()
    right = 0
    for j, start in enumerate(starts[:end]):
        src, tgt = batch(cfg.task, length, min(batch_size, instances - start), rng, cfg.symbols)
        if j >= first:  # the batches before this part's are drawn only to advance the generator
            out, _ = model.greedy(torch.from_numpy(src), length)
            right += int((out == torch.from_numpy(tgt)).all(1).sum())
    model.train(was_training)
    return right


def score_part(run: str, checkpoint: str, averaged: bool, cfg: AlgorithmicRunConfig, item: tuple[int, int],
              parts: int, threads: int = 1) -> tuple[int, float]:
    """One part of the generalisation test, runnable in another process: the model of `run`'s
    `checkpoint` on the `part`-th of `parts` shares of cfg.test_instances instances of item =
    (length, part), seeded by cfg.seed + 2. Returns (instances right, seconds)."""
    started = time.time()
    torch.set_num_threads(threads)
    length, part = item
    model, _ = load_trained(run, checkpoint, averaged, cfg.snap)
    right = sequence_right(model, cfg, length, cfg.test_instances, cfg.seed + 2, part=part, parts=parts)
    return right, time.time() - started


def learning_rate(cfg: AlgorithmicRunConfig, step: int) -> float:
    """The learning rate of `step` (0-based): cosine from cfg.lr at step 0 to cfg.lr_end at the last
    step (constant cfg.lr when lr_end is 0), times cfg.lr_drop from step cfg.lr_drop_at on."""
    rate = cfg.lr
    if cfg.lr_end:
        done = min(step, cfg.steps - 1) / max(cfg.steps - 1, 1)
        rate = cfg.lr_end + 0.5 * (cfg.lr - cfg.lr_end) * (1 + math.cos(math.pi * done))
    return rate * cfg.lr_drop if cfg.lr_drop_at and step >= cfg.lr_drop_at else rate


def extra_steps(cfg: AlgorithmicRunConfig, step: int, length: int) -> int:
    """The steps a training batch of `length` runs beyond its length (--extra-steps), drawn from
    (seed, step): every trainer runs as many, so none waits for another at the all-reduce."""
    if not cfg.extra_steps:
        return 0
    return int(np.random.default_rng([cfg.seed, step, 0, 1]).integers(0, int(cfg.extra_steps * length) + 1))


def saturation_scale(cfg: AlgorithmicRunConfig, ce: float, saturation: float, step: int) -> float:
    """The factor on a step's weighted saturation cost: 1, or with `saturation_share` (from step
    `saturation_share_at` on) at most share x ce / saturation, so the cost stays within that
    share of the cross-entropy. With a fixed weight the cost outgrows the cross-entropy once the
    training lengths are right, and keeps the gates from saturating, which long tapes need to
    hold their values; from the first step, the share stalled the fit (docs/experiments.md)."""
    if not cfg.saturation_share or step < cfg.saturation_share_at or saturation <= 0:
        return 1.0
    return min(1.0, cfg.saturation_share * ce / saturation)


@torch.no_grad()
def clip_relative(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Clip every gradient element to +-factor x the root of Adam's running mean square of that
    element (exp_avg_sq; parameters without one yet are left as they are). Adam divides its first
    moment, a tenth of which is the new gradient, by that root, so a sudden gradient adds at most
    about factor / 10 learning rates to a weight's step, however quiet the gradients were before."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            square = optimizer.state.get(p, {}).get("exp_avg_sq")
            if p.grad is not None and square is not None:
                bound = square.sqrt().mul_(factor)
                torch.minimum(p.grad, bound, out=p.grad)
                torch.maximum(p.grad, -bound, out=p.grad)


AVERAGE = "ema"  # a weight's moving average, kept in the optimizer's state: saved and resumed with Adam's moments


@torch.no_grad()
def update_average(optimizer: torch.optim.Optimizer, decay: float) -> None:
    """avg <- decay * avg + (1 - decay) * weight for every parameter (the weight itself the first time)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if AVERAGE in state:
                state[AVERAGE].lerp_(p, 1 - decay)
            else:
                state[AVERAGE] = p.detach().clone()


def averaged_model(model: NeuralGPU, optimizer: torch.optim.Optimizer) -> NeuralGPU | None:
    """A copy of `model` holding the optimizer's averaged weights; None before the average starts."""
    state = averaged_state(model, optimizer.state_dict())
    if state is None:
        return None
    averaged = copy.deepcopy(model)
    averaged.load_state_dict(state)
    return averaged


def averaged_state(model: NeuralGPU, optimizer_state: dict) -> dict[str, torch.Tensor] | None:
    """`model`'s state dict with its parameters replaced by the averages of a saved optimizer state
    (its parameter ids follow `model.parameters()`); None when the checkpoint has no average."""
    ids = [i for group in optimizer_state["param_groups"] for i in group["params"]]
    names = [name for name, _ in model.named_parameters()]
    saved = optimizer_state["state"]
    if len(ids) != len(names) or not all(AVERAGE in saved.get(i, {}) for i in ids):
        return None
    return {**model.state_dict(), **{name: saved[i][AVERAGE] for name, i in zip(names, ids, strict=True)}}


class AlgorithmicTask:
    """cfg: the run config (its task, model and curriculum)."""

    def __init__(self, cfg: AlgorithmicRunConfig) -> None:
        self.config = cfg
        self.name = f"neural-gpu-{cfg.task}"
        self.optimizer: torch.optim.Optimizer | None = None  # build()'s, whose state holds the weights' average
        self.done = 0  # steps taken (the next eval's step)

    def schedule(self) -> Schedule:
        c = self.config
        return Schedule(steps=c.steps, workers=c.workers, cpus_per_worker=c.cpus_per_worker, log_every=c.log_every,
                        eval_every=c.eval_every, checkpoint_every=c.checkpoint_every, seed=c.seed)

    def memory_spec(self) -> MemorySpec | None:
        return None

    def data(self) -> None:
        return None

    def build(self) -> tuple[NeuralGPU, torch.optim.Optimizer]:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        torch.manual_seed(self.config.seed)
        model = NeuralGPU(self.config.model_config())
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.config.lr)
        return model, self.optimizer

    def batches(self, rank: int, world: int, start: int, rows=None) -> Iterator[tuple]:
        """Step s: a batch (src [B, n], tgt [B, n]) of one length drawn by the curriculum, from a generator
        seeded by (seed, rank, s); with `shared_length` the length comes from (seed, s), the same for every
        trainer. With `bins`: a tuple of batches, one per bin of `Curriculum.bins_at`."""
        c, curriculum = self.config, self.config.curriculum()
        step = start
        while True:
            rng = np.random.default_rng([c.seed, rank, step])
            if c.bins:
                yield tuple(_tensors(batch(c.task, length, c.batch_size, rng, c.symbols, shortest))
                            for shortest, length in curriculum.bins_at(step, c.bins))
            else:
                length = curriculum.length_at(step, np.random.default_rng([c.seed, step]) if c.shared_length else rng)
                yield _tensors(batch(c.task, length, c.batch_size, rng, c.symbols))
            step += 1

    def train_step(self, model: torch.nn.Module, memory: Memory | None, batch: tuple[torch.Tensor, torch.Tensor],
                   optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        c = self.config
        model.train()
        for group in optimizer.param_groups:  # also after a --resume that changed --lr
            group["lr"] = learning_rate(c, step)
        if c.snap_from:
            getattr(model, "module", model).snap_in_training(step >= c.snap_from)
        parts = batch if c.bins else (batch,)
        optimizer.zero_grad()
        ce = saturation = accuracy = sequences = 0.0
        for i, (src, tgt) in enumerate(parts):  # the gradients all-reduce once, at the last part's backward
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
                out = model(src, tgt, extra_steps=extra_steps(c, step, src.shape[1]))
                part_ce, part_saturation = float(out.ce.detach()), float(out.saturation.detach())
                scale = saturation_scale(c, part_ce, part_saturation, step)
                ((out.loss - (1 - scale) * out.saturation) / len(parts)).backward()
            right = out.logits.argmax(-1) == tgt
            ce += part_ce / len(parts)
            saturation += scale * part_saturation / len(parts)
            accuracy += float(right.float().mean()) / len(parts)
            sequences += float(right.all(1).float().mean()) / len(parts)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.clip_norm)
        if c.clip_relative and step >= c.clip_relative_from:
            clip_relative(optimizer, c.clip_relative)
        if c.grad_noise:  # Neelakantan et al.'s annealed noise (the step's seed makes it reproducible)
            std = (c.grad_noise / (1 + step) ** 0.55) ** 0.5
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.add_(torch.randn_like(p.grad) * std)
        optimizer.step()
        if c.ema_from and step >= c.ema_from:
            update_average(optimizer, c.ema_decay)
        self.done = step + 1
        return {"ce": ce, "saturation": saturation, "accuracy": accuracy, "sequence_accuracy": sequences,
                "length": float(src.shape[1]), "grad_norm": float(norm)}

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Sequence accuracy (%) at the longest training length, and at `validation_length` if set (from
        step `validation_from`), on the same fresh instances each time (seed + 1; the generalisation
        test draws from seed + 2); the same for the weights' average ("ema_" keys) once it runs."""
        net = getattr(model, "module", model)
        c = self.config
        scores: dict[str, float] = {}
        averaged = averaged_model(net, self.optimizer) if self.optimizer is not None else None
        for prefix, scored in (("", net), ("ema_", averaged)):
            if scored is None:
                continue
            scores[f"{prefix}sequence_accuracy"] = sequence_accuracy(scored, c, c.max_length, c.eval_instances,
                                                                     seed=c.seed + 1)
            if c.validation_length and self.done >= c.validation_from:
                scores[f"{prefix}validation_accuracy"] = sequence_accuracy(scored, c, c.validation_length,
                                                                           c.eval_instances, seed=c.seed + 1)
                scores["validation_length"] = float(c.validation_length)
        return scores

    def summary(self) -> dict[str, Any]:
        return {}


def _tensors(pair: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(pair[0]), torch.from_numpy(pair[1])


def validation_scores(evals: list[dict[str, float]], saved: set[int], length: int) -> list[tuple[float, int, bool]]:
    """(accuracy, step, averaged) of every model the evals scored at the validation `length` (a resume
    may have changed it) at a `saved` (checkpointed) step: the weights, and their average where kept."""
    return [(e[f"{prefix}validation_accuracy"], int(e["step"]), prefix == "ema_")
            for e in evals if int(e["step"]) in saved and e.get("validation_length", length) == length
            for prefix in ("", "ema_") if f"{prefix}validation_accuracy" in e]


def select_checkpoint(evals: list[dict[str, float]], saved: set[int], length: int,
                      snapped: dict[tuple[int, float], float] | None = None,
                      snap: float = 0.0) -> tuple[int, bool, float] | None:
    """The model to test, as (step, averaged, snap): of the evals at a `saved` (checkpointed) step
    that scored the validation `length` (a resume may have changed it), the best validation accuracy
    of the weights or of their average with the run's `snap`, or of an average with another rounding
    (`snapped`: (step, rounding) -> accuracy on the same instances); on a tie the later step, then the
    average (the steadier), then the run's own rounding, then the smaller; None without such scores."""
    scored = [(accuracy, step, averaged, True, -snap)
              for accuracy, step, averaged in validation_scores(evals, saved, length)]
    if not scored:
        return None
    scored += [(accuracy, step, True, False, -u) for (step, u), accuracy in (snapped or {}).items() if step in saved]
    _, step, averaged, _, negated = max(scored)
    return step, averaged, -negated


def averaged_steps(evals: list[dict[str, float]], saved: set[int], length: int) -> list[int]:
    """The `saved` steps whose weights' average was scored at the validation `length`: the models
    `snap_grid` scores with other roundings."""
    return sorted({step for _, step, averaged in validation_scores(evals, saved, length) if averaged})


def validation_ladder(length: int, longest_trained: int) -> list[int]:
    """The shorter lengths the test's choice falls back to, longest first, where no model scored at
    the validation `length`: its halvings above the training lengths (200, 20 -> [100, 50, 25])."""
    ladder, n = [], length // 2
    while n > longest_trained:
        ladder.append(n)
        n //= 2
    return ladder


def nothing_validated(evals: list[dict[str, float]], saved: set[int], length: int,
                      snapped: dict[tuple[int, float], float] | None = None) -> bool:
    """Whether every `saved` model scored 0 at the validation `length` (weights, averages, roundings),
    so that the validation length says nothing about which one to test."""
    scores = [accuracy for accuracy, _, _ in validation_scores(evals, saved, length)]
    scores += [accuracy for (step, _), accuracy in (snapped or {}).items() if step in saved]
    return not any(scores)


def validate_shorter(evals: list[dict[str, float]], saved: set[int], cfg: AlgorithmicRunConfig,
                     score: Callable[[int, list[tuple[int, bool]]], list[float]]) -> list[dict[str, float]] | None:
    """Where nothing scored at cfg.validation_length: the models its evals scored (the weights, and their
    average where kept) scored at each length of `validation_ladder`, longest first, until one scores
    above 0. `score(length, [(step, averaged)])` gives their accuracies (%). Returns evals at that
    length for `select_checkpoint`, or None where none scores at any."""
    length = cfg.validation_length
    steps = sorted({step for _, step, averaged in validation_scores(evals, saved, length) if not averaged})
    averaged = set(averaged_steps(evals, saved, length))
    items = [(step, False) for step in steps] + [(step, True) for step in steps if step in averaged]
    for shorter in validation_ladder(length, cfg.max_length) if items else []:
        scores = dict(zip(items, score(shorter, items), strict=True))
        if any(scores.values()):
            return [{"step": step, "validation_length": float(shorter), "validation_accuracy": scores[step, False],
                     **({"ema_validation_accuracy": scores[step, True]} if step in averaged else {})}
                    for step in steps]
    return None


def score_validation(run: str, cfg: AlgorithmicRunConfig, threads: int, item: tuple[str, bool, float]) -> float:
    """The validation accuracy (%) of `run`'s checkpoint, or of its weights' average, with the update
    gates rounded by snap, item = (checkpoint, averaged, snap): on the instances every eval scores
    (cfg.eval_instances at cfg.validation_length, seed + 1). Runnable in another process."""
    torch.set_num_threads(threads)
    checkpoint, averaged, snap = item
    model, _ = load_trained(run, checkpoint, averaged, snap)
    return sequence_accuracy(model, cfg, cfg.validation_length, cfg.eval_instances, seed=cfg.seed + 1)


def load_trained(run: str, checkpoint: str | None = None, averaged: bool = False,
                 snap: float | None = None) -> tuple[NeuralGPU, AlgorithmicRunConfig]:
    """The model of a `jobs.neural_gpu` run folder (path or URI) and its config: the checkpoint
    given ("checkpoints/step-0002000"; `averaged`: its weights' moving average), else the one its
    test chose (metrics.json), else the latest; `snap`: the gates' rounding at inference (None: the
    one the test chose with that checkpoint, else the run's config.json, which a --resume may have
    changed, else the checkpoint's). A checkpoint
    that would run code when unpickled is refused (`CheckpointError`)."""
    import json  # noqa: PLC0415

    from distmem import checkpoints  # noqa: PLC0415
    from distmem.cli import from_dict  # noqa: PLC0415
    from distmem.runs import RunStore  # noqa: PLC0415

    store = RunStore(str(run))
    if checkpoint is None and store.exists("metrics.json"):
        tested = json.loads(store.read_text("metrics.json"))
        checkpoint, averaged = tested.get("checkpoint"), bool(tested.get("averaged", False))
        snap = tested.get("snap") if snap is None else snap
    checkpoint = checkpoint or checkpoints.latest(store)
    if checkpoint is None:
        raise FileNotFoundError(f"{run}: not a jobs.neural_gpu run folder (no checkpoint)")
    payload = checkpoints.load(store, checkpoint)
    cfg = from_dict(AlgorithmicRunConfig, payload["config"])
    if snap is None and store.exists("config.json"):
        snap = json.loads(store.read_text("config.json")).get("snap")
    if snap is not None:
        cfg = replace(cfg, snap=snap)
    model = NeuralGPU(cfg.model_config())
    model.load_state_dict(payload["model"])
    if averaged:
        state = averaged_state(model, payload["optimizer"])
        if state is None:
            raise ValueError(f"{run}: {checkpoint} holds no moving average of the weights (run with --ema-from)")
        model.load_state_dict(state)
    return model.eval(), cfg


@torch.no_grad()
def answer(model: NeuralGPU, cfg: AlgorithmicRunConfig, lines: list[str]) -> list[str]:
    """One answer per instance in plain form (`1011+110`; `cab`), each on a tape just long enough."""
    vocab = vocabulary(cfg.task, cfg.symbols)
    out = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        try:
            src, _ = instance_ids(cfg.task, text, tape_length(cfg.task, text), vocab)
        except ValueError as err:
            raise ValueError(f"line {number}: {err}") from None
        tokens, _ = model.greedy(torch.tensor([src]))
        out.append(decode(cfg.task, tokens[0].tolist(), vocab))
    return out
