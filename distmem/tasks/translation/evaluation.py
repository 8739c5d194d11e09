"""The translation task's evaluations (shared/docs/translation-task.md, "Evaluation"): corpus
BLEU with sacreBLEU's signature, the memory-context split of a test set, and one-shot recall of
new and rare words.

Words are the tokens of sacreBLEU's 13a tokeniser, case kept. For a test set split into a
context half C and an evaluation half E (`context_split`):

- new words: word types that occur nowhere in the target side of the training data and at least
  once in the references of C;
- rare words: word types seen 1 to 5 times in the training targets and at least once in the
  references of C (the spec's "the same for rare words": the context has to show them too);
- an occurrence of such a word in a reference of E is recalled when the hypothesis for that
  sentence contains the same word.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from distmem.stats import wilson_interval

_TOKENIZE = Tokenizer13a()


def words(line: str) -> list[str]:
    """The 13a tokens of a line (sacreBLEU's default tokeniser, case kept)."""
    return _TOKENIZE(line.strip()).split()


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """sacreBLEU corpus BLEU of detokenised `hypotheses` against raw `references` (default
    settings: 13a, mixed case), with its signature and the counts behind it."""
    if len(hypotheses) != len(references):
        raise ValueError(f"hypotheses: expected one per reference ({len(references)}), got {len(hypotheses)}")
    metric = BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": score.score, "signature": str(metric.get_signature()), "precisions": score.precisions,
            "bp": score.bp, "hyp_len": score.sys_len, "ref_len": score.ref_len, "sentences": len(references)}


def context_split(n: int) -> tuple[slice, slice]:
    """The context half C (the first floor(n / 2) pairs, in file order) and the evaluation half E."""
    return slice(0, n // 2), slice(n // 2, n)


def word_counts(lines: Iterable[str]) -> Counter:
    """Occurrences of each word type in `lines` (the training targets)."""
    counts: Counter = Counter()
    for line in lines:
        counts.update(words(line))
    return counts


@dataclass(frozen=True)
class RecallWords:
    """The word types whose one-shot recall is measured."""

    new: frozenset[str]
    rare: frozenset[str]


def recall_words(train_counts: Counter, context_references: Iterable[str], rare_max: int = 5) -> RecallWords:
    """New (never in training) and rare (1..rare_max in training) word types that the
    references of the context half C show."""
    shown = {w for line in context_references for w in words(line)}
    return RecallWords(new=frozenset(w for w in shown if train_counts[w] == 0),
                     rare=frozenset(w for w in shown if 1 <= train_counts[w] <= rare_max))


def recall(hypotheses: Sequence[str], references: Sequence[str], targets: frozenset[str]) -> dict[str, Any]:
    """One-shot recall over the evaluation half: occurrences of `targets` words in the
    references, and how many of them the hypothesis of the same sentence contains. Percent, with
    a 95% Wilson interval."""
    if len(hypotheses) != len(references):
        raise ValueError(f"hypotheses: expected one per reference ({len(references)}), got {len(hypotheses)}")
    hits = occurrences = 0
    for hyp, ref in zip(hypotheses, references):
        said = set(words(hyp))
        for word in words(ref):
            if word in targets:
                occurrences += 1
                hits += word in said
    return {"recalled": hits, "occurrences": occurrences,
            "recall": 100.0 * hits / occurrences if occurrences else float("nan"),
            "ci95": wilson_interval(hits, occurrences), "word_types": len(targets)}
