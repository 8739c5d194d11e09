"""The rare-symbol task (`shared/docs/rare-symbol-task.md`): a seeded generator of a life-long
stream of sequences in which rare symbols come back a few times, and of the test stream that
measures one-shot recall after a gap.

    task = RareSymbolTask(seed=0)
    for step, batch in zip(range(3), TrainingStream(task, batch_size=16)):
        batch.inputs        # [16, 20] int64 input ids (frequent symbols, at most one rare each)
        task.targets(batch.inputs)   # [16, 20] the mapped targets f(x)

Ids: inputs 1..vocab (0 is padding); frequent 1..frequent, rare training frequent+1..rare_train_end,
rare test rare_train_end+1..vocab (never in a training stream). Targets use the same ids through
the permutation f; the decoder's BOS and EOS come after `vocab`.

Training stream (one per data-parallel trainer, each with its own share of the rare training
symbols): every step a batch of sequences of uniform frequent symbols; each sequence carries, with
probability `rare_prob`, one rare symbol at a random position. A rare symbol is introduced once
and comes back `min_returns`..`max_returns` more times, each after a gap of 1..`max_gap` steps;
after its last appearance it is never used again. When a trainer's share of rare symbols is used
up, its sequences carry only returns (`TrainingStream.exhausted_at` says from which step).

Test stream: each rare test symbol gets a gap g; its *context* sequence comes in the first
`window` steps and its *probe* exactly g steps later; the other sequences are ordinary traffic
(frequent symbols, and with probability `rare_prob` a rare training symbol, as in training).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RareSymbolTask:
    """The task's vocabulary, mapping and stream statistics (defaults: the spec's)."""

    seed: int = 0
    vocab: int = 16384          # input ids 1..vocab; 0 = padding
    frequent: int = 8192        # frequent symbols 1..frequent
    rare_train_end: int = 14336  # rare training symbols frequent+1..rare_train_end; test: the rest
    length: int = 20
    rare_prob: float = 0.5      # probability that a sequence carries a rare symbol
    min_returns: int = 1        # appearances after the introduction: min_returns..max_returns
    max_returns: int = 3
    max_gap: int = 1000         # steps between two appearances: 1..max_gap

    def __post_init__(self) -> None:
        if not 1 <= self.frequent < self.rare_train_end < self.vocab:
            raise ValueError(f"expected 1 <= frequent < rare_train_end < vocab, got frequent={self.frequent}, "
                             f"rare_train_end={self.rare_train_end}, vocab={self.vocab}")
        if self.length < 1 or not 0 <= self.rare_prob <= 1 or not 0 <= self.min_returns <= self.max_returns:
            raise ValueError("length must be >= 1, rare_prob in [0, 1] and 0 <= min_returns <= max_returns")
        if self.max_gap < 1:
            raise ValueError(f"max_gap must be >= 1, got {self.max_gap}")

    @property
    def bos(self) -> int:
        """Decoder start token (a target id)."""
        return self.vocab + 1

    @property
    def eos(self) -> int:
        """Decoder end token (a target id)."""
        return self.vocab + 2

    @property
    def target_vocab(self) -> int:
        """Size of the target vocabulary: padding, the mapped symbols, BOS and EOS."""
        return self.vocab + 3

    @property
    def rare_train(self) -> np.ndarray:
        return np.arange(self.frequent + 1, self.rare_train_end + 1)

    @property
    def rare_test(self) -> np.ndarray:
        return np.arange(self.rare_train_end + 1, self.vocab + 1)

    def mapping(self) -> np.ndarray:
        """f as an array [vocab + 1]: f[x] for x in 1..vocab, a permutation of 1..vocab; f[0] = 0."""
        return _mapping(self.seed, self.vocab)

    def targets(self, inputs: np.ndarray) -> np.ndarray:
        """y_i = f(x_i), padding kept: inputs [..., L] -> targets [..., L]."""
        return self.mapping()[inputs]

    def is_rare(self, ids: np.ndarray) -> np.ndarray:
        """Which input ids are rare (training or test)."""
        return ids > self.frequent


@functools.lru_cache(maxsize=8)
def _mapping(seed: int, vocab: int) -> np.ndarray:
    f = np.zeros(vocab + 1, dtype=np.int64)
    f[1:] = np.random.default_rng([seed, 0]).permutation(vocab) + 1
    f.flags.writeable = False
    return f


@dataclass
class StreamBatch:
    """One step: inputs [B, L] int64; rare_pos [B] position of the sequence's rare symbol (-1: none);
    rare [B] that symbol (0: none); kind [B]: 0 plain, 1 introduction / context, 2 return / probe,
    3 rare traffic (test stream only)."""

    inputs: np.ndarray
    rare_pos: np.ndarray
    rare: np.ndarray
    kind: np.ndarray


def _place(task: RareSymbolTask, rng: np.random.Generator, batch_size: int,
           symbols: list[tuple[int, int]]) -> StreamBatch:
    """A batch of frequent sequences with the given (symbol, kind) pairs in its first rows, each at
    a random position; rows are then shuffled."""
    inputs = rng.integers(1, task.frequent + 1, size=(batch_size, task.length))
    rare_pos = np.full(batch_size, -1)
    rare = np.zeros(batch_size, dtype=np.int64)
    kind = np.zeros(batch_size, dtype=np.int64)
    if symbols:
        n = len(symbols)
        rows = rng.permutation(batch_size)[:n]
        pos = rng.integers(0, task.length, size=n)
        rare_pos[rows], rare[rows] = pos, [s for s, _ in symbols]
        kind[rows] = [k for _, k in symbols]
        inputs[rows, pos] = rare[rows]
    return StreamBatch(inputs, rare_pos, rare, kind)


class TrainingStream:
    """The life-long training stream of one trainer (`rank` of `world`): an endless iterator of
    `StreamBatch`es. Seeded by (task.seed, rank); the rare training symbols are split over ranks."""

    def __init__(self, task: RareSymbolTask, batch_size: int, rank: int = 0, world: int = 1) -> None:
        if batch_size < 1 or not 0 <= rank < world:
            raise ValueError(f"expected batch_size >= 1 and 0 <= rank < world, got {batch_size}, {rank}, {world}")
        self.task, self.batch_size = task, batch_size
        self.rng = np.random.default_rng([task.seed, 1, rank])
        self.pool = list(self.rng.permutation(task.rare_train[rank::world])[::-1])  # pop() = next new symbol
        self.due: dict[int, list[int]] = {}   # step -> symbols that come back then
        self.owed: dict[int, int] = {}        # symbol -> returns still to come after its next appearance
        self.step = 0
        self.exhausted_at: int | None = None  # the first step that wanted a new rare symbol and had none

    def __iter__(self) -> Iterator[StreamBatch]:
        return self

    def __next__(self) -> StreamBatch:
        task, rng, t = self.task, self.rng, self.step
        returning = self.due.pop(t, [])
        carriers = max(int(rng.binomial(self.batch_size, task.rare_prob)), len(returning))
        symbols = [(s, 2) for s in returning]
        while len(symbols) < carriers:
            if not self.pool:
                self.exhausted_at = t if self.exhausted_at is None else self.exhausted_at
                break
            s = int(self.pool.pop())
            self.owed[s] = int(rng.integers(task.min_returns, task.max_returns + 1))
            symbols.append((s, 1))
        for s, _ in symbols:
            if self.owed[s] == 0:  # its last appearance: never used again
                del self.owed[s]
                continue
            self.owed[s] -= 1
            while True:  # a gap of 1..max_gap steps, to a step that still has room
                when = t + int(rng.integers(1, task.max_gap + 1))
                if len(self.due.get(when, ())) < self.batch_size:
                    break
            self.due.setdefault(when, []).append(s)
        self.step += 1
        return _place(task, rng, self.batch_size, symbols)


@dataclass
class ProbeItem:
    """A rare test symbol, the gap it is tested at, and the steps of its context and probe."""

    symbol: int
    gap: int
    context_step: int
    probe_step: int


class ProbeStream:
    """The test protocol's stream: `len(self)` steps of `StreamBatch`es (kind 1 = context,
    2 = probe, 3 = rare training symbol as traffic, 0 = plain traffic).

    symbols_per_gap rare test symbols per gap (default: all test symbols, split evenly), their
    contexts at random steps of the first `window` (default: about half a batch of contexts a
    step), each probe exactly `gap` steps after its context, at most `batch_size` of them a step.
    """

    def __init__(self, task: RareSymbolTask, batch_size: int, gaps: tuple[int, ...] = (1, 100, 1000, 5000),
                 symbols_per_gap: int | None = None, window: int | None = None) -> None:
        if not gaps or min(gaps) < 1:
            raise ValueError(f"gaps must be a non-empty tuple of steps >= 1, got {gaps}")
        rng = np.random.default_rng([task.seed, 2])
        test = rng.permutation(task.rare_test)
        per_gap = symbols_per_gap if symbols_per_gap is not None else len(test) // len(gaps)
        if not 1 <= per_gap * len(gaps) <= len(test):
            raise ValueError(f"symbols_per_gap: {len(gaps)} gaps x {per_gap} symbols do not fit the "
                             f"{len(test)} rare test symbols")
        n = per_gap * len(gaps)
        window = window if window is not None else -(-n // max(1, batch_size // 2))
        count = np.zeros(window + max(gaps), dtype=np.int64)  # contexts + probes per step, at most batch_size
        self.items = []
        for symbol, gap in zip(test[:n], rng.permutation(np.repeat(gaps, per_gap))):
            for _ in range(1000):  # a random context step whose step and probe step have room
                c = int(rng.integers(0, window))
                if count[c] < batch_size and count[c + gap] < batch_size:
                    break
            else:
                raise ValueError(f"window: {n} contexts and probes do not fit {window} steps of {batch_size} sequences")
            count[c] += 1
            count[c + gap] += 1
            self.items.append(ProbeItem(int(symbol), int(gap), c, c + int(gap)))
        self.task, self.batch_size, self.gaps = task, batch_size, tuple(gaps)
        self.steps = window + max(gaps)
        self._events: dict[int, list[tuple[int, int]]] = {}
        for item in self.items:
            self._events.setdefault(item.context_step, []).append((item.symbol, 1))
            self._events.setdefault(item.probe_step, []).append((item.symbol, 2))
        self._rng_seed = [task.seed, 3]

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[StreamBatch]:
        rng = np.random.default_rng(self._rng_seed)
        task = self.task
        for t in range(self.steps):
            events = list(self._events.get(t, []))
            traffic = int(rng.binomial(self.batch_size, task.rare_prob)) - len(events)
            events += [(int(s), 3) for s in rng.choice(task.rare_train, size=max(0, traffic))]
            yield _place(task, rng, self.batch_size, events)
