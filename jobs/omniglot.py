"""Omniglot one-shot classification with the memory (the main job).

    python -m jobs.omniglot                          # default preset, embedded local Ray
    python -m jobs.omniglot --preset quick           # a smoke run (CI)
    python -m jobs.omniglot --mode lifelong --workers 2 --shards 2
    python -m jobs.omniglot --resume runs/omniglot-...   # continue from the latest checkpoint
    python -m jobs.omniglot --storage s3://bucket/runs   # run folders on object storage (pyarrow.fs)

Trains with Ray Train, evaluates the one-shot protocol (5- and 20-way, 1- to 5-shot, 95%
intervals) and writes metrics.json, accuracy.png and checkpoints into the run folder it prints.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from distmem import checkpoints
from distmem.cli import follow, open_run, parse_run_config, user_errors
from distmem.models.omniglot import OmniglotNet
from distmem.plots import line_plot
from distmem.tasks.omniglot import PRESETS, OmniglotRunConfig, OmniglotTask
from distmem.tasks.omniglot.data import load_omniglot, make_split
from distmem.tasks.omniglot.evaluation import embed, evaluate


def plot_curve(curve: list[dict], path: Path, title: str) -> None:
    with line_plot(path, title, "training batch", "5-way accuracy (%) on held-out test classes") as ax:
        for k in range(1, 6):
            ax.plot([c["step"] for c in curve], [c[f"{k}-shot"] for c in curve], marker="o", label=f"{k}-shot")


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_run_config(OmniglotRunConfig, PRESETS, __doc__, argv)
    with user_errors():
        return run(cfg, args)


def run(cfg: OmniglotRunConfig, args) -> dict:
    started = time.time()
    raw = load_omniglot(cfg.data, cfg.cache, progress=True)  # a missing file fails here, before Ray
    store = open_run(cfg, args, name=f"omniglot-{cfg.preset}-{cfg.mode}")

    from distmem.distributed import connect, fit  # imports Ray
    connect(args.address)  # in the main thread: an embedded Ray lives as long as the thread that starts it

    def postfix(state: dict) -> dict[str, str]:
        point = state.get("eval") or {}
        return {"loss": f"{state['loss']:.3f}", **({"5w1s": f"{point['1-shot']:.1f}"} if point else {})}

    memory = follow(store, cfg.batches, f"training ({cfg.mode}, {cfg.workers} worker(s))",
                    lambda: fit(OmniglotTask(cfg, raw), store, args.address, args.memory_storage, args.max_failures),
                    unit="batch", postfix=postfix)
    train_seconds = time.time() - started

    checkpoint = checkpoints.latest(store)
    saved = checkpoints.load(store, checkpoint)
    _, test = make_split(raw, cfg.split)
    net = OmniglotNet(cfg.model_config())
    net.load_state_dict(saved["model"])
    queries = embed(net, test.images)
    results = {str(w): evaluate(queries, test, w, cfg.eval_episodes, seed=cfg.seed + 1) for w in (5, 20)}
    memory_info = None
    if memory is not None:
        state, placement = memory.state(), memory.placement()
        memory_info = {"step": int(state["step"]), "filled": int((state["values"] >= 0).sum()),
                       "size": cfg.memory_size, "shards": cfg.shards,
                       "shard_nodes": len({shard["node"] for shard in placement}),
                       "backend": [shard["backend"] for shard in placement]}  # ivf: trainings, recall checks
        memory.shutdown()
    metrics = {"preset": cfg.preset, "mode": cfg.mode, "split": cfg.split, "workers": cfg.workers,
               "shards": cfg.shards, "batches": saved["step"], "episodes": cfg.eval_episodes,
               "accuracy": results, "wall_seconds": time.time() - started, "train_seconds": train_seconds,
               "curve": saved["evals"], "checkpoint": store.location(checkpoint), "memory": memory_info}
    store.write_text("metrics.json", json.dumps(metrics, indent=1))
    with tempfile.TemporaryDirectory() as tmp:
        plot_curve(saved["evals"], Path(tmp) / "accuracy.png",
                   f"Omniglot {cfg.split} split, {cfg.mode} memory, {cfg.preset} preset")
        store.upload(Path(tmp) / "accuracy.png", "accuracy.png")

    print(f"\nOne-shot accuracy on the {cfg.split} test split ({cfg.mode} memory, {cfg.eval_episodes} episodes, "
          f"% with 95% interval)")
    print(f"{'':8}" + "".join(f"{k}-shot".rjust(15) for k in range(1, 6)))
    for w, acc in results.items():
        print(f"{w + '-way':8}" + "".join(f"{acc[str(k)]['accuracy']:8.1f} ± {acc[str(k)]['ci95']:4.1f}"
                                            for k in range(1, 6)))
    print(f"\nwall time {metrics['wall_seconds']:.0f} s; metrics.json, accuracy.png and checkpoints in {store.uri}")
    return metrics


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
