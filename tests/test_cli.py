"""Command lines built from the run configs: flags from the fields' real types, choices and help
shown, presets overridden, and bad flags, values or data folders ending the command with one
clear line and a non-zero exit status (no traceback)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distmem.cli import from_dict, parse_run_config
from distmem.tasks.omniglot import PRESETS as OMNIGLOT
from distmem.tasks.omniglot import OmniglotRunConfig
from distmem.tasks.rare_symbols import PRESETS as RARE
from distmem.tasks.rare_symbols import RareSymbolRunConfig

ROOT = Path(__file__).parents[1]


def parse(cls, presets, argv):
    return parse_run_config(cls, presets, None, argv)[0]


def test_flags_override_the_preset_with_their_real_types():
    cfg = parse(OmniglotRunConfig, OMNIGLOT, [])
    assert cfg.preset == "default" and cfg.conv_norm and cfg.model_config().batch_norm and cfg.batches == 180
    cfg = parse(OmniglotRunConfig, OMNIGLOT, ["--preset", "paper"])
    assert not cfg.conv_norm and cfg.lr == 1e-4  # the paper's network and settings
    cfg = parse(OmniglotRunConfig, OMNIGLOT, ["--conv-norm", "off", "--batches", "7", "--lr", "0.5",
                                              "--mode", "lifelong", "--data", "/x"])
    assert (cfg.conv_norm, cfg.batches, cfg.lr, cfg.mode, cfg.data) == (False, 7, 0.5, "lifelong", "/x")
    cfg = parse(RareSymbolRunConfig, RARE, ["--gaps", "1,10,100", "--model", "small"])
    assert cfg.gaps == (1, 10, 100) and cfg.model == "small" and cfg.steps == 700
    assert parse(RareSymbolRunConfig, RARE, ["--preset", "quick"]).gaps == (1, 10)


def test_a_saved_config_reads_back_equal():
    cfg = parse(RareSymbolRunConfig, RARE, ["--gaps", "2,20"])
    assert from_dict(RareSymbolRunConfig, json.loads(json.dumps(vars(cfg)))) == cfg  # JSON lists back to tuples
    with pytest.raises(ValueError, match="unknown RareSymbolRunConfig fields"):
        from_dict(RareSymbolRunConfig, {"gap": 1})


@pytest.mark.parametrize("argv, message", [
    (["--conv-norm", "maybe"], "--conv-norm: expected on or off, got 'maybe'"),
    (["--mode", "forever"], "--mode: invalid choice: 'forever' (choose from 'episodic', 'lifelong')"),
    (["--batches", "x"], "--batches: invalid int value: 'x'"),
    (["--workers", "0"], "--workers: expected >= 1, got 0"),
    (["--k", "9000"], "MemoryConfig.k=9000 is larger than the memory"),
    (["--lr", "nan"], "--lr: expected a finite number > 0, got nan"),
])
def test_bad_values_end_with_one_line_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(OmniglotRunConfig, OMNIGLOT, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_gaps_name_the_flag(capsys):
    for argv, message in ((["--gaps", "1,x"], "expected comma-separated int values"),
                          (["--gaps", "0,5"], "--gaps: expected comma-separated steps >= 1")):
        with pytest.raises(SystemExit):
            parse(RareSymbolRunConfig, RARE, argv)
        assert message in capsys.readouterr().err


def test_help_shows_every_flag_with_its_choices_and_help_line():
    out = " ".join(subprocess.run([sys.executable, "-m", "jobs.omniglot", "--help"], cwd=ROOT, capture_output=True,
                                  text=True, check=True).stdout.split())
    assert "--mode {episodic,lifelong}" in out and "--backend {torch,faiss,ivf}" in out
    assert "--conv-norm {on,off}" in out
    assert "one sharded memory for all trainers" in out and "(default preset: 180)" in out
    out = " ".join(subprocess.run([sys.executable, "-m", "jobs.rare_symbols", "--help"], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout.split())
    assert "--gaps INT,..." in out and "--model {tiny,small,gnmt,neural_gpu}" in out
    assert "(default preset: 1,100,1000,5000)" in out


@pytest.mark.parametrize("job, argv, message", [
    ("jobs.omniglot", ["--data", "/nowhere/omniglot"],
     "error: data_dir: missing /nowhere/omniglot/images_background.zip"),
    ("jobs.omniglot", ["--resume", "/nowhere/run"], "--resume: /nowhere/run is not a run folder"),
    ("jobs.omniglot", ["--bogus"], "unrecognized arguments: --bogus"),
    ("jobs.omniglot_classify", ["/nowhere", "--support", "/nowhere", "--query", "/x"],
     "error: --support: no such folder"),
])
def test_jobs_end_with_one_clear_line_and_a_non_zero_status(job, argv, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", job, *argv, "--storage", str(tmp_path)] if job == "jobs.omniglot"
                         else [sys.executable, "-m", job, *argv], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not any(tmp_path.iterdir())  # no run folder left behind
