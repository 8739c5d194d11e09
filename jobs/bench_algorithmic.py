"""Benchmark: training steps per second of the Neural GPU's algorithmic run on Ray Train, each
trainer drawing its own length per step (the presets) against one length shared by all
trainers (`--shared-length on`), side by side.

    python -m jobs.bench_algorithmic                     # the default preset, 2 trainers, 2 rounds
    python -m jobs.bench_algorithmic --steps 300 --rounds 1 --task rev

Each round runs both configurations one after the other for `--steps` steps with the curriculum
already at its longest length (lengths drawn uniformly up to it, as in most of a run). A rate is
taken between the first and the last training-curve point (Ray's start-up is left out); the
ratio is the median of the rounds' ratios, so slow drift of the machine cancels. `--out FILE`
writes the figures as JSON, `--storage DIR|URI` into a run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile

from distmem import checkpoints
from distmem.runs import RunStore
from distmem.tasks.algorithmic import PRESETS, AlgorithmicRunConfig, AlgorithmicTask
from jobs.bench_memory import write_results


def steps_per_second(cfg: AlgorithmicRunConfig, folder: str) -> float:
    from distmem.distributed import fit  # imports Ray
    store = RunStore(folder)
    fit(AlgorithmicTask(cfg), store)
    curve = checkpoints.load(store, checkpoints.latest(store))["curve"]
    first, last = curve[0], curve[-1]
    return (last["step"] - first["step"]) / (last["seconds"] - first["seconds"])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--task", default="badd")
    p.add_argument("--steps", type=int, default=500, help="steps per configuration per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    p.add_argument("--storage", default=None, help="a folder or URI: results.json in a new run folder there")
    args = p.parse_args(argv)
    if args.steps < 100 or args.rounds < 1 or args.workers < 1:
        p.error("--steps: expected >= 100; --rounds, --workers: expected >= 1")
    base = AlgorithmicRunConfig(**{**PRESETS[args.preset], "preset": args.preset, "task": args.task,
                                   "workers": args.workers, "steps": args.steps, "eval_every": 0,
                                   "checkpoint_every": args.steps, "log_every": 50})
    base = dataclasses.replace(base, curriculum_start=base.max_length)
    from distmem.distributed import connect  # imports Ray
    connect(None)
    rates: dict[str, list[float]] = {"own": [], "shared": []}
    for round_ in range(args.rounds):
        for name in rates:
            with tempfile.TemporaryDirectory() as tmp:
                rate = steps_per_second(dataclasses.replace(base, shared_length=name == "shared"), tmp)
            rates[name].append(rate)
            print(f"round {round_ + 1}: {name:>6} length per step: {rate:.2f} steps/s", flush=True)
    ratio = statistics.median(s / o for s, o in zip(rates["shared"], rates["own"]))
    result = {"preset": args.preset, "task": args.task, "workers": args.workers, "steps": args.steps,
              "steps_per_second": rates, "speedup_shared_length": ratio}
    lengths = f"{base.curriculum().shortest}..{base.max_length}"
    print(f"\n{args.task}, preset {args.preset}, {args.workers} trainers, lengths {lengths}: "
          f"{statistics.median(rates['own']):.2f} steps/s with a length per trainer, "
          f"{statistics.median(rates['shared']):.2f} with one shared length: {ratio:.2f}x")
    write_results(args, "bench-algorithmic", result)
    return result


if __name__ == "__main__":
    main()
