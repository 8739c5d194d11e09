"""The Neural GPU on an algorithmic task (badd, bmul, rev, copy, sort), trained on lengths up to
20 under a curriculum, then tested on much longer instances: the generalisation it is known for.

    python -m jobs.neural_gpu                        # badd, default preset, embedded local Ray
    python -m jobs.neural_gpu --task rev             # another task
    python -m jobs.neural_gpu --preset quick         # a smoke run (CI)
    python -m jobs.neural_gpu --resume runs/neural-gpu-badd-...   # continue from the latest checkpoint

Trains with Ray Train (data-parallel trainers, no memory: these tasks need none), then measures
sequence accuracy (every output symbol right) on fresh instances at each test length. Prints a
table; writes metrics.json and generalisation.png (accuracy against length) into the run folder.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from distmem import checkpoints
from distmem.cli import follow, open_run, parse_run_config, user_errors
from distmem.plots import line_plot
from distmem.tasks.algorithmic import PRESETS, AlgorithmicRunConfig, AlgorithmicTask
from distmem.tasks.algorithmic.task import (
    averaged_steps,
    load_trained,
    nothing_validated,
    score_part,
    score_validation,
    select_checkpoint,
    validate_shorter,
)


def plot_generalisation(accuracy: dict[int, float], path: Path, title: str, trained_to: int) -> None:
    with line_plot(path, title, "instance length (tape positions)", "sequence accuracy (%)") as ax:
        lengths = sorted(accuracy)
        ax.plot(lengths, [accuracy[n] for n in lengths], "o-", label="fresh instances")
        ax.axvline(trained_to, color="grey", linestyle=":", label=f"longest training length ({trained_to})")
        ax.set_xscale("log")
        ax.set_xticks(lengths, [str(n) for n in lengths])  # the test's lengths, not log-scale minor labels
        ax.minorticks_off()
        ax.set_ylim(-3, 103)


def score_snap_grid(store, cfg: AlgorithmicRunConfig, evals: list[dict], saved: dict[int, str],
                    cpus: int) -> dict[tuple[int, float], float]:
    """Validation accuracy of every validated weights' average with each rounding of cfg.snap_grid
    (but the run's own, which its evals scored): (step, rounding) -> %, one Ray task each."""
    from distmem.distributed import map_tasks  # imports Ray

    items = [(step, u) for step in averaged_steps(evals, set(saved), cfg.validation_length)
             for u in cfg.snap_grid if u != cfg.snap]
    if not items:
        return {}
    started = time.time()
    scores = map_tasks(partial(score_validation, store.uri, cfg, cpus), [(saved[step], True, u) for step, u in items],
                       cpus=cpus, desc="roundings on validation")
    print(f"{len(items)} roundings of the averages scored at validation length {cfg.validation_length} "
          f"in {time.time() - started:.0f} s")
    return dict(zip(items, scores, strict=True))


def score_shorter(store, cfg: AlgorithmicRunConfig, saved: dict[int, str], cpus: int):
    """`validate_shorter`'s scorer: (length, [(step, averaged)]) -> % on cfg's validation instances at
    that length with the run's rounding, one Ray task each."""
    from distmem.distributed import map_tasks  # imports Ray

    def score(length: int, items: list[tuple[int, bool]]) -> list[float]:
        at = replace(cfg, validation_length=length)
        return map_tasks(partial(score_validation, store.uri, at, cpus), [(saved[s], a, cfg.snap) for s, a in items],
                         cpus=cpus, desc=f"nothing right at {cfg.validation_length}: validation at {length}")
    return score


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_run_config(AlgorithmicRunConfig, PRESETS, __doc__, argv)
    with user_errors():
        return run(cfg, args)


def run(cfg: AlgorithmicRunConfig, args) -> dict:
    started = time.time()
    store = open_run(cfg, args, name=f"neural-gpu-{cfg.task}")
    from distmem.distributed import connect, fit, map_tasks  # imports Ray
    connect(args.address)  # in the main thread: an embedded Ray lives as long as the thread that starts it
    follow(store, cfg.steps, f"training the Neural GPU on {cfg.task}",
           lambda: fit(AlgorithmicTask(cfg), store, args.address, max_failures=args.max_failures),
           postfix=lambda s: {"ce": f"{s['ce']:.3f}", "len": int(s["length"]), "seq": f"{s['sequence_accuracy']:.2f}"})
    trained = checkpoints.load(store, checkpoints.latest(store))
    # the workers' training time over every --resume (this process's time counts only its own part)
    train_seconds = float(trained.get("seconds", time.time() - started))
    # the model to test: the best at the validation length (fresh instances the test never draws), else the last
    saved = {step: name for step in {int(e["step"]) for e in trained["evals"]}
             if (name := checkpoints.at_step(store, step))}
    parts, cpus = cfg.workers, max(1, cfg.cpus_per_worker)  # the trainers' CPUs are free now
    snapped = score_snap_grid(store, cfg, trained["evals"], saved, cpus)
    chosen = select_checkpoint(trained["evals"], set(saved), cfg.validation_length, snapped, cfg.snap)
    chosen_at, shorter = cfg.validation_length, None
    if chosen is not None and nothing_validated(trained["evals"], set(saved), cfg.validation_length, snapped):
        shorter = validate_shorter(trained["evals"], set(saved), cfg, score_shorter(store, cfg, saved, cpus))
        if shorter:  # the model that runs furthest, with the run's own rounding
            chosen_at = int(shorter[0]["validation_length"])
            chosen = select_checkpoint(shorter, set(saved), chosen_at, None, cfg.snap)
    tested_step, averaged, snap = chosen if chosen is not None else (trained["step"], False, cfg.snap)
    checkpoint = saved[tested_step] if chosen is not None else checkpoints.latest(store)
    tested = replace(cfg, snap=snap)
    # a checkpoint that cannot be tested fails here, not in a task
    load_trained(store.uri, checkpoint, averaged, snap)
    # each length in as many parts as there were trainers; the longest first
    items = [(length, part) for length in sorted(set(cfg.test_lengths), reverse=True) for part in range(parts)]
    t0 = time.time()
    scored = map_tasks(partial(score_part, store.uri, checkpoint, averaged, tested, parts=parts, threads=cpus),
                       items, cpus=cpus, desc="generalisation test")
    test_seconds = time.time() - t0
    accuracy = {n: 100.0 * sum(right for (length, _), (right, _) in zip(items, scored) if length == n)
                / cfg.test_instances for n in cfg.test_lengths}
    seconds = {n: max(s for (length, _), (_, s) in zip(items, scored) if length == n) for n in cfg.test_lengths}
    perfect = [n for n in sorted(accuracy) if accuracy[n] == 100.0]
    metrics = {"preset": cfg.preset, "task": cfg.task, "config": vars(cfg), "steps": cfg.steps,
               "sequence_accuracy": accuracy, "test_instances": cfg.test_instances, "test_seconds": seconds,
               "test_wall_seconds": test_seconds,
               "longest_perfect_length": max(perfect) if perfect else None, "checkpoint": checkpoint,
               "averaged": averaged, "snap": snap,
               "snap_validation": [{"step": step, "snap": u, "validation_accuracy": acc}
                                   for (step, u), acc in sorted(snapped.items())],
               "chosen_at_length": chosen_at if chosen is not None else None, "shorter_validation": shorter,
               "wall_seconds": time.time() - started, "train_seconds": train_seconds,
               "resumed": bool(args.resume),
               "curve": trained["curve"], "evals": trained["evals"]}
    store.write_text("metrics.json", json.dumps(metrics, indent=1, default=list))
    with tempfile.TemporaryDirectory() as tmp:
        plot_generalisation(accuracy, Path(tmp) / "generalisation.png",
                            f"Neural GPU, {cfg.task}: {tested_step} steps"
                            f"{', the weights average' if averaged else ''}", cfg.max_length)
        store.upload(Path(tmp) / "generalisation.png", "generalisation.png")
    print(f"\n{cfg.task}: sequence accuracy on {cfg.test_instances} fresh instances per length "
          f"(trained on lengths <= {cfg.max_length}; {checkpoint}{' (its weights average)' if averaged else ''}"
          f"{f', update gates within {snap} of 0 or 1 rounded' if snap else ''}"
          f"{f', the best at validation length {chosen_at}' if chosen is not None else ''}"
          f"{f' (none right at {cfg.validation_length})' if shorter else ''})")
    for length in sorted(accuracy):
        print(f"  length {length:>5}: {accuracy[length]:6.2f}%   ({seconds[length]:.0f} s, its longest part)")
    print(f"test: {test_seconds:.0f} s ({parts} parts a length, run side by side)")
    print(f"\nwall time {metrics['wall_seconds']:.0f} s{' (this resumed part)' if args.resume else ''}; training "
          f"{train_seconds:.0f} s; metrics.json and "
          f"generalisation.png in {store.uri}")
    return metrics


if __name__ == "__main__":
    main()
