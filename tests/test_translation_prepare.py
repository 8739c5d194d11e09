"""Preparing parallel corpora (shared/docs/translation-task.md, "Data pipeline") on real Multi30k
and WMT14 files: cleaning checked pair by pair against the rules, Parquet contents decoded back
to the text, .gz / .sgm / URIs, the folder reused, and every bad input refused with nothing left
behind."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from distmem.tasks.translation import DataError, PrepareSettings, load_prepared, prepare, read_lines

ROOT = Path(__file__).parents[1]
DATA = ROOT.parent / "shared" / "data"
VAL = (DATA / "multi30k" / "val.en.gz", DATA / "multi30k" / "val.de.gz")
SMALL = PrepareSettings(vocab=600, max_pieces=40, shard_pairs=400)


def lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.strip() for line in f]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """Multi30k val plus pairs each cleaning rule must drop: an empty side, a side too long, a
    length ratio far above 1.5."""
    folder = tmp_path_factory.mktemp("corpus")
    src, tgt = lines(VAL[0]), lines(VAL[1])
    long = " ".join(src[:8])  # far more than 40 pieces
    src += ["A dog runs.", long, "two young men are standing on a street corner near a red car", "  "]
    tgt += ["", long, "Zwei Männer.", "Leer."]
    paths = folder / "c.en.gz", folder / "c.de"
    with gzip.open(paths[0], "wt", encoding="utf-8") as f:
        f.write("\n".join(src) + "\n")
    paths[1].write_text("\n".join(tgt) + "\n", encoding="utf-8")  # one side plain, one gzipped
    return paths


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    return prepare([corpus], tmp_path_factory.mktemp("out") / "data", SMALL)


def test_every_pair_is_kept_or_dropped_by_the_rules_and_decodes_back(corpus, prepared):
    sp = spm.SentencePieceProcessor(model_file=str(prepared.spm_model))
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert sp.get_piece_size() == SMALL.vocab
    src = [line.strip() for line in gzip.open(corpus[0], "rt", encoding="utf-8")]
    tgt = [line.strip() for line in corpus[1].read_text(encoding="utf-8").splitlines()]
    expected, drops = set(), {"empty": 0, "long": 0, "ratio": 0}
    for number, (s, t) in enumerate(zip(src, tgt), 1):
        a, b = len(sp.encode(s)), len(sp.encode(t))
        if not s or not t:
            drops["empty"] += 1
        elif max(a, b) > 40:
            drops["long"] += 1
        elif max(a, b) > 10 and max(a, b) > 1.5 * min(a, b):
            drops["ratio"] += 1
        else:
            expected.add(number)
    n = len(src)
    assert drops["empty"] == 2 and drops["long"] >= 1 and drops["ratio"] >= 1  # the pairs added for each rule
    assert {n - 3, n}.isdisjoint(expected) and n - 2 not in expected and n - 1 not in expected
    table = pq.read_table(prepared.files)
    assert sorted(table["line"].to_pylist()) == sorted(expected)
    assert prepared.counts == {"read": n, "kept": len(expected), "dropped_empty": drops["empty"],
                               "dropped_too_long": drops["long"], "dropped_ratio": drops["ratio"]}
    for row in table.slice(0, 50).to_pylist():
        assert sp.decode(row["src"]) == src[row["line"] - 1] and sp.decode(row["tgt"]) == tgt[row["line"] - 1]
        assert (row["src_len"], row["tgt_len"], row["corpus"]) == (len(row["src"]), len(row["tgt"]), 0)
    assert [pq.read_metadata(f).num_rows for f in prepared.files] == [400, 400, len(expected) - 800]
    assert table.schema.field("src").type.value_type == pa.int32()


def test_the_manifest_describes_inputs_settings_and_files(corpus, prepared):
    manifest = json.loads((prepared.root / "manifest.json").read_text())
    assert manifest["inputs"][0]["src"] == str(corpus[0]) and manifest["inputs"][0]["lines"] == prepared.counts["read"]
    import hashlib
    assert manifest["inputs"][0]["tgt_sha256"] == hashlib.sha256(corpus[1].read_bytes()).hexdigest()
    assert manifest["settings"]["vocab"] == 600 and manifest["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert load_prepared(prepared.root).files == prepared.files


def test_preparing_again_reuses_the_folder_and_other_settings_are_refused(corpus, prepared):
    stamp = prepared.files[0].stat().st_mtime_ns
    again = prepare([corpus], prepared.root, SMALL)
    assert again.reused and again.counts == prepared.counts and prepared.files[0].stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="prepared from other inputs or settings"):
        prepare([corpus], prepared.root, PrepareSettings(vocab=500, max_pieces=40))


def test_sgm_and_uris_read_as_sacrebleu_reads_them(tmp_path):
    sgm = DATA / "wmt14" / "sgm" / "test-full" / "newstest2014-deen-src.en.sgm"  # its plain text: sacreBLEU's rule
    plain = (DATA / "wmt14" / "newstest2014-full.en").read_text(encoding="utf-8").splitlines()
    assert list(read_lines(str(sgm))) == [line.strip() for line in plain]
    assert list(read_lines(f"file://{VAL[0]}")) == lines(VAL[0])
    several = prepare([(f"file://{VAL[0]}", str(VAL[1])),
                       (str(DATA / "wmt14" / "newstest2012.en"), str(DATA / "wmt14" / "newstest2012.de"))],
                      tmp_path / "two", PrepareSettings(vocab=800))
    table = pq.read_table(several.files)
    assert set(table["corpus"].to_pylist()) == {0, 1} and several.counts["read"] == 1014 + 3003


def _unreadable(tmp_path: Path) -> dict[str, tuple[list, PrepareSettings, str]]:
    a, b = tmp_path / "a.en", tmp_path / "b.de"
    a.write_text("one\ntwo\nthree\n")
    b.write_text("eins\nzwei\n")
    bad = tmp_path / "bad.de"
    bad.write_bytes(b"eins\nzwei\ndr\xffei\n")
    empty_src, empty_tgt = tmp_path / "e.en", tmp_path / "e.de"
    empty_src.write_text("")
    empty_tgt.write_text("")
    some, blank = tmp_path / "some.en", tmp_path / "blank.de"
    some.write_text("\n".join(lines(VAL[0])[:200]) + "\n")
    blank.write_text("\n \n" * 100)
    return {
        "missing file": ([(str(tmp_path / "nope.en"), str(b))], SMALL, "nope.en: no such file"),
        "line counts": ([(str(a), str(b))], SMALL, r"a.en has 3 lines but .*b.de has 2"),
        "invalid UTF-8": ([(str(a), str(bad))], SMALL, r"bad.de: line 3 is not valid UTF-8"),
        "empty corpus": ([(str(empty_src), str(empty_tgt))], SMALL, "no non-empty sentence"),
        "only empty pairs": ([(str(some), str(blank))], PrepareSettings(vocab=100), "no pair is left after cleaning"),
        "vocabulary too large": ([VAL], PrepareSettings(vocab=100_000), r"vocab: 100000 pieces is more than this "
                                                                          r"text allows .*<= \d+"),
        "vocabulary too small": ([VAL], PrepareSettings(vocab=10), r"vocab: 10 pieces is fewer than this text needs"),
    }


def test_bad_input_is_a_clear_error_and_leaves_nothing_behind(tmp_path):
    (tmp_path / "in").mkdir()
    for case, (corpora, settings, message) in _unreadable(tmp_path / "in").items():
        out = tmp_path / "out" / case.replace(" ", "-")
        with pytest.raises(DataError, match=message):
            prepare(corpora, out, settings)
        assert not out.exists(), case
        assert not list((tmp_path / "out").glob(".*partial*")), case


def test_the_command_line_ends_bad_input_with_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs.prepare_translation", "--pair", str(tmp_path / "x.en"),
                          str(VAL[1]), "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "error: " in out.stderr and "x.en: no such file" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "o").exists()
