"""Benchmark: one memory `step` per backend against a bare faiss IndexFlatIP search.

    python -m jobs.bench_memory                      # N=1M, d=128, B=1024, k=256 on CPU
    python -m jobs.bench_memory --device cuda        # the same on a GPU

Prints the median time of each and the median over rounds of the ratio step / bare search; each
round times every line once, in one process on the same batch, so drift of the machine cancels.
`--out FILE` also writes the figures as JSON; `--storage DIR|URI` into a new run folder there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from distmem import LocalMemory, MemoryConfig
from distmem.runs import RunStore


def median_time(fn: Callable[[], object], repeats: int, sync: bool) -> float:
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(runs: dict[str, Callable[[], object]], rounds: int, sync: bool = False) -> dict[str, dict]:
    """Time every run once per round, after one warm-up each. Returns per run the median time and
    the median over rounds of its ratio to the first run (so drift of the machine cancels)."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(median_time(fn, 1, sync))
    base = next(iter(times.values()))
    return {name: {"median_s": statistics.median(ts), "ratio": statistics.median(t / b for t, b in zip(ts, base)),
                   "times_s": ts} for name, ts in times.items()}


def write_results(args: argparse.Namespace, name: str, results: dict) -> None:
    """--out FILE: the figures as JSON; --storage DIR|URI: results.json in a new run folder there."""
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    if args.storage:
        store = RunStore(f"{args.storage.rstrip('/')}/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        store.write_text("results.json", json.dumps(results, indent=2))
        print(f"results in {store.uri}/results.json")


def filled_state(size: int, dim: int, classes: int, seed: int) -> dict[str, torch.Tensor]:
    """A full memory of random unit keys: the steady state of a long run."""
    g = torch.Generator().manual_seed(seed)
    return {"keys": F.normalize(torch.randn(size, dim, generator=g), dim=1),
            "values": torch.randint(0, classes, (size,), generator=g),
            "ages": torch.randint(0, 10_000, (size,), generator=g)}


def problem_parser(description: str | None) -> argparse.ArgumentParser:
    """Arguments shared by the benchmarks: the memory and batch shape."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    p.add_argument("--storage", default=None, help="a folder or URI (s3://, gs://): results.json in a new run "
                                                   "folder there, so results outlive a cluster")
    return p


def problem(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(a filled memory state, unit queries [B, d], labels [B]) for the benchmark's shape."""
    state = filled_state(args.size, args.dim, classes=args.size // 4, seed=0)
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(args.batch, args.dim, generator=g), dim=1)
    return state, q, torch.randint(0, args.size // 4, (args.batch,), generator=g)


def main(argv: list[str] | None = None) -> dict:
    p = problem_parser(__doc__)
    p.add_argument("--repeats", type=int, default=5, help="rounds")
    p.add_argument("--backends", default="torch,faiss")
    p.add_argument("--device", default="cpu")
    p.add_argument("--key-dtype", default="float32")
    args = p.parse_args(argv)

    import faiss  # the reference every backend is compared with

    device = torch.device(args.device)
    sync = device.type == "cuda"
    state, q, labels = problem(args)

    index = faiss.IndexFlatIP(args.dim)
    index.add(state["keys"].numpy())
    xq, keys_np = q.numpy(), state["keys"].numpy()
    runs = {"bare faiss IndexFlatIP.search": lambda: index.search(xq, args.k),
            "bare faiss.knn (its kernel)": lambda: faiss.knn(xq, keys_np, args.k, metric=faiss.METRIC_INNER_PRODUCT)}
    memories = {}
    for name in args.backends.split(","):
        cfg = MemoryConfig(size=args.size, key_dim=args.dim, k=args.k, key_dtype=args.key_dtype)
        memories[name] = LocalMemory(cfg, backend=name, device=device)
        memories[name].load_state(state)
        qd, yd = q.to(device), labels.to(device)
        runs[f"LocalMemory.step backend={name}"] = lambda m=memories[name], qd=qd, yd=yd: m.step(qd, yd)
    print(f"N={args.size:,} d={args.dim} B={args.batch} k={args.k} threads={torch.get_num_threads()} "
          f"device={device} rounds={args.repeats} (each round times every line once)")
    results = {"config": vars(args), "runs": interleaved(runs, args.repeats, sync)}
    for name, row in results["runs"].items():
        print(f"{name:<36} {row['median_s'] * 1e3:9.1f} ms   ratio {row['ratio']:.2f}")
    write_results(args, "bench-memory", results)
    return results


if __name__ == "__main__":
    main()
