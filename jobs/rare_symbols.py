"""The rare-symbol task: a GNMT-style model with a life-long memory against the same model without.

    python -m jobs.rare_symbols                      # default preset, embedded local Ray
    python -m jobs.rare_symbols --preset quick       # a smoke run (CI)
    python -m jobs.rare_symbols --workers 4 --shards 4 --steps 4000   # any number of trainers and shards
    python -m jobs.rare_symbols --resume runs/rare-symbols-...   # continue from the latest checkpoints
    python -m jobs.rare_symbols --model neural_gpu   # the Extended Neural GPU (its preset: neural_gpu)

Trains both models on the seeded life-long stream with Ray Train (the memory model's memory is a
`ShardedMemory`, never emptied), then plays the test protocol (rare test symbols never seen in
training: a context, `gap` steps of traffic, a probe) for both, prints a table and writes
metrics.json and recall.png (rare-symbol 1-shot accuracy against the gap) into the run folder.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from distmem import LocalMemory, checkpoints
from distmem.cli import follow, open_run, parse_run_config, user_errors
from distmem.plots import line_plot
from distmem.runs import RunStore
from distmem.tasks.rare_symbols import PRESETS, RareSymbolRunConfig, RareSymbolsTask
from distmem.tasks.rare_symbols.data import ProbeStream
from distmem.tasks.rare_symbols.protocol import run_protocol

VARIANTS = {"memory": True, "baseline": False}  # sub-folder -> use_memory


def trained_memory(cfg: RareSymbolRunConfig, store: RunStore, checkpoint: str) -> LocalMemory:
    """The life-long memory saved with `checkpoint`, as one `LocalMemory` in this process: the test
    protocol writes into it step by step (faster here than through the shards' actors); the
    checkpoint itself stays as it was."""
    memory = LocalMemory(cfg.memory_config(), backend=cfg.backend)
    checkpoints.restore_memory(memory, store, checkpoint)
    return memory


def plot_recall(results: dict, path: Path, title: str) -> None:
    with line_plot(path, title, "gap between the context and the probe (training-stream steps)", "accuracy (%)",
                   legend_size=7) as ax:
        for variant, style in (("memory", "o-"), ("baseline", "s--")):
            gaps = sorted(int(g) for g in results[variant])
            ax.plot(gaps, [results[variant][str(g)]["rare_accuracy"] for g in gaps], style,
                    label=f"{'with' if variant == 'memory' else 'without'} memory: rare test symbols (1-shot)")
            ax.plot(gaps, [results[variant][str(g)]["frequent_accuracy"] for g in gaps], style, alpha=0.35,
                    label=f"{'with' if variant == 'memory' else 'without'} memory: frequent symbols")
        ax.set_xscale("log")
        ax.set_ylim(-3, 103)


def with_model_preset(argv: list[str]) -> list[str]:
    """`--model neural_gpu` without --preset (or --resume) starts from the neural_gpu preset: the
    default preset's sizes are the seq2seq model's."""
    wants_ngpu = any(a == "--model=neural_gpu" or (a == "--model" and b == "neural_gpu")
                     for a, b in zip(argv, argv[1:] + [""]))
    if wants_ngpu and not any(a.startswith("--preset") or a.startswith("--resume") for a in argv):
        return ["--preset", "neural_gpu", *argv]
    return argv


def main(argv: list[str] | None = None) -> dict:
    argv = with_model_preset(list(sys.argv[1:] if argv is None else argv))
    cfg, args = parse_run_config(RareSymbolRunConfig, PRESETS, __doc__, argv)
    with user_errors():
        return run(cfg, args)


def run(cfg: RareSymbolRunConfig, args) -> dict:
    started = time.time()
    store = open_run(cfg, args, name=f"rare-symbols-{cfg.preset}")

    from distmem.distributed import connect, fit  # imports Ray
    connect(args.address)  # in the main thread: an embedded Ray lives as long as the thread that starts it

    backend_stats: dict[str, list] = {}

    def train(sub: RunStore, use_memory: bool) -> None:
        memory = fit(RareSymbolsTask(cfg, use_memory), sub, args.address, args.memory_storage, args.max_failures)
        if memory is not None:  # saved with every checkpoint; the protocol reads the last one
            backend_stats["training"] = [shard["backend"] for shard in memory.placement()]
            # saved now as well: the test protocol can take long, and these figures are the training's
            sub.write_text("memory_backend.json", json.dumps(backend_stats["training"], indent=1))
            memory.shutdown()

    trained: dict[str, dict] = {}
    latest: dict[str, str] = {}
    for variant, use_memory in VARIANTS.items():
        sub = RunStore(store.location(variant))
        follow(sub, cfg.steps, f"training {'with' if use_memory else 'without'} memory",
               lambda sub=sub, use_memory=use_memory: train(sub, use_memory),
               postfix=lambda s: {"ce": f"{s['ce']:.2f}", "acc": f"{s['accuracy']:.3f}"})
        latest[variant] = checkpoints.latest(sub)
        trained[variant] = checkpoints.load(sub, latest[variant])
    train_seconds = time.time() - started

    task = cfg.task()
    stream = ProbeStream(task, cfg.batch_size, cfg.gaps,
                        symbols_per_gap=cfg.symbols_per_gap or None)
    results: dict[str, dict] = {}
    protocol_seconds: dict[str, float] = {}
    for variant, use_memory in VARIANTS.items():
        t0 = time.time()
        model = cfg.build_model(use_memory)
        model.load_state_dict(trained[variant]["model"])
        memory = trained_memory(cfg, RunStore(store.location(variant)), latest[variant]) if use_memory else None
        with tqdm(total=len(stream), desc=f"test protocol ({variant})", unit="step",
                  mininterval=1.0 if sys.stderr.isatty() else 30.0) as bar:
            results[variant] = run_protocol(model, memory, task, stream, progress=lambda n: bar.update(n - bar.n))
        if memory is not None:
            backend_stats["protocol"] = memory.backend.stats()
        protocol_seconds[variant] = time.time() - t0

    metrics = {"preset": cfg.preset, "workers": cfg.workers, "shards": cfg.shards, "steps": cfg.steps,
               "batch_size": cfg.batch_size, "memory_size": cfg.memory_size, "gaps": list(cfg.gaps),
               "probes_per_gap": {g: r["probes"] for g, r in results["memory"].items()},
               "results": results, "wall_seconds": time.time() - started, "train_seconds": train_seconds,
               "protocol_seconds": protocol_seconds,
               "rare_training_symbols_used_up_at_step": trained["memory"]["summary"].get("rare_exhausted_at"),
               "memory_gain": (math.exp(float(trained["memory"]["model"]["memory_log_gain"]))
                               if "memory_log_gain" in trained["memory"]["model"] else None),
               "curves": {variant: t["curve"] for variant, t in trained.items()},
               "memory_backend": backend_stats}  # ivf: trainings and the recall checks over the run
    store.write_text("metrics.json", json.dumps(metrics, indent=1))
    with tempfile.TemporaryDirectory() as tmp:
        plot_recall(results, Path(tmp) / "recall.png", f"Rare-symbol task, {cfg.preset} preset")
        store.upload(Path(tmp) / "recall.png", "recall.png")

    print(f"\nRare-symbol task ({cfg.preset} preset): accuracy on probes, % "
          f"({metrics['probes_per_gap']} probes per gap)")
    print(f"{'gap':>6} | {'with memory: rare 1-shot [95% CI]':>33} {'frequent':>9} {'exact seq':>9} | "
          f"{'without: rare':>13} {'frequent':>9} {'exact seq':>9}")
    for gap in results["memory"]:
        m, b = results["memory"][gap], results["baseline"][gap]
        lo, hi = m["rare_ci95"]
        print(f"{gap:>6} | {m['rare_accuracy']:19.1f} [{lo:5.1f}, {hi:5.1f}] {m['frequent_accuracy']:9.1f} "
              f"{m['exact_sequences']:9.1f} | {b['rare_accuracy']:13.1f} {b['frequent_accuracy']:9.1f} "
              f"{b['exact_sequences']:9.1f}")
    print(f"\nwall time {metrics['wall_seconds']:.0f} s (training {train_seconds:.0f} s); metrics.json and "
          f"recall.png in {store.uri}")
    return metrics


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
