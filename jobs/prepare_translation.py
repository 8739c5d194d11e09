"""Prepare parallel corpora for `jobs.translate`: cleaning (counts reported), one joint
sentencepiece model, Parquet shards and a manifest, as shared/docs/translation-task.md says.

    python -m jobs.prepare_translation --pair train.en.gz train.de.gz --out data/multi30k --vocab 8000
    python -m jobs.prepare_translation --pair s3://bucket/europarl.en s3://bucket/europarl.de \\
        --pair commoncrawl.en commoncrawl.de --out data/wmt14 --vocab 32000

Files: plain UTF-8, .gz or WMT .sgm; local paths or pyarrow.fs URIs. The output is written to a
temporary folder and renamed when complete; running again with the same inputs and settings
reuses it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from tqdm import tqdm

from distmem.cli import user_errors
from distmem.tasks.translation.prepare import DataError, PrepareSettings, prepare


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = PrepareSettings()
    p.add_argument("--pair", nargs=2, action="append", required=True, metavar=("SRC", "TGT"),
                   help="a parallel corpus: source file and target file (repeat for several corpora)")
    p.add_argument("--out", required=True, help="the prepared data set's folder")
    p.add_argument("--vocab", type=int, default=d.vocab, help=f"joint sentencepiece vocabulary (default {d.vocab})")
    p.add_argument("--sample-sentences", type=int, default=d.sample_sentences,
                   help=f"the tokeniser trains on a sample of at most this many sentences "
                        f"(default {d.sample_sentences:,})")
    p.add_argument("--max-pieces", type=int, default=d.max_pieces, help=f"drop longer pairs (default {d.max_pieces})")
    p.add_argument("--max-ratio", type=float, default=d.max_ratio,
                   help=f"drop pairs whose length ratio is above this (default {d.max_ratio})")
    p.add_argument("--shard-pairs", type=int, default=d.shard_pairs,
                   help=f"pairs per Parquet file (default {d.shard_pairs:,})")
    p.add_argument("--threads", type=int, default=0, help="encoding threads (default: every core)")
    p.add_argument("--seed", type=int, default=d.seed)
    args = p.parse_args(argv)
    with user_errors(DataError):
        try:
            settings = PrepareSettings(vocab=args.vocab, sample_sentences=args.sample_sentences,
                                       max_pieces=args.max_pieces, max_ratio=args.max_ratio,
                                       shard_pairs=args.shard_pairs, threads=args.threads, seed=args.seed)
        except ValueError as err:
            p.error(f"--{str(err).replace('_', '-')}")
        start = time.perf_counter()
        with tqdm(desc="encoding", unit="pair", unit_scale=True) as bar:
            prepared = prepare([tuple(pair) for pair in args.pair], args.out, settings, progress=bar.update)
        seconds = time.perf_counter() - start
    counts = prepared.counts
    if prepared.reused:
        print(f"{args.out}: already prepared from these inputs and settings (reused)")
    else:
        print(f"{args.out}: {counts['read']:,} pairs read in {seconds:.1f} s ({counts['read'] / seconds:,.0f} pairs/s)")
    print(json.dumps(counts))
    print(f"{len(prepared.files)} Parquet files, tokeniser {prepared.spm_model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
