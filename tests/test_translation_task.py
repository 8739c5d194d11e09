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

import pytest
import torch
from test_training import assert_resume_equals_uninterrupted

from distmem import LocalMemory
from distmem.models.seq2seq import Seq2Seq
from distmem.tasks.translation import PrepareSettings, prepare
from distmem.tasks.translation.config import TranslationRunConfig
from distmem.tasks.translation.prepare import BOS, EOS, PAD
from distmem.tasks.translation.task import TranslationTask
from distmem.tasks.translation.training import Translator, make_batch, pair_batches

ROOT = Path(__file__).parents[1]
DATA = ROOT.parent / "shared" / "data"


def test_teacher_forcing_batch_by_hand():
    b = make_batch([[5, 6, 7], [8]], [[10, 11], [12, 13, 14]])
    assert b.src.tolist() == [[5, 6, 7, EOS], [8, EOS, PAD, PAD]]
    assert b.tgt_in.tolist() == [[BOS, 10, 11, PAD], [BOS, 12, 13, 14]]
    assert b.tgt_out.tolist() == [[10, 11, EOS, PAD], [12, 13, 14, EOS]]
    assert b.tokens == 6 + 3 + 4


def test_a_resumed_stream_continues_with_the_same_batches():
    """12 rows in chunks of 3, batches of 5: a stream resumed after one step starts at batch 2."""
    rows = [{"src": [[10 * c + r] for r in range(3)], "tgt": [[10 * c + r, 1] for r in range(3)]} for c in range(4)]
    whole = [b.src[:, 0].tolist() for b in pair_batches(iter(rows), 5)]
    assert whole == [[0, 1, 2, 10, 11], [12, 20, 21, 22, 30]]
    from distmem.training import skip_rows
    resumed = [b.src[:, 0].tolist() for b in pair_batches(skip_rows(iter(rows), 5), 5)]
    assert resumed == whole[1:]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Multi30k val prepared with a small vocabulary, and a config of a tiny model over it."""
    root = tmp_path_factory.mktemp("translation")
    prepared = prepare([(DATA / "multi30k" / "val.en.gz", DATA / "multi30k" / "val.de.gz")], root / "data",
                       PrepareSettings(vocab=500))
    cfg = TranslationRunConfig(preset="quick", data=str(DATA), vocab=500, hidden=32, dropout=0.1, workers=1,
                               shards=1, steps=4, batch_pairs=6, warmup=2, memory_size=256, k=8, beam=2,
                               dev_sentences=4, eval_every=2, log_every=1, checkpoint_every=2)
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
    out = subprocess.run([sys.executable, "-m", "jobs.translate", "--preset", "quick", "--storage", str(tmp_path),
                          "--prepared", str(tmp_path / "prepared")], cwd=ROOT, capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
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
