"""The translation evaluations on hand-computed cases: sacreBLEU's score and signature, the
context split, new and rare words, and their one-shot recall."""

import math

import pytest
from sacrebleu.metrics import BLEU

from distmem.tasks.translation.evaluation import bleu, context_split, recall, recall_words, word_counts, words


def test_words_are_13a_tokens_with_case_kept():
    assert words('Der Hund, "Bello", läuft 3.5 km.') == ["Der", "Hund", ",", '"', "Bello", '"', ",", "läuft", "3.5",
                                                        "km", "."]


def test_bleu_is_sacrebleus_corpus_score_with_its_signature():
    refs = ["Ein Hund läuft über die Wiese .", "Zwei Kinder spielen im Sand ."]
    hyps = ["Ein Hund rennt über die Wiese .", "Zwei Kinder spielen im Sand ."]
    got = bleu(hyps, refs)
    assert got["bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score)
    assert 0 < got["bleu"] < 100 and bleu(refs, refs)["bleu"] == pytest.approx(100.0)
    assert got["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert (got["hyp_len"], got["ref_len"], got["sentences"]) == (13, 13, 2)  # 7 + 6 tokens
    with pytest.raises(ValueError, match="hypotheses: expected one per reference"):
        bleu(hyps[:1], refs)


@pytest.mark.parametrize("n, c, e", [(5, (0, 2), (2, 5)), (4, (0, 2), (2, 4)), (1, (0, 0), (0, 1))])
def test_context_is_the_first_half_rounded_down(n, c, e):
    context, evaluation = context_split(n)
    assert (context.start, context.stop) == c and (evaluation.start, evaluation.stop) == e


def test_new_and_rare_words_and_their_recall_by_hand():
    train = ["der Hund läuft", "der Hund schläft", "die Katze schläft", "ein Zebra", "der der der der"]
    counts = word_counts(train)
    assert counts["der"] == 6 and counts["Hund"] == 2 and counts["Zebra"] == 1 and counts["zebra"] == 0
    context_refs = ["der Okapi läuft", "ein Zebra und ein Okapi", "der Hund schläft"]
    sets = recall_words(counts, context_refs)
    assert sets.new == {"Okapi", "und"}  # shown by C, never in training
    assert sets.rare == {"läuft", "ein", "Zebra", "Hund", "schläft"}  # 1..5 times in training; "der": 6
    eval_refs = ["ein Okapi und ein Zebra", "das Okapi schläft", "kein neues Wort"]
    eval_hyps = ["ein Okapi , ein Pferd", "das Tier schläft", "kein Wort"]
    # new-word occurrences in E's references: Okapi (s1), und (s1), Okapi (s2) -> recalled: Okapi in s1 only
    got = recall(eval_hyps, eval_refs, sets.new)
    assert (got["recalled"], got["occurrences"], got["word_types"]) == (1, 3, 2)
    assert got["recall"] == pytest.approx(100 / 3) and got["ci95"][0] < 100 / 3 < got["ci95"][1]
    empty = recall(eval_hyps, eval_refs, frozenset())
    assert empty["occurrences"] == 0 and math.isnan(empty["recall"])
