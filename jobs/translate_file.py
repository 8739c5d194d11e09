"""Translate a text file with a trained `jobs.translate` run: one output line per input line.

    python -m jobs.translate_file runs/translate-multi30k-... --input news.en --output news.de
    python -m jobs.translate_file RUN --input test.en --context context.en context.de --reference test.de

--context SRC TGT first writes those pairs into the memory (teacher-forced, no gradient); with
--reference the sacreBLEU score and signature are printed. --variant baseline uses the model
trained without memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distmem.checkpoints import CheckpointError
from distmem.cli import user_errors
from distmem.tasks.translation import DataError, read_lines
from distmem.tasks.translation.evaluation import bleu
from distmem.tasks.translation.training import Translator


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a jobs.translate run folder (path or URI)")
    p.add_argument("--input", required=True, help="source text, one sentence a line (plain, .gz or .sgm)")
    p.add_argument("--output", type=Path, default=None, help="where the translations go (default: stdout)")
    p.add_argument("--beam", type=int, default=4, help="beam size (1: greedy; default 4)")
    p.add_argument("--length-penalty", type=float, default=0.6, help="GNMT length penalty alpha (default 0.6)")
    p.add_argument("--context", nargs=2, metavar=("SRC", "TGT"), default=None,
                   help="pairs written into the memory before translating")
    p.add_argument("--reference", default=None, help="reference translations: print sacreBLEU's score")
    p.add_argument("--variant", choices=("memory", "baseline"), default="memory")
    args = p.parse_args(argv)
    if args.beam < 1:
        p.error(f"--beam: expected >= 1, got {args.beam}")
    if args.context and args.variant == "baseline":
        p.error("--context: the baseline has no memory to write the context into")
    with user_errors(DataError, CheckpointError):
        source = list(read_lines(args.input))
        references = list(read_lines(args.reference)) if args.reference else None
        if references is not None and len(references) != len(source):
            raise DataError(f"--reference: {args.reference} has {len(references)} lines, --input {len(source)}")
        translator = Translator.from_checkpoint(args.run, args.variant, beam=args.beam,
                                                length_penalty=args.length_penalty)
        if args.context:
            src, tgt = (list(read_lines(path)) for path in args.context)
            if len(src) != len(tgt):
                raise DataError(f"--context: {args.context[0]} has {len(src)} lines but {args.context[1]} {len(tgt)}")
            translator.remember(src, tgt)
        hypotheses = translator.translate(source)
    text = "".join(line + "\n" for line in hypotheses)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    if references is not None:
        score = bleu(hypotheses, references)  # on stderr when the translations take stdout
        print(f"BLEU = {score['bleu']:.2f}  {score['signature']}", file=sys.stdout if args.output else sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
