"""Answer instances with a trained `jobs.neural_gpu` run: one instance a line in, one answer a line out.

    python -m jobs.neural_gpu_answer runs/neural-gpu-badd-... --input sums.txt --output answers.txt

The task's plain form: badd / bmul two binary numbers, most significant bit first (`1011+110`,
`1011*110`), answered in binary without leading zeros; rev / copy / sort a string of letters.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distmem.checkpoints import CheckpointError
from distmem.cli import user_errors
from distmem.tasks.algorithmic.task import answer, load_trained


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a jobs.neural_gpu run folder (path or URI)")
    p.add_argument("--input", type=Path, required=True, help="instances, one a line")
    p.add_argument("--output", type=Path, default=None, help="where the answers go (default: stdout)")
    args = p.parse_args(argv)
    with user_errors(CheckpointError, ValueError):
        if not args.input.is_file():
            raise FileNotFoundError(f"--input: no file {args.input}")
        lines = [line for line in args.input.read_text(encoding="utf-8").splitlines() if line.strip()]
        model, cfg = load_trained(str(args.run))
        try:
            answers = answer(model, cfg, lines)
        except ValueError as err:
            raise ValueError(f"--input {args.input}: {err}") from None
    text = "".join(a + "\n" for a in answers)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
