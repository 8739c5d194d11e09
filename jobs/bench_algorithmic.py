"""Benchmark: training steps per second of the Neural GPU's algorithmic run on Ray Train, each
trainer drawing its own length per step (the presets) against one length shared by all
trainers (`--shared-length on`), side by side.

    python -m jobs.bench_algorithmic                     # the default preset, 2 trainers, 2 rounds
    python -m jobs.bench_algorithmic --steps 300 --rounds 1 --task rev
    python -m jobs.bench_algorithmic --bins 8,12,16,20 --bins-batch 4   # also every length every step

Each round runs the configurations one after the other for `--steps` steps with the curriculum
already at its longest length (lengths drawn uniformly up to it, as in most of a run). A rate is
taken between the first and the last training-curve point (Ray's start-up is left out); the
ratio is the median of the rounds' ratios, so slow drift of the machine cancels. With `--bins`, a
third configuration trains every step on each of those bins (`--bins-batch` instances each),
and its cost is reported as the median ratio of the own-length rate to its rate. `--out FILE`
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

LABELS = {"own": "a length per trainer", "shared": "one shared length", "bins": "every bin every step"}


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
    p.add_argument("--bins", default="", help="also time every-bin steps over these comma-separated lengths")
    p.add_argument("--bins-batch", type=int, default=0, help="instances a bin per trainer (0: the preset's batch)")
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
    configs = {"own": base, "shared": dataclasses.replace(base, shared_length=True)}
    if args.bins:
        configs["bins"] = dataclasses.replace(base, bins=tuple(int(n) for n in args.bins.split(",")),
                                              batch_size=args.bins_batch or base.batch_size)
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for round_ in range(args.rounds):
        for name, cfg in configs.items():
            with tempfile.TemporaryDirectory() as tmp:
                rate = steps_per_second(cfg, tmp)
            rates[name].append(rate)
            print(f"round {round_ + 1}: {LABELS[name]:>22}: {rate:.2f} steps/s", flush=True)
    ratio = statistics.median(s / o for s, o in zip(rates["shared"], rates["own"]))
    result = {"preset": args.preset, "task": args.task, "workers": args.workers, "steps": args.steps,
              "steps_per_second": rates, "speedup_shared_length": ratio}
    lengths = f"{base.curriculum().shortest}..{base.max_length}"
    print(f"\n{args.task}, preset {args.preset}, {args.workers} trainers, lengths {lengths}: "
          f"{statistics.median(rates['own']):.2f} steps/s with a length per trainer, "
          f"{statistics.median(rates['shared']):.2f} with one shared length: {ratio:.2f}x")
    if args.bins:
        result["bins_step_cost"] = statistics.median(o / b for o, b in zip(rates["own"], rates["bins"]))
        print(f"every step over lengths {args.bins} ({configs['bins'].batch_size} instances each): "
              f"{statistics.median(rates['bins']):.2f} steps/s, a step {result['bins_step_cost']:.2f}x the cost of "
              f"one drawn length")
    write_results(args, "bench-algorithmic", result)
    return result


if __name__ == "__main__":
    main()
