"""Benchmark of the translation data pipeline: preparing synthetic corpora of 100,000 and
1,000,000 pairs (the WMT14 10k sample, repeated in shuffled order), and streaming the prepared
Parquet files to one trainer through Ray Data against what that trainer consumes.

    python -m jobs.bench_translation_data                     # 100k and 1M pairs
    python -m jobs.bench_translation_data --sizes 100000      # one size

Each size is prepared in its own process, so its peak RSS is that preparation's alone. The
tokeniser trains on the same sample size at every corpus size (--sample-sentences), so the
sizes compare the streaming part; pairs/s is given for the whole preparation and for the
encoding pass alone. The trainer is the GNMT-style `Seq2Seq` (--model preset, no memory), one
Adam step per batch of --batch-pairs pairs on this machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def synthetic_corpus(data: Path, folder: Path, pairs: int, seed: int = 0) -> tuple[Path, Path]:
    """`pairs` pairs from the 10k sample: the sample again and again, each time in a new order."""
    import gzip
    sample = data / "wmt14" / "train_sample_opennmt10k"
    if not (sample / "train.en.gz").is_file():
        raise SystemExit(f"error: --data: no wmt14/train_sample_opennmt10k/train.en.gz under {data}")
    src = gzip.open(sample / "train.en.gz", "rt", encoding="utf-8").read().splitlines()
    tgt = gzip.open(sample / "train.de.gz", "rt", encoding="utf-8").read().splitlines()
    rng = random.Random(seed)
    paths = folder / f"synthetic-{pairs}.en", folder / f"synthetic-{pairs}.de"
    with open(paths[0], "w", encoding="utf-8") as fs, open(paths[1], "w", encoding="utf-8") as ft:
        order = list(range(len(src)))
        written = 0
        while written < pairs:
            rng.shuffle(order)
            take = order[: pairs - written]
            fs.write("\n".join(src[i] for i in take) + "\n")
            ft.write("\n".join(tgt[i] for i in take) + "\n")
            written += len(take)
    return paths


def prepare_in_child(src: Path, tgt: Path, out: Path, vocab: int, sample: int) -> dict:
    """Prepare in a fresh process; returns its figures and peak RSS (from the kernel's rusage)."""
    with tempfile.NamedTemporaryFile("w+", suffix=".json") as result:
        code = ("import json, sys, time; from distmem.tasks.translation import prepare, PrepareSettings; "
                "t = time.perf_counter(); "
                f"p = prepare([({str(src)!r}, {str(tgt)!r})], {str(out)!r}, "
                f"PrepareSettings(vocab={vocab}, sample_sentences={sample})); "
                "json.dump({'seconds': time.perf_counter() - t, 'phases': p.seconds, 'counts': p.counts, "
                f"'files': [str(f) for f in p.files]}}, open({result.name!r}, 'w'))")
        child = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise RuntimeError(f"preparing {src} failed (exit status {child.returncode})")
        figures = json.load(open(result.name))
    figures["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    return figures


def stream_rate(files: list[str], batch_pairs: int, limit_pairs: int) -> dict:
    """Tokens/s that Ray Data streams to one consumer (rows read and counted, nothing else)."""
    from distmem.distributed.streams import parquet_batches
    batches = parquet_batches(files, ["src", "tgt", "src_len", "tgt_len"], batch_pairs)
    next(batches)  # Ray Data's start-up is not the stream's rate
    tokens = rows = 0
    start = time.perf_counter()
    for batch in batches:
        tokens += int(batch["src_len"].sum() + batch["tgt_len"].sum())
        rows += len(batch["src_len"])
        if rows >= limit_pairs:
            break
    seconds = time.perf_counter() - start
    return {"pairs": rows, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def trainer_rate(files: list[str], vocab: int, batch_pairs: int, model: str, steps: int = 8) -> dict:
    """Tokens/s one trainer consumes: Seq2Seq forward, backward and an Adam step per batch."""
    import pyarrow.parquet as pq

    from distmem.models.seq2seq import MODEL_PRESETS, Seq2Seq, Seq2SeqConfig
    from distmem.tasks.translation.prepare import BOS, EOS, PAD
    from distmem.tasks.translation.training import make_batch
    table = pq.read_table(files[0], columns=["src", "tgt"]).slice(0, batch_pairs * (steps + 2))
    net = Seq2Seq(Seq2SeqConfig(src_vocab=vocab, tgt_vocab=vocab, bos=BOS, eos=EOS, pad=PAD, use_memory=False,
                                **MODEL_PRESETS[model]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    times, tokens = [], []
    for step in range(steps + 2):
        part = table.slice(step * batch_pairs, batch_pairs).to_pydict()
        batch = make_batch(part["src"], part["tgt"])
        start = time.perf_counter()
        out = net(batch.src, batch.tgt_in, batch.tgt_out)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step >= 2:  # after warm-up
            times.append(time.perf_counter() - start)
            tokens.append(sum(map(len, part["src"])) + sum(map(len, part["tgt"])))
    return {"model": model, "batch_pairs": batch_pairs, "step_s": float(np.median(times)),
            "tokens_per_s": sum(tokens) / sum(times)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000", help="corpus sizes in pairs (comma-separated)")
    p.add_argument("--data", type=Path, default=DATA, help=f"the shared data folder (default {DATA})")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--sample-sentences", type=int, default=200_000,
                   help="the tokeniser's training sample at every size (default 200,000)")
    p.add_argument("--batch-pairs", type=int, default=64)
    p.add_argument("--model", default="tiny", help="Seq2Seq preset of the trainer (default tiny)")
    p.add_argument("--work", type=Path, default=None, help="folder for the corpora and data sets (default: temporary)")
    p.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="distmem-bench-translation-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"cores={os.cpu_count()} vocab={args.vocab} tokeniser sample={args.sample_sentences:,} work={work}")
    results: dict = {"prepare": {}, "cores": os.cpu_count()}
    print(f"{'pairs':>10} {'total s':>8} {'pairs/s':>9} {'encode pairs/s':>15} {'tokeniser s':>12} {'peak RSS':>10}")
    for n in sizes:
        src, tgt = synthetic_corpus(args.data, work, n)
        r = prepare_in_child(src, tgt, work / f"prepared-{n}", args.vocab, args.sample_sentences)
        r["pairs_per_s"] = n / r["seconds"]
        r["encode_pairs_per_s"] = n / r["phases"]["encode"]
        results["prepare"][n] = r
        print(f"{n:>10,} {r['seconds']:>8.1f} {r['pairs_per_s']:>9,.0f} {r['encode_pairs_per_s']:>15,.0f} "
              f"{r['phases']['tokeniser']:>12.1f} {r['peak_rss_mib']:>7.0f} MiB")
    if len(sizes) > 1:
        rss = [results["prepare"][n]["peak_rss_mib"] for n in (sizes[0], sizes[-1])]
        results["rss_ratio"] = rss[1] / rss[0]
        print(f"peak RSS at {sizes[-1]:,} pairs / at {sizes[0]:,}: {results['rss_ratio']:.2f}x")
    files = results["prepare"][sizes[-1]]["files"]
    results["stream"] = stream_rate(files, args.batch_pairs, limit_pairs=min(sizes[-1], 300_000))
    results["trainer"] = trainer_rate(files, args.vocab, args.batch_pairs, args.model)
    ratio = results["stream"]["tokens_per_s"] / results["trainer"]["tokens_per_s"]
    results["stream_over_trainer"] = ratio
    print(f"Ray Data streams {results['stream']['tokens_per_s']:,.0f} tokens/s to one consumer; one trainer "
          f"({args.model} Seq2Seq, {args.batch_pairs} pairs a step, {results['trainer']['step_s']:.2f} s) consumes "
          f"{results['trainer']['tokens_per_s']:,.0f} tokens/s: {ratio:,.0f}x")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
