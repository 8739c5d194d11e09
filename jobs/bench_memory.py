"""Benchmark: one memory `step` per backend against a bare faiss IndexFlatIP search.

    python -m jobs.bench_memory                      # N=1M, d=128, B=1024, k=256 on CPU
    python -m jobs.bench_memory --device cuda        # the same on a GPU

Prints the median time of each and the ratio step / bare search, measured side by side in one
process on the same batch. `--out FILE` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from distmem import LocalMemory, MemoryConfig


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


def filled_state(size: int, dim: int, classes: int, seed: int) -> dict[str, torch.Tensor]:
    """A full memory of random unit keys: the steady state of a long run."""
    g = torch.Generator().manual_seed(seed)
    return {"keys": F.normalize(torch.randn(size, dim, generator=g), dim=1),
            "values": torch.randint(0, classes, (size,), generator=g),
            "ages": torch.randint(0, 10_000, (size,), generator=g)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", default="torch,faiss")
    p.add_argument("--device", default="cpu")
    p.add_argument("--key-dtype", default="float32")
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)

    import faiss  # the reference every backend is compared with

    device = torch.device(args.device)
    sync = device.type == "cuda"
    state = filled_state(args.size, args.dim, classes=args.size // 4, seed=0)
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(args.batch, args.dim, generator=g), dim=1)
    labels = torch.randint(0, args.size // 4, (args.batch,), generator=g)

    index = faiss.IndexFlatIP(args.dim)
    index.add(state["keys"].numpy())
    xq = q.numpy()
    index.search(xq, args.k)  # warm-up
    bare = median_time(lambda: index.search(xq, args.k), args.repeats, sync=False)
    del index
    keys_np = state["keys"].numpy()
    bare_knn = median_time(lambda: faiss.knn(xq, keys_np, args.k, metric=faiss.METRIC_INNER_PRODUCT),
                           args.repeats, sync=False)
    print(f"N={args.size:,} d={args.dim} B={args.batch} k={args.k} threads={torch.get_num_threads()} "
          f"device={device}")
    print(f"{'bare faiss IndexFlatIP.search':<34} {bare * 1e3:9.1f} ms   ratio 1.00")
    print(f"{'bare faiss.knn (brute-force kernel)':<34} {bare_knn * 1e3:9.1f} ms   ratio {bare_knn / bare:.2f}")
    results = {"config": vars(args), "bare_faiss_search_s": bare, "bare_faiss_knn_s": bare_knn, "backends": {}}
    for name in args.backends.split(","):
        cfg = MemoryConfig(size=args.size, key_dim=args.dim, k=args.k, key_dtype=args.key_dtype)
        memory = LocalMemory(cfg, backend=name, device=device)
        memory.load_state(state)
        qd, yd = q.to(device), labels.to(device)
        memory.step(qd, yd)  # warm-up
        step = median_time(lambda: memory.step(qd, yd), args.repeats, sync)
        read = median_time(lambda: memory.read(qd, yd), args.repeats, sync)
        results["backends"][name] = {"step_s": step, "read_s": read, "ratio_to_bare_faiss": step / bare}
        print(f"{'LocalMemory.step backend=' + name:<34} {step * 1e3:9.1f} ms   ratio {step / bare:.2f}"
              f"   (read alone {read * 1e3:.1f} ms)")
        del memory
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
