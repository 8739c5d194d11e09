"""The algorithmic tasks of the Neural GPU: seeded random instances, their plain text form, and
the length curriculum.

Tape layout (the public code's): binary numbers least significant bit first, so that digit i of
the answer sits above digit i of the first operand. An instance of length n has an input of at
most n symbols and an answer of exactly n output symbols, the unused ones BLANK; sequence
accuracy asks for all n right.

- `badd` / `bmul`: two numbers of k = (n - 1) // 2 random bits each (leading zeros allowed):
  `a + b` / `a * b` in, the sum / product out.
- `rev` / `copy` / `sort`: n random symbols in; reversed / the same / sorted out.

Input ids: 0 padding, then the task's symbols; output ids: 0 padding (unused), 1 BLANK, then the
answer's symbols.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TASKS = ("badd", "bmul", "rev", "copy", "sort")
BINARY = ("badd", "bmul")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
BLANK = 1


@dataclass(frozen=True)
class Vocabulary:
    """The symbols of a task: `inputs` (ids 1..) and `outputs` (ids 2..; 1 is BLANK)."""

    inputs: str
    outputs: str

    @property
    def in_size(self) -> int:
        return len(self.inputs) + 1

    @property
    def out_size(self) -> int:
        return len(self.outputs) + 2


def vocabulary(task: str, symbols: int = 8) -> Vocabulary:
    """The task's vocabulary; `symbols` letters for rev / copy / sort."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    if task in BINARY:
        return Vocabulary("01+*", "01")
    if not 2 <= symbols <= len(LETTERS):
        raise ValueError(f"symbols: expected 2..{len(LETTERS)}, got {symbols}")
    return Vocabulary(LETTERS[:symbols], LETTERS[:symbols])


def solve(task: str, text: str) -> str:
    """The answer to one instance in plain form (the oracle, by Python arithmetic or sorting):
    `1011+110` -> `10001`; `cab` -> `bac` (rev)."""
    if task in BINARY:
        a, b = _operands(task, text)
        return format(a + b if task == "badd" else a * b, "b")
    if task == "rev":
        return text[::-1]
    return text if task == "copy" else "".join(sorted(text))


def _operands(task: str, text: str) -> tuple[int, int]:
    op = "+" if task == "badd" else "*"
    parts = text.split(op)
    if len(parts) != 2 or not all(parts) or set("".join(parts)) - {"0", "1"}:
        raise ValueError(f"{task}: expected two binary numbers as 1011{op}110, got {text!r}")
    return int(parts[0], 2), int(parts[1], 2)


def encode(task: str, text: str, vocab: Vocabulary) -> list[int]:
    """A plain instance -> input ids on the tape (numbers least significant bit first, both of
    the longer one's width)."""
    if task in BINARY:
        op = "+" if task == "badd" else "*"
        _operands(task, text)  # checks the form
        a, b = text.split(op)
        width = max(len(a), len(b))
        text = a.zfill(width)[::-1] + op + b.zfill(width)[::-1]
    bad = set(text) - set(vocab.inputs)
    if bad or not text:
        raise ValueError(f"{task}: expected a string of the symbols {vocab.inputs!r}, got {text!r}")
    return [vocab.inputs.index(ch) + 1 for ch in text]


def decode(task: str, out: list[int], vocab: Vocabulary) -> str:
    """Output ids on the tape -> the plain answer (binary: most significant bit first, no leading
    zeros). BLANK and padding are skipped."""
    text = "".join(vocab.outputs[i - 2] for i in out if i >= 2)
    if task in BINARY:
        return text[::-1].lstrip("0") or "0"
    return text


def tape_length(task: str, text: str) -> int:
    """The tape positions an instance needs: its input's, or its answer's if longer."""
    answer = solve(task, text)
    inp = 2 * max(map(len, text.split("+" if task == "badd" else "*"))) + 1 if task in BINARY else len(text)
    return max(inp, len(answer))


def random_instance(task: str, length: int, rng: np.random.Generator, symbols: int = 8) -> str:
    """A random instance of tape length `length` in plain form (binary: k = (length - 1) // 2
    random bits per operand, written most significant bit first with their leading zeros)."""
    if task in BINARY:
        k = (length - 1) // 2
        if k < 1:
            raise ValueError(f"length: {task} needs at least 3 positions, got {length}")
        a, b = ("".join(map(str, rng.integers(0, 2, k))) for _ in range(2))
        return f"{a}{'+' if task == 'badd' else '*'}{b}"
    return "".join(LETTERS[i] for i in rng.integers(0, symbols, length))


def instance_ids(task: str, text: str, length: int, vocab: Vocabulary) -> tuple[list[int], list[int]]:
    """(input ids padded to `length`, answer ids: `length` outputs, BLANK after the answer)."""
    inp = encode(task, text, vocab)
    answer = solve(task, text)
    if task in BINARY:
        answer = answer[::-1]  # least significant bit first, like the operands
    out = [vocab.outputs.index(ch) + 2 for ch in answer]
    if max(len(inp), len(out)) > length:
        raise ValueError(f"length: {text!r} needs {max(len(inp), len(out))} tape positions, got {length}")
    return inp + [0] * (length - len(inp)), out + [BLANK] * (length - len(out))


def batch(task: str, length: int, size: int, rng: np.random.Generator, symbols: int = 8,
          shortest: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`size` random instances of tape length `length` -> (inputs [size, length], answers [size, length]).
    With `shortest`: each instance of a length drawn uniformly from [shortest, length], padded to `length`."""
    vocab = vocabulary(task, symbols)
    lengths = rng.integers(shortest, length + 1, size).tolist() if shortest else [length] * size
    rows = [instance_ids(task, random_instance(task, n, rng, symbols), length, vocab) for n in lengths]
    return np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows], dtype=np.int64)


@dataclass(frozen=True)
class Curriculum:
    """Training lengths over the steps: the longest grows by one every `every` steps from `start`
    to `longest`; a batch's length is drawn uniformly from [shortest, the current longest].
    A fixed schedule (the public code grows the length when the error is low) keeps every batch a
    function of (seed, rank, step), so a resumed run draws what the uninterrupted one did."""

    start: int = 3
    longest: int = 20
    every: int = 200
    shortest: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.shortest <= self.start <= self.longest or self.every < 1:
            raise ValueError(f"curriculum: expected 1 <= shortest <= start <= longest and every >= 1, got {self}")

    def longest_at(self, step: int) -> int:
        return min(self.longest, self.start + step // self.every)

    def length_at(self, step: int, rng: np.random.Generator) -> int:
        return int(rng.integers(self.shortest, self.longest_at(step) + 1))

    def bins_at(self, step: int, bins: tuple[int, ...]) -> list[tuple[int, int]]:
        """The batches of an every-bin step as (shortest, length): each of `bins` capped at the longest
        so far, once each, holding instances of the lengths above the previous bin's up to its own
        (Freivalds & Liepins' bins), so that every training length keeps being trained."""
        caps = sorted({min(b, self.longest_at(step)) for b in bins})
        return list(zip([self.shortest] + [b + 1 for b in caps[:-1]], caps, strict=True))
