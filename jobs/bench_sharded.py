"""Benchmark: ShardedMemory step time for 1, 2 and 4 shards against LocalMemory, bytes moved per
step, and the resident memory of a large sharded memory.

    python -m jobs.bench_sharded                         # N=1M, d=128, B=1024, k=256
    python -m jobs.bench_sharded --scale-size 4000000    # also a 4M-slot memory's RSS

All memories are built first, then each round times one step of every configuration in turn on
the same batch and the same filled memory; ratios are medians of the per-round ratios, so slow
drift of the machine cancels. `--out FILE` writes the figures as JSON, `--storage DIR|URI` into a run folder.
"""

from __future__ import annotations

import os
import statistics

import ray
import torch

from distmem import LocalMemory, MemoryConfig, ShardedMemory
from distmem.backends import import_faiss
from jobs.bench_memory import filled_state, interleaved, median_time, problem, problem_parser, write_results


def rss_gib(pids: list[int]) -> dict[str, float]:
    """Private (RssAnon + RssFile) and shared (RssShmem: Ray object-store pages) resident memory, GiB."""
    out = {"private": 0.0, "shared": 0.0}
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 / 2**30 for line in f if line.startswith("Rss")}
        out["private"] += fields["RssAnon"] + fields["RssFile"]
        out["shared"] += fields["RssShmem"]
    return out


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    import_faiss().omp_set_num_threads(n)


def timed(fn) -> float:
    return median_time(fn, 1, sync=False)


def main(argv: list[str] | None = None) -> dict:
    p = problem_parser(__doc__)
    p.add_argument("--shards", default="1,2,4")
    p.add_argument("--backend", default="faiss")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--scale-size", type=int, default=0, help="also build a memory of this many slots (4 shards)")
    args = p.parse_args(argv)

    cfg = MemoryConfig(size=args.size, key_dim=args.dim, k=args.k)
    state, q, labels = problem(args)
    threads = torch.get_num_threads()
    print(f"N={args.size:,} d={args.dim} B={args.batch} k={args.k} backend={args.backend} "
          f"cores={os.cpu_count()} rounds={args.rounds}")

    local = LocalMemory(cfg, backend=args.backend, device="cpu")
    local.load_state(state)
    sharded = {}
    for n in (int(s) for s in args.shards.split(",")):
        sharded[n] = ShardedMemory(cfg, n, backend=args.backend, snapshot_every=10**9)
        sharded[n].load_state(state)
    del state

    def local_one_thread():
        set_threads(1)  # the share of the machine that one shard of two gets
        try:
            local.step(q, labels)
        finally:
            set_threads(threads)

    runs = {f"LocalMemory ({threads} threads)": lambda: local.step(q, labels),
            "LocalMemory (1 thread)": local_one_thread,
            **{f"ShardedMemory x{n}": (lambda m=m: m.step(q, labels)) for n, m in sharded.items()}}
    results: dict = {"config": vars(args), "runs": interleaved(runs, args.rounds)}
    for name, row in results["runs"].items():
        extra = ""
        if name.startswith("ShardedMemory"):
            traffic = sharded[int(name.split("x")[1])].traffic
            row.update(traffic)
            moved = traffic["read_bytes"] + traffic["write_bytes"]
            extra = (f"   moved {moved / 2**20:5.1f} MiB/step (read {traffic['read_bytes'] / 2**20:.1f}, "
                     f"write {traffic['write_bytes'] / 2**20:.1f})")
        print(f"{name:<26} step {row['median_s'] * 1e3:8.1f} ms   ratio {row['ratio']:.2f}{extra}")
    for m in sharded.values():
        m.shutdown()
    local = None  # free its keys before the scale run

    if args.scale_size:
        big = MemoryConfig(size=args.scale_size, key_dim=args.dim, k=args.k)
        mem = ShardedMemory(big, 4, backend=args.backend, snapshot_every=10**9)
        for shard, (lo, hi) in zip(mem.shards, mem.ranges):  # fill each shard with random keys
            part = filled_state(hi - lo, args.dim, classes=args.scale_size // 4, seed=lo)
            ray.get(shard.load_state.remote({**part, "step": torch.tensor(0)}))
            del part
        ray.get(mem._coordinator.resync.remote())
        mem.step(q, labels)
        t = statistics.median(timed(lambda: mem.step(q, labels)) for _ in range(2))
        rss = rss_gib([ray.get(s.info.remote())["pid"] for s in mem.shards])
        mem.shutdown()
        tiny = ShardedMemory(MemoryConfig(size=8, key_dim=args.dim, k=2), 4, backend=args.backend)
        tiny.step(q[:4], labels[:4])  # same imports and code paths, no keys to speak of
        idle = rss_gib([ray.get(s.info.remote())["pid"] for s in tiny.shards])
        tiny.shutdown()
        raw = args.scale_size * args.dim * 4 / 2**30
        memory = rss["private"] - idle["private"]
        results["scale"] = {"size": args.scale_size, "step_s": t, "raw_keys_gib": raw, "rss_gib": rss,
                            "idle_rss_gib": idle, "memory_private_gib": memory}
        print(f"ShardedMemory N={args.scale_size:,} x4: step {t * 1e3:.1f} ms; raw keys {raw:.2f} GiB; shard "
              f"processes: private {rss['private']:.2f} GiB (idle processes {idle['private']:.2f} GiB, so "
              f"{memory:.2f} GiB = {memory / raw:.2f}x raw for the memory), plus {rss['shared']:.2f} GiB of "
              f"mapped object-store pages")
    write_results(args, "bench-sharded", results)
    return results


if __name__ == "__main__":
    main()
