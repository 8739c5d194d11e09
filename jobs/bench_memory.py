"""Benchmark: one memory `step` per backend against a bare faiss IndexFlatIP search; or, with
`--backend`, an approximate backend against the exact one at several sizes.

    python -m jobs.bench_memory                      # N=1M, d=128, B=1024, k=256 on CPU
    python -m jobs.bench_memory --device cuda        # the same on a GPU
    python -m jobs.bench_memory --backend ivf --sizes 1M,4M       # ivf against exact, random keys
    python -m jobs.bench_memory --backend ivf --sizes 4M --keys runs/rare-symbols-.../memory/checkpoint-...

Prints the median time of each and the median over rounds of the ratio step / bare search; each
round times every line once, in one process on the same batch, so drift of the machine cancels.
With `--backend`, per size: the step time of both backends and their ratio, the process's peak
RSS, recall@1 and recall@k of the approximate search against the exact one on the same keys and
queries, and the share of predictions that differ. `--keys FILE` takes the keys of a saved
memory (a trained run's) instead of random ones: each slot is one of its written keys plus
noise of the keys' own scale (the median distance to the nearest other key), so that any size
is filled with their structure. The queries are stored keys plus noise (a memory's reads land
near what it stored): of norm 0.3 for random keys, of the keys' scale for saved ones.
`--out FILE` also writes the figures as JSON; `--storage DIR|URI` into a new run folder there.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from distmem import LocalMemory, MemoryConfig
from distmem.backends import TorchExactBackend, import_faiss
from distmem.ivf import recall_at
from distmem.keycodes import DTYPES
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


def filled_state(size: int, dim: int, classes: int, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A full memory of random unit keys (drawn on `device`): the steady state of a long run."""
    g = torch.Generator().manual_seed(seed)
    return {"keys": random_keys(size, dim, seed, device=device),
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


def problem(args: argparse.Namespace,
            device: str = "cpu") -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(a filled memory state with its keys on `device`, unit queries [B, d], labels [B]) for the
    benchmark's shape."""
    # a GPU draws its own keys: 64M drawn on the CPU would take a minute and 32 GiB of host memory
    state = filled_state(args.size, args.dim, classes=args.size // 4, seed=0, device=device)
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(args.batch, args.dim, generator=g), dim=1)
    return state, q, torch.randint(0, args.size // 4, (args.batch,), generator=g)


def parse_size(text: str) -> int:
    """1M -> 1,048,576; 4k -> 4,096; 5000 -> 5,000."""
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 4M, 65536 or 64k, got {text!r}") from None


def saved_keys(path: str, dim: int) -> torch.Tensor:
    """The written keys [n, dim] of the memory saved at `path`."""
    state = LocalMemory.from_file(path, device="cpu").state()
    written = state["keys"][state["values"] >= 0].float()
    if written.shape[1] != dim:
        raise ValueError(f"--keys: {path} holds keys of size {written.shape[1]}, not --dim {dim}")
    if len(written) == 0:
        raise ValueError(f"--keys: {path} holds no written slot")
    return written


def spacing(keys: torch.Tensor, sample: int = 2000) -> float:
    """The median distance from a key to its nearest other key (over a sample): the scale of the
    keys' structure."""
    some = keys[torch.randperm(len(keys), generator=torch.Generator().manual_seed(0))[:sample]]
    sims = some @ keys.T
    nearest = sims.topk(min(2, len(keys)), dim=1).values[:, -1]  # the first is the key itself
    return float((2 - 2 * nearest.clamp(max=1)).sqrt().median())


def structured_keys(written: torch.Tensor, size: int, noise: float, seed: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """size unit keys [size, d] of `dtype`: rows of `written` drawn with replacement, each plus
    Gaussian noise of norm about `noise`."""
    dim = written.shape[1]
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(size, dim, dtype=dtype)
    for start in range(0, size, 1 << 20):
        n = min(1 << 20, size - start)
        pick = written[torch.randint(0, len(written), (n,), generator=g)]
        out[start:start + n] = F.normalize(pick + noise * torch.randn(n, dim, generator=g) / dim ** 0.5, dim=1)
    return out


def random_keys(size: int, dim: int, seed: int, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """size uniformly random unit keys [size, dim] of `dtype` on `device` (a GPU draws other keys
    than the CPU for the same seed)."""
    g = torch.Generator(device).manual_seed(seed)
    out = torch.empty(size, dim, dtype=dtype, device=device)
    for start in range(0, size, 1 << 20):
        n = min(1 << 20, size - start)
        out[start:start + n] = F.normalize(torch.randn(n, dim, generator=g, device=device), dim=1)
    return out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def compare(args: argparse.Namespace) -> dict:
    """The approximate backend against the exact one (torch) at each of args.sizes."""
    rows = []
    # 16-bit keys are generated in 16 bits: a float32 source beside both memories would not fit 16M
    # slots in 24 GiB (so there is no float32 reference for them); 8-bit ones from float32
    source = DTYPES[args.key_dtype] if args.key_dtype in ("float16", "bfloat16") else torch.float32
    if args.keys:  # the saved keys' own scale: noise far above it would blur their structure away
        written = saved_keys(args.keys, args.dim)
        noise = args.key_noise or spacing(written)
    for size in args.sizes:
        if args.keys:
            keys = structured_keys(written, size, noise, seed=0, dtype=source)
        else:
            noise, keys = args.query_noise, random_keys(size, args.dim, seed=0, dtype=source)
        g = torch.Generator().manual_seed(1)
        picked = torch.randint(0, size, (args.batch,), generator=g)
        q = F.normalize(keys[picked] + noise * torch.randn(args.batch, args.dim, generator=g) / args.dim ** 0.5,
                        dim=1)
        state = {"keys": keys, "values": torch.randint(0, max(1, size // 4), (size,), generator=g),
                 "ages": torch.randint(0, 10_000, (size,), generator=g)}
        labels = state["values"][picked].to(args.device)  # the stored slot's label: the reads are mostly hits
        q = q.to(args.device)
        cfg = MemoryConfig(size=size, key_dim=args.dim, k=args.k, key_dtype=args.key_dtype, ivf_lists=args.lists,
                           ivf_probe=args.nprobe)
        memories, rss = {}, {}
        for name in ("torch", args.backend):
            t0 = time.perf_counter()
            memories[name] = LocalMemory(cfg, backend=name, device=args.device)
            memories[name].load_state(state)
            rss[name] = {"build_s": time.perf_counter() - t0, "peak_rss_gib": peak_rss_gib()}
        reference = None  # compressed keys: the float32 keys' exact top-k, to measure what compression costs
        if args.key_dtype != "float32" and keys.dtype == torch.float32:
            reference = TorchExactBackend().search(keys, q.cpu(), args.k)[1]
        del state, keys
        exact, approx = (memories[name].shard.search(q)["ids"].cpu() for name in ("torch", args.backend))
        hit1, hitk = recall_at(exact, approx)
        differ = (memories["torch"].query(q).prediction != memories[args.backend].query(q).prediction).float().mean()
        timed = interleaved({name: (lambda m=m, q=q, y=labels: m.step(q, y)) for name, m in memories.items()},
                            args.repeats, sync=args.device.startswith("cuda"))
        row = {"size": size, "noise": noise, "exact_step_s": timed["torch"]["median_s"],
               "approx_step_s": timed[args.backend]["median_s"],
               "speedup": 1 / timed[args.backend]["ratio"], "recall_at_1": hit1, "recall_at_k": hitk,
               "predictions_differ": float(differ), "lists": memories[args.backend].backend.lists,
               "nprobe": memories[args.backend].backend.nprobe, "build": rss, "peak_rss_gib": peak_rss_gib()}
        if reference is not None:
            row["against_float32"] = {name: dict(zip(("recall_at_1", "recall_at_k"), recall_at(reference, ids)))
                                      for name, ids in (("exact", exact), (args.backend, approx))}
        rows.append(row)
        print(f"N={size:>11,} exact {row['exact_step_s'] * 1e3:8.0f} ms  {args.backend} "
              f"{row['approx_step_s'] * 1e3:7.0f} ms  speed-up {row['speedup']:5.1f}x  recall@1 {hit1:.4f}  "
              f"recall@{args.k} {hitk:.4f}  predictions differ {row['predictions_differ']:.2%}  "
              f"peak RSS {row['peak_rss_gib']:.1f} GiB  ({row['lists']} lists, nprobe {row['nprobe']}; "
              f"{args.backend} built in {rss[args.backend]['build_s']:.0f} s)", flush=True)
        for name, r in row.get("against_float32", {}).items():
            print(f"    {args.key_dtype} keys, {name} search against float32 keys' exact top-k: "
                  f"recall@1 {r['recall_at_1']:.4f}  recall@{args.k} {r['recall_at_k']:.4f}")
        del memories
    return {"config": vars(args), "sizes": rows}


def main(argv: list[str] | None = None) -> dict:
    p = problem_parser(__doc__)
    p.add_argument("--repeats", type=int, default=5, help="rounds")
    p.add_argument("--backends", default="torch,faiss")
    p.add_argument("--device", default="cpu")
    p.add_argument("--key-dtype", default="float32")
    p.add_argument("--no-bare", action="store_true", help="leave out the bare CPU faiss searches (the ratios "
                   "are then to the first backend's step)")
    p.add_argument("--backend", default=None, choices=["ivf"], help="compare this approximate backend with the "
                   "exact one (torch) at each of --sizes")
    p.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",")], default=[1 << 20],
                   help="with --backend: memory sizes, e.g. 1M,4M,16M")
    p.add_argument("--keys", default=None, help="with --backend: a saved memory (file or checkpoint folder) whose "
                   "written keys shape the benchmark's keys (default: uniformly random keys)")
    p.add_argument("--lists", type=int, default=0, help="ivf lists (0: about 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=32, help="ivf lists scanned per query")
    p.add_argument("--key-noise", type=float, default=0.0, help="with --keys: norm of the noise added to a saved "
                   "key to make a slot's key, and to a slot's key to make a query (0: the median distance "
                   "between a saved key and its nearest other)")
    p.add_argument("--query-noise", type=float, default=0.3, help="random keys: norm of the noise added to a "
                   "stored key to make a query")
    args = p.parse_args(argv)
    if args.backend:
        results = compare(args)
        write_results(args, "bench-memory-" + args.backend, results)
        return results

    faiss = import_faiss()  # the reference every backend is compared with

    device = torch.device(args.device)
    sync = device.type == "cuda"
    state, q, labels = problem(args, args.device)

    runs = {}
    if not args.no_bare:
        index = faiss.IndexFlatIP(args.dim)
        xq, keys_np = q.numpy(), state["keys"].cpu().numpy()
        index.add(keys_np)
        runs = {"bare faiss IndexFlatIP.search": lambda: index.search(xq, args.k),
                "bare faiss.knn (its kernel)": lambda: faiss.knn(xq, keys_np, args.k,
                                                                 metric=faiss.METRIC_INNER_PRODUCT)}
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
    if sync:
        results["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        print(f"peak GPU memory {results['peak_gpu_gib']:.1f} GiB (the benchmark's keys included)")
    write_results(args, "bench-memory", results)
    return results


if __name__ == "__main__":
    main()
