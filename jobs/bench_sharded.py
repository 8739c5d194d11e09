"""Benchmark: ShardedMemory step time for 1, 2 and 4 shards against LocalMemory, bytes moved per
step, and the resident memory of a large sharded memory.

    python -m jobs.bench_sharded                         # N=1M, d=128, B=1024, k=256
    python -m jobs.bench_sharded --scale-size 4000000    # also a 4M-slot memory's RSS

Times are medians of `--repeats` steps, measured side by side in one run on the same batch and
the same filled memory. `--out FILE` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os

import ray
import torch
import torch.nn.functional as F

from distmem import LocalMemory, MemoryConfig, ShardedMemory
from jobs.bench_memory import filled_state, median_time


def rss_gib(pids: list[int]) -> float:
    """Resident memory of processes on this machine (Linux /proc), GiB."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
    return total / 2**30


def set_threads(n: int) -> None:
    import faiss
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--shards", default="1,2,4")
    p.add_argument("--backend", default="faiss")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scale-size", type=int, default=0, help="also build a memory of this many slots (4 shards)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    cfg = MemoryConfig(size=args.size, key_dim=args.dim, k=args.k)
    state = filled_state(args.size, args.dim, classes=args.size // 4, seed=0)
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(args.batch, args.dim, generator=g), dim=1)
    labels = torch.randint(0, args.size // 4, (args.batch,), generator=g)
    results: dict = {"config": vars(args), "sharded": {}}
    print(f"N={args.size:,} d={args.dim} B={args.batch} k={args.k} backend={args.backend} cores={os.cpu_count()}")

    local = LocalMemory(cfg, backend=args.backend, device="cpu")
    local.load_state(state)
    local.step(q, labels)
    base = median_time(lambda: local.step(q, labels), args.repeats, sync=False)
    results["local_step_s"] = base
    print(f"{f'LocalMemory ({torch.get_num_threads()} threads)':<22} step {base * 1e3:8.1f} ms   ratio 1.00")
    threads = torch.get_num_threads()
    set_threads(1)  # the share of the machine one shard of two gets
    one = median_time(lambda: local.step(q, labels), args.repeats, sync=False)
    set_threads(threads)
    results["local_step_1_thread_s"] = one
    print(f"{'LocalMemory (1 thread)':<22} step {one * 1e3:8.1f} ms   ratio {one / base:.2f}")
    del local

    for n in (int(s) for s in args.shards.split(",")):
        mem = ShardedMemory(cfg, n, backend=args.backend, snapshot_every=10**9)
        mem.load_state(state)
        mem.step(q, labels)
        t = median_time(lambda: mem.step(q, labels), args.repeats, sync=False)
        moved = mem.traffic["read_bytes"] + mem.traffic["write_bytes"]
        results["sharded"][n] = {"step_s": t, "ratio_to_local": t / base, "bytes_per_step": moved,
                                 **mem.traffic}
        print(f"{f'ShardedMemory x{n}':<22} step {t * 1e3:8.1f} ms   ratio {t / base:.2f}   "
              f"moved {moved / 2**20:6.1f} MiB/step (read {mem.traffic['read_bytes'] / 2**20:.1f}, "
              f"write {mem.traffic['write_bytes'] / 2**20:.1f})")
        mem.shutdown()
    del state

    if args.scale_size:
        big = MemoryConfig(size=args.scale_size, key_dim=args.dim, k=args.k)
        mem = ShardedMemory(big, 4, backend=args.backend, snapshot_every=10**9)
        for shard, (lo, hi) in zip(mem.shards, mem.ranges):  # fill each shard with random keys
            part = filled_state(hi - lo, args.dim, classes=args.scale_size // 4, seed=lo)
            ray.get(shard.load_state.remote({**part, "step": torch.tensor(0)}))
        ray.get(mem._coordinator.resync.remote())
        mem.step(q, labels)
        t = median_time(lambda: mem.step(q, labels), max(1, args.repeats - 1), sync=False)
        pids = [ray.get(s.info.remote())["pid"] for s in mem.shards]
        raw = args.scale_size * args.dim * 4 / 2**30
        shard_rss = rss_gib(pids)
        mem.shutdown()
        tiny = ShardedMemory(MemoryConfig(size=8, key_dim=args.dim, k=2), 4, backend=args.backend)
        tiny.step(q[:4], labels[:4])  # same imports and code paths, no keys to speak of
        baseline = rss_gib([ray.get(s.info.remote())["pid"] for s in tiny.shards])
        tiny.shutdown()
        results["scale"] = {"size": args.scale_size, "step_s": t, "raw_keys_gib": raw, "shards_rss_gib": shard_rss,
                            "idle_shards_rss_gib": baseline}
        print(f"ShardedMemory N={args.scale_size:,} x4: step {t * 1e3:.1f} ms; raw keys {raw:.2f} GiB; shard "
              f"processes RSS {shard_rss:.2f} GiB, of which {baseline:.2f} GiB is 4 idle processes (torch, faiss, "
              f"Ray): {shard_rss - baseline:.2f} GiB for the memory ({(shard_rss - baseline) / raw:.2f}x raw)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
