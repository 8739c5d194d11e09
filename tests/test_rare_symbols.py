"""The rare-symbol task's generator (the spec's invariants, checked by replaying the streams), its
test stream, the protocol's bookkeeping, and a smoke run of the job's quick preset."""

import json
from collections import defaultdict

import numpy as np
import pytest
import torch

from distmem import LocalMemory
from distmem.stats import wilson_interval
from distmem.tasks.rare_symbols import RareSymbolRunConfig
from distmem.tasks.rare_symbols.data import ProbeStream, RareSymbolTask, TrainingStream
from distmem.tasks.rare_symbols.protocol import ProbeResult, run_protocol, summarize
from distmem.tasks.rare_symbols.training import to_tensors

from conftest import run_job

TASK = RareSymbolTask(seed=3)


def appearances(stream, steps):
    """{rare symbol: [(step, kind)]} and the batches of `steps` steps of a stream."""
    seen, batches = defaultdict(list), []
    for t in range(steps):
        b = next(stream)
        batches.append(b)
        rare_cells = TASK.is_rare(b.inputs)
        assert (rare_cells.sum(1) <= 1).all()  # at most one rare symbol per sequence ...
        rows = np.nonzero(b.rare_pos >= 0)[0]
        assert (b.inputs[rows, b.rare_pos[rows]] == b.rare[rows]).all()  # ... where the batch says
        assert rare_cells.sum() == len(rows)
        for r in rows:
            seen[int(b.rare[r])].append((t, int(b.kind[r])))
    return seen, batches


def test_mapping_is_a_seeded_permutation():
    f = TASK.mapping()
    assert f[0] == 0 and sorted(f[1:]) == list(range(1, TASK.vocab + 1))
    assert np.array_equal(f, RareSymbolTask(seed=3).mapping())
    assert not np.array_equal(f, RareSymbolTask(seed=4).mapping())
    x = np.array([[1, 5, 0]])
    assert TASK.targets(x).tolist() == [[f[1], f[5], 0]]
    assert (TASK.bos, TASK.eos, TASK.target_vocab) == (16385, 16386, 16387)
    assert (len(TASK.rare_train), len(TASK.rare_test)) == (6144, 2048)


def test_training_stream_keeps_the_specs_invariants():
    steps, batch = 5000, 16
    seen, batches = appearances(TrainingStream(TASK, batch), steps)
    assert not set(seen) & set(TASK.rare_test.tolist())  # rare test symbols never in training
    assert all(TASK.frequent < s <= TASK.rare_train_end for s in seen)
    settled = 0
    for events in seen.values():
        steps_, kinds = zip(*events)
        assert kinds[0] == 1 and set(kinds[1:]) <= {2}  # introduced once, then returns
        gaps = np.diff(steps_)
        assert ((gaps >= 1) & (gaps <= TASK.max_gap)).all()
        assert len(events) <= 1 + TASK.max_returns
        if steps_[0] + TASK.max_returns * TASK.max_gap < steps:  # its whole life lies in the window
            assert len(events) >= 1 + TASK.min_returns
            settled += 1
    assert settled > 500
    carried = np.mean([(b.rare_pos >= 0).mean() for b in batches[:1000]])  # before the pool runs out
    assert 0.45 < carried < 0.6  # about rare_prob, a little more where returns pile up
    frequent = np.concatenate([b.inputs[~TASK.is_rare(b.inputs)] for b in batches])
    assert frequent.min() >= 1 and frequent.max() <= TASK.frequent
    again, _ = appearances(TrainingStream(TASK, batch), 300)  # seeded: the same stream again
    assert all(seen[s][:len(e)] == e for s, e in again.items())


def test_the_trainers_streams_share_no_rare_symbol_and_the_pool_runs_out_once():
    a, _ = appearances(TrainingStream(TASK, 8, rank=0, world=2), 400)
    b, _ = appearances(TrainingStream(TASK, 8, rank=1, world=2), 400)
    assert a and b and not set(a) & set(b)
    tiny = RareSymbolTask(vocab=60, frequent=30, rare_train_end=40)  # 10 rare training symbols
    stream = TrainingStream(tiny, 8)
    seen = defaultdict(int)
    for _ in range(2000):
        batch = next(stream)
        for s in batch.rare[batch.rare > 0]:
            seen[int(s)] += 1
    assert stream.exhausted_at is not None and len(seen) == 10 and max(seen.values()) <= 1 + tiny.max_returns


def test_test_stream_shows_each_test_symbol_as_a_context_then_a_probe_gap_steps_later():
    gaps = (1, 100, 1000)
    stream = ProbeStream(TASK, 16, gaps=gaps, symbols_per_gap=40)
    assert len(stream.items) == 120 and len(stream) == 15 + 1000  # 120 contexts at 8 a step, then the longest gap
    assert max(it.probe_step for it in stream.items) < len(stream)
    events = defaultdict(list)
    test = set(TASK.rare_test.tolist())
    for t, batch in enumerate(stream):
        assert len(batch.inputs) == 16
        for r in np.nonzero(batch.rare_pos >= 0)[0]:
            s, kind = int(batch.rare[r]), int(batch.kind[r])
            if kind == 3:
                assert s not in test  # traffic carries rare training symbols only
            else:
                assert s in test
                events[s].append((t, kind))
    by_symbol = {it.symbol: it for it in stream.items}
    assert set(events) == set(by_symbol)
    for s, ev in events.items():
        it = by_symbol[s]
        assert ev == [(it.context_step, 1), (it.probe_step, 2)] and it.probe_step - it.context_step == it.gap
    assert sorted({it.gap for it in stream.items}) == list(gaps)
    assert len({it.symbol for it in stream.items}) == 120


def test_teacher_forcing_tensors_and_the_summary_of_probes():
    t = to_tensors(TASK, np.array([[3, 4]]))
    f = TASK.mapping()
    assert t.tgt_in.tolist() == [[TASK.bos, f[3], f[4]]] and t.tgt_out.tolist() == [[f[3], f[4], TASK.eos]]
    results = [ProbeResult(1, True, 19, 19, True), ProbeResult(1, False, 18, 19, False),
               ProbeResult(100, False, 19, 19, False)]
    out = summarize(results, (1, 100))
    assert out["1"]["rare_accuracy"] == 50.0 and out["1"]["probes"] == 2 and out["1"]["exact_sequences"] == 50.0
    assert out["1"]["frequent_accuracy"] == pytest.approx(100 * 37 / 38) and out["100"]["rare_accuracy"] == 0.0
    assert out["100"]["rare_ci95"][0] == 0.0 and out["100"]["rare_ci95"][1] > 50  # one probe says little
    assert wilson_interval(512, 512)[0] == pytest.approx(100 * 512 / (512 + 1.96 ** 2))  # the closed form at p = 1
    lo, hi = wilson_interval(30, 100)
    assert lo < 30 < hi and hi - lo == pytest.approx(17.7, abs=0.1)


def test_the_protocol_with_the_extended_neural_gpu_reads_and_writes_its_memory():
    """The protocol's two model paths on the Extended Neural GPU: probes decoded with the memory,
    then each step's traffic written (one memory step per stream step)."""
    cfg = RareSymbolRunConfig(model="neural_gpu", nmaps=8, memory_size=512, k=8, gaps=(1, 3), symbols_per_gap=4)
    torch.manual_seed(0)
    model = cfg.build_model(use_memory=True)
    memory = LocalMemory(cfg.memory_config(), device="cpu")
    stream = ProbeStream(cfg.task(), 4, cfg.gaps, symbols_per_gap=4)
    results = run_protocol(model, memory, cfg.task(), stream)
    assert memory.step_count == len(stream) and (memory.values >= 0).sum() > 0
    assert all(results[g]["probes"] == 4 for g in ("1", "3"))
    baseline = run_protocol(cfg.build_model(use_memory=False), None, cfg.task(), stream)
    assert all(baseline[g]["probes"] == 4 for g in ("1", "3"))


@pytest.mark.slow  # about 1.5 minutes on 2 cores
def test_quick_preset_smoke_run_with_two_workers_and_two_shards(tmp_path):
    out = run_job("jobs.rare_symbols", "--preset", "quick", "--workers", "2", "--shards", "2",
                  "--storage", str(tmp_path))
    (run,) = tmp_path.iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["shards"] == 2 and set(metrics["results"]) == {"memory", "baseline"}
    for variant in ("memory", "baseline"):
        assert set(metrics["results"][variant]) == {"1", "10"}
        assert all(r["probes"] == 16 for r in metrics["results"][variant].values())
        assert (run / variant / "checkpoints" / "latest.json").is_file()
    saved = LocalMemory.from_file(run / "memory" / "checkpoints" / "step-0000020" / "memory", device="cpu")
    assert saved.step_count == 20 and (saved.values >= 0).sum() > 0  # life-long: one memory step a training step
    assert [p["step"] for p in metrics["curves"]["memory"]] == [10, 20]
    assert (run / "recall.png").stat().st_size > 1000
    assert "without" in out.stdout and str(run.resolve()) in out.stdout


@pytest.mark.slow  # about 1 minute on 2 cores
def test_quick_preset_with_the_extended_neural_gpu_end_to_end(tmp_path):
    run_job("jobs.rare_symbols", "--preset", "quick", "--model", "neural_gpu", "--nmaps", "16", "--height", "2",
            "--storage", str(tmp_path))
    (run,) = tmp_path.iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert (config["model"], config["nmaps"]) == ("neural_gpu", 16)
    for variant in ("memory", "baseline"):
        assert all(r["probes"] == 16 for r in metrics["results"][variant].values())
    assert metrics["memory_gain"] > 0  # the value's direct path was trained
    saved = LocalMemory.from_file(run / "memory" / "checkpoints" / "step-0000020" / "memory", device="cpu")
    assert saved.config.key_dim == 16 and saved.step_count == 20 and (saved.values >= 0).sum() > 0


def test_model_neural_gpu_starts_from_its_own_preset():
    from distmem.cli import parse_run_config
    from distmem.tasks.rare_symbols import PRESETS, RareSymbolRunConfig
    from jobs.rare_symbols import with_model_preset

    cfg, _ = parse_run_config(RareSymbolRunConfig, PRESETS, None, with_model_preset(["--model", "neural_gpu"]))
    assert (cfg.preset, cfg.model, cfg.nmaps, cfg.height, cfg.gate_bias) == ("neural_gpu", "neural_gpu", 32, 2, 2.0)
    cfg, _ = parse_run_config(RareSymbolRunConfig, PRESETS, None,
                              with_model_preset(["--model=neural_gpu", "--steps", "5"]))
    assert cfg.preset == "neural_gpu" and cfg.steps == 5
    argv = ["--preset", "quick", "--model", "neural_gpu"]  # an explicit preset wins
    assert with_model_preset(argv) == argv and with_model_preset(["--model", "tiny"]) == ["--model", "tiny"]
