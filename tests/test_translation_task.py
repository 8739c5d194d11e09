"""The translation task on the one trainer, in a plain process: teacher-forcing batches by hand,
a run interrupted after 2 steps and resumed equals an uninterrupted one (both variants), the
Translator (one line out per line in, `remember` writes only the memory), the learning-rate
schedule and the config's errors. The end-to-end job is in the slow tier."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import assert_resume_equals_uninterrupted

from distmem import LocalMemory
from distmem.models.seq2seq import Seq2Seq
from distmem.tasks.translation import PrepareSettings, prepare
from distmem.tasks.translation.config import TranslationRunConfig
from distmem.tasks.translation.prepare import BOS, EOS, PAD
from distmem.tasks.translation.task import TranslationTask
from distmem.tasks.translation.training import Translator, bucket_batches, make_batch
from distmem.training import skip_rows

from conftest import run_job

ROOT = Path(__file__).parents[1]
DATA = ROOT.parent / "shared" / "data"


def test_teacher_forcing_batch_by_hand():
    b = make_batch([[5, 6, 7], [8]], [[10, 11], [12, 13, 14]])
    assert b.src.tolist() == [[5, 6, 7, EOS], [8, EOS, PAD, PAD]]
    assert b.tgt_in.tolist() == [[BOS, 10, 11, PAD], [BOS, 12, 13, 14]]
    assert b.tgt_out.tolist() == [[10, 11, EOS, PAD], [12, 13, 14, EOS]]
    assert b.tokens == 6 + 3 + 4


def _stream(n: int, chunk: int = 7, seed: int = 0) -> list[dict]:
    """n rows of random lengths 1-30, the target's near the source's (row i: src starts with
    i + 10), in chunks as Ray Data gives them."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 31, n)
    rows = [([i + 10, *[4] * int(m - 1)], [5] * int(m + rng.integers(0, 3))) for i, m in enumerate(lengths)]
    return [{"src": [r[0] for r in rows[c:c + chunk]], "tgt": [r[1] for r in rows[c:c + chunk]]}
            for c in range(0, n, chunk)]


def _ids(batch) -> list[int]:
    return [i - 10 for i in batch.src[:, 0].tolist()]


def test_length_buckets_hold_every_pair_once_with_less_padding_and_equal_token_counts():
    pairs, window = 8, 10
    batches = list(bucket_batches(iter(_stream(240)), pairs, window, seed=3))
    assert len(batches) == 30 and sorted(i for b in batches for i in _ids(b)) == list(range(240))
    for w in range(3):  # each window's batches hold exactly that window's rows
        held = sorted(i for b in batches[w * window:(w + 1) * window] for i in _ids(b))
        assert held == list(range(w * 80, (w + 1) * 80))
    padded = [b.src.numel() + b.tgt_out.numel() for b in batches]
    real = sum(b.tokens for b in batches)
    stream = [row for c in _stream(240) for row in zip(c["src"], c["tgt"])]
    consecutive = [make_batch(*zip(*stream[i:i + pairs])) for i in range(0, 240, pairs)]  # batches as they come
    assert real / sum(padded) > 0.85 > real / sum(b.src.numel() + b.tgt_out.numel() for b in consecutive)
    assert max(padded) < 2 * min(padded)  # short pairs many to a batch, long pairs few
    assert max(len(b.src) for b in batches) > pairs > min(len(b.src) for b in batches)


def test_a_resumed_bucket_stream_continues_with_the_same_batches_and_each_epoch_reshuffles():
    pairs, window = 5, 4
    rows = _stream(40) * 2  # two epochs of a worker's 40 rows
    whole = [_ids(b) for b in bucket_batches(iter(rows), pairs, window, seed=1, rank=2)]
    assert len(whole) == 16
    for start in range(16):  # the trainer skips the windows before start's, the task the rest
        resumed = bucket_batches(skip_rows(iter(rows), start // window * window * pairs), pairs, window,
                                 seed=1, rank=2, start=start)
        assert [_ids(b) for b in resumed] == whole[start:]
    first, second = whole[:8], whole[8:]
    assert sorted(map(sorted, first)) != sorted(map(sorted, second)) or first != second
    assert sorted(i for b in second for i in b) == list(range(40))
    other_rank = [_ids(b) for b in bucket_batches(iter(rows), pairs, window, seed=1, rank=3)]
    assert other_rank != whole


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Multi30k val prepared with a small vocabulary, and a config of a tiny model over it."""
    root = tmp_path_factory.mktemp("translation")
    prepared = prepare([(DATA / "multi30k" / "val.en.gz", DATA / "multi30k" / "val.de.gz")], root / "data",
                       PrepareSettings(vocab=500))
    cfg = TranslationRunConfig(preset="quick", data=str(DATA), vocab=500, hidden=32, dropout=0.1, workers=1,
                               shards=1, steps=4, batch_pairs=6, warmup=2, memory_size=256, k=8, beam=2,
                               dev_sentences=4, eval_every=2, log_every=1, checkpoint_every=2,
                               bucket_window=3)  # resumed at step 2: within a window
    return prepared, cfg


@pytest.mark.parametrize("use_memory", [True, False])
def test_translation_interrupted_and_resumed_equals_uninterrupted(small_data, use_memory, tmp_path):
    prepared, cfg = small_data
    saved = assert_resume_equals_uninterrupted(lambda: TranslationTask(cfg, prepared, use_memory), tmp_path)
    assert [e["step"] for e in saved["evals"]] == [2, 4] and all(e["dev_bleu"] >= 0 for e in saved["evals"])
    assert [round(c["lr"], 6) for c in saved["curve"]] == [round(cfg.lr_at(s), 6) for s in range(4)]


def test_the_translator_translates_every_line_and_remember_writes_only_the_memory(small_data):
    prepared, cfg = small_data
    torch.manual_seed(0)
    model = Seq2Seq(cfg.model_config(use_memory=True))
    memory = LocalMemory(cfg.memory_config(), device="cpu")
    translator = Translator(model, str(prepared.spm_model), memory, beam=2)
    lines = ["A man rides a bike.", "Two dogs play in the snow.", "A woman."]
    out = translator.translate(lines)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    assert translator.translate(lines[::-1]) == out[::-1]  # order kept through the length sorting
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    translator.remember(lines[:2], ["Ein Mann fährt Rad.", "Zwei Hunde spielen im Schnee."])
    targets = sum(len(translator.sp.encode(t)) + 1 for t in ["Ein Mann fährt Rad.", "Zwei Hunde spielen im Schnee."])
    assert memory.step_count == 1 and int((memory.state()["values"] >= 0).sum()) == targets
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no memory"):
        Translator(model, str(prepared.spm_model)).remember(lines, lines)
    with pytest.raises(ValueError, match="tgt_lines"):
        translator.remember(lines, lines[:1])


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    cfg = TranslationRunConfig(lr=1e-3, warmup=10, steps=110)
    assert cfg.lr_at(0) == pytest.approx(1e-4) and cfg.lr_at(9) == pytest.approx(1e-3)
    assert cfg.lr_at(10) == pytest.approx(1e-3) and cfg.lr_at(60) == pytest.approx(1e-3 * (0.1 + 0.45))
    assert cfg.lr_at(110) == pytest.approx(1e-4) and math.isclose(cfg.lr_at(500), 1e-4)


@pytest.mark.parametrize("changes, message", [
    (dict(preset="wmt14"), "--train: the wmt14 preset needs"),
    (dict(preset="wmt14", train=("a.en",)), "--train"),
    (dict(dropout=1.0), "--dropout"),
    (dict(hidden=33), "--hidden"),
    (dict(batch_pairs=0), "--batch-pairs"),
])
def test_bad_configs_name_the_flag(changes, message):
    with pytest.raises(ValueError, match=message):
        replace(TranslationRunConfig(), **changes)


def test_the_job_ends_a_missing_data_folder_with_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs.translate", "--data", str(tmp_path / "nowhere"),
                          "--storage", str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "error: --data: no " in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path):
    """Both variants on Ray Train (2 trainers, 2 memory shards), the test set's three evaluations."""
    out = run_job("jobs.translate", "--preset", "quick", "--storage", str(tmp_path), "--prepared",
                  str(tmp_path / "prepared"), timeout=1200)
    run = next(p for p in tmp_path.iterdir() if p.name.startswith("translate-quick"))
    metrics = json.loads((run / "metrics.json").read_text())
    result = metrics["results"]["test_2016_flickr"]
    assert result["sentences"] == 1000 and result["context"] == 500
    for part in (result["memory"]["no_context"], result["memory"]["context"], result["baseline"]):
        assert part["bleu_e"]["signature"].startswith("nrefs:1|case:mixed") and part["new_words"]["occurrences"] >= 0
    assert [e["step"] for e in metrics["dev_bleu"]["memory"]] == [4, 8]
    assert (run / "bleu.png").stat().st_size > 0 and "BLEU (beam)" in out.stdout
    with gzip.open(DATA / "multi30k" / "test_2016_flickr.de.gz", "rt") as f:
        assert sum(1 for _ in f) == result["sentences"]


@pytest.mark.slow
def test_wmt14_sample_preset_end_to_end(tmp_path):
    """The WMT path: the 10k sample prepared, both variants trained, newstest2013 as the dev
    curve, both newstest2014 sets evaluated (their first sentences, to fit CI)."""
    out = run_job("jobs.translate", "--preset", "wmt14-sample", "--storage", str(tmp_path), "--prepared",
                  str(tmp_path / "prepared"), "--steps", "30", "--eval-every", "15", "--dev-sentences", "20",
                  "--test-sentences", "60", "--checkpoint-every", "15", "--beam", "2", timeout=1500)
    run = next(p for p in tmp_path.iterdir() if p.name.startswith("translate-wmt14-sample"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["prepared"]["counts"]["read"] == 10_000
    assert sum(metrics["prepared"]["counts"][k] for k in ("kept", "dropped_empty", "dropped_too_long",
                                                           "dropped_ratio")) == 10_000
    assert sorted(metrics["results"]) == ["newstest2014-filtered", "newstest2014-full"]
    for result in metrics["results"].values():
        assert result["sentences"] == 60 and result["context"] == 30 and result["evaluation"] == 30
        assert 0 <= result["memory"]["bleu"]["bleu"] <= 100 and "tok:13a" in result["baseline"]["bleu"]["signature"]
    assert [e["step"] for e in metrics["dev_bleu"]["baseline"]] == [15, 30]
    assert [c["step"] for c in metrics["curves"]["memory"]][-1] == 30
    assert "newstest2014-full: 60 sentences" in out.stdout and (run / "bleu.png").stat().st_size > 0


@pytest.fixture(scope="module")
def trained_run(small_data, tmp_path_factory):
    """A run folder as jobs.translate leaves it: memory/ and baseline/ trained 4 steps, spm.model."""
    import shutil

    from distmem.runs import RunStore
    from distmem.training import fit_local
    prepared, cfg = small_data
    run = tmp_path_factory.mktemp("run")
    for variant, use_memory in (("memory", True), ("baseline", False)):
        fit_local(TranslationTask(cfg, prepared, use_memory), RunStore(run / variant))
    shutil.copy(prepared.spm_model, run / "spm.model")
    return run


def test_a_translator_from_a_run_folder_translates_with_its_memory(trained_run):
    lines = ["A dog runs on the grass.", "Two children play."]
    with_memory = Translator.from_checkpoint(trained_run, beam=2)
    assert with_memory.memory is not None and with_memory.memory.step_count == 4
    assert len(with_memory.translate(lines)) == 2
    assert Translator.from_checkpoint(trained_run, "baseline").memory is None
    with pytest.raises(ValueError, match="variant"):
        Translator.from_checkpoint(trained_run, "other")
    with pytest.raises(FileNotFoundError, match="not a translation run folder"):
        Translator.from_checkpoint(trained_run / "memory")


def test_translate_file_writes_one_line_per_input_line_and_scores_a_reference(trained_run, tmp_path):
    src = [line.strip() for line in gzip.open(DATA / "multi30k" / "val.en.gz", "rt")][:6]
    ref = [line.strip() for line in gzip.open(DATA / "multi30k" / "val.de.gz", "rt")][:6]
    (tmp_path / "in.en").write_text("\n".join(src) + "\n")
    (tmp_path / "ref.de").write_text("\n".join(ref) + "\n")
    out = subprocess.run([sys.executable, "-m", "jobs.translate_file", str(trained_run), "--input",
                          str(tmp_path / "in.en"), "--output", str(tmp_path / "out.de"), "--beam", "2", "--context",
                          str(tmp_path / "in.en"), str(tmp_path / "ref.de"), "--reference", str(tmp_path / "ref.de")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len((tmp_path / "out.de").read_text().split("\n")) == len(src) + 1  # one line each, newline-terminated
    assert "BLEU = " in out.stdout and "nrefs:1|case:mixed" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "jobs.translate_file", str(trained_run), "--input",
                          str(tmp_path / "in.en"), "--reference", str(tmp_path / "nope.de")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "nope.de: no such file" in bad.stderr and "Traceback" not in bad.stderr


def test_a_run_whose_checkpoint_carries_a_pickle_payload_is_refused_without_running_it(trained_run, tmp_path):
    import pickle
    import shutil

    from test_untrusted import Payload
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    marker = tmp_path / "payload-ran"
    latest = json.loads((run / "memory" / "checkpoints" / "latest.json").read_text())["name"]
    with open(run / "memory" / "checkpoints" / latest / "model.pt", "wb") as f:
        pickle.dump({"model": Payload(str(marker)), "step": 4}, f)
    out = subprocess.run([sys.executable, "-m", "jobs.translate_file", str(run), "--input",
                          str(DATA / "multi30k" / "val.en.gz")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "error: checkpoint:" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not marker.exists()
