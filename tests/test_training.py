"""The one training loop (`distmem.training`) and the one Ray trainer (`distmem.distributed.fit`):
a run interrupted after 2 steps and resumed equals an uninterrupted run of 4 (model, optimizer,
memory, data position) for both tasks; evaluations change nothing; a toy task defined in the
tests streams Parquet rows in a plain process and through Ray Data; the layering rules hold."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from distmem import LocalMemory, checkpoints
from distmem.runs import RunStore
from distmem.tasks.omniglot import OmniglotRunConfig, OmniglotTask
from distmem.tasks.omniglot.data import Split
from distmem.tasks.rare_symbols import RareSymbolRunConfig, RareSymbolsTask
from distmem.training import fit_local, skip_rows

from conftest import state_equal
from sockets import LOOPBACK
from toy_task import ToyConfig, ToyTask, write_rows

ROOT = Path(__file__).parents[1]


class Interrupted(Exception):
    pass


class CrashAt:
    """A task that dies at the start of step `at` (after the checkpoint of step `at`)."""

    def __init__(self, task, at: int) -> None:
        self.task, self.at = task, at

    def __getattr__(self, name):
        return getattr(self.task, name)

    def train_step(self, model, memory, batch, optimizer, step):
        if step == self.at:
            raise Interrupted
        return self.task.train_step(model, memory, batch, optimizer, step)


def final(store: RunStore) -> tuple[dict, dict | None]:
    """The latest checkpoint's payload and the state of the memory saved with it."""
    checkpoint = checkpoints.latest(store)
    where = checkpoints.memory_location(store, checkpoint)
    return checkpoints.load(store, checkpoint), LocalMemory.from_file(where, device="cpu").state() if where else None


def same(a, b) -> bool:
    """Nested equality with tensors compared exactly (timings left out)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(k == "seconds" or same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_resume_equals_uninterrupted(make_task, tmp_path, steps: int = 4) -> dict:
    whole, resumed = RunStore(tmp_path / "whole"), RunStore(tmp_path / "resumed")
    fit_local(make_task(), whole)
    with pytest.raises(Interrupted):
        fit_local(CrashAt(make_task(), at=2), resumed)
    assert checkpoints.load(resumed, checkpoints.latest(resumed))["step"] == 2
    fit_local(make_task(), resumed)  # a fresh process would do the same: everything comes from the run folder
    (a, memory_a), (b, memory_b) = final(whole), final(resumed)
    assert a["step"] == b["step"] == steps
    assert same(a["model"], b["model"]) and same(a["optimizer"], b["optimizer"])
    assert a["optimizer"]["state"], "the optimizer state was saved"
    assert same(a["curve"], b["curve"]) and same(a["evals"], b["evals"]) and a["summary"] == b["summary"]
    assert (memory_a is None) == (memory_b is None)
    if memory_a is not None:
        assert state_equal(memory_a, memory_b) and int(memory_a["step"]) > 0
    return a


def _omniglot_split() -> Split:
    images = np.random.default_rng(0).random((12 * 12, 28, 28), dtype=np.float32)
    return Split(images, np.repeat(np.arange(12), 12), 12)


def _omniglot_config(mode: str, **kw) -> OmniglotRunConfig:
    return OmniglotRunConfig(mode=mode, batches=4, parallel=2, width=3, per_class=2, memory_size=128, key_dim=32, k=8,
                             lr=1e-2, lr_schedule="cosine", conv_norm=True, checkpoint_every=2, eval_every=2,
                             curve_classes=6, curve_episodes=3, **kw)


@pytest.mark.parametrize("mode", ["lifelong", "episodic"])
def test_omniglot_interrupted_and_resumed_equals_uninterrupted(mode, tmp_path):
    split = _omniglot_split()
    saved = assert_resume_equals_uninterrupted(
        lambda: OmniglotTask(_omniglot_config(mode), splits=(split, split)), tmp_path)
    assert [e["step"] for e in saved["evals"]] == [2, 4]


@pytest.mark.parametrize("mode", ["lifelong", "episodic"])
def test_omniglot_evaluations_change_neither_the_memory_nor_the_training(mode, tmp_path):
    """Evaluating after every batch ends in the memory and weights of evaluating only at the end."""
    split = _omniglot_split()
    outcomes = []
    for eval_every in (1, 100):
        store = RunStore(tmp_path / str(eval_every))
        fit_local(OmniglotTask(replace(_omniglot_config(mode), eval_every=eval_every, checkpoint_every=4),
                               splits=(split, split)), store)
        outcomes.append(final(store))
    (a, memory_a), (b, memory_b) = outcomes
    assert len(a["evals"]) == 4 and len(b["evals"]) == 1
    assert same(a["model"], b["model"]) and state_equal(memory_a, memory_b)  # batch-norm statistics included
    assert int(memory_a["step"]) == (4 * 6 if mode == "lifelong" else 6)


@pytest.mark.parametrize("use_memory,model", [(True, "tiny"), (False, "tiny"), (True, "neural_gpu")])
def test_rare_symbols_interrupted_and_resumed_equals_uninterrupted(use_memory, model, tmp_path):
    cfg = RareSymbolRunConfig(model=model, nmaps=8, workers=1, shards=1, steps=4, batch_size=4, memory_size=512,
                              k=16, log_every=1, checkpoint_every=2)
    saved = assert_resume_equals_uninterrupted(lambda: RareSymbolsTask(cfg, use_memory), tmp_path)
    assert [c["step"] for c in saved["curve"]] == [1, 2, 3, 4]


def test_the_data_position_is_restored(tmp_path):
    """A worker resumed at step 2 is given exactly the batches 2, 3 of the uninterrupted stream."""
    cfg = RareSymbolRunConfig(workers=2, steps=4, batch_size=4)
    full = list(zip(range(4), RareSymbolsTask(cfg, True).batches(1, 2, 0)))
    later = list(zip(range(2), RareSymbolsTask(cfg, True).batches(1, 2, 2)))
    assert all(np.array_equal(a.inputs, b.inputs) for (_, a), (_, b) in zip(full[2:], later))
    split = _omniglot_split()
    task = OmniglotTask(_omniglot_config("episodic"), splits=(split, split))
    full = list(zip(range(4), task.batches(1, 2, 0)))
    later = list(zip(range(2), task.batches(1, 2, 2)))
    assert all(np.array_equal(a.indices, b.indices) for (_, a), (_, b) in zip(full[2:], later))
    rows = [{"id": np.arange(0, 5)}, {"id": np.arange(5, 9)}]
    assert [list(b["id"]) for b in skip_rows(rows, 7)] == [[7, 8]]


def test_a_toy_task_streams_parquet_rows_and_resumes_exactly(tmp_path):
    paths = write_rows(tmp_path)
    saved = assert_resume_equals_uninterrupted(lambda: ToyTask(ToyConfig(paths=paths)), tmp_path)
    assert [c["first_id"] for c in saved["curve"]] == [0, 8, 16, 24]


@pytest.mark.slow  # the Ray trainer end to end: two Ray Train runs, about a minute
def test_a_toy_task_on_ray_train_gets_disjoint_shares_of_the_rows_through_ray_data(ray_local, tmp_path):
    """2 Ray Train workers, 2 memory shards: each worker trains on its own Ray Data share of the
    Parquet rows, and an interrupted job resumes where its shares stopped: over both runs every
    row of the epoch was trained on exactly once. The workers listen on loopback only, rank 0's
    rendezvous store included (torch's own listens on every interface)."""
    from distmem.distributed import fit

    paths = write_rows(tmp_path, files=2, rows=64)  # 128 rows: 2 workers x 8 rows x 8 steps
    store = RunStore(tmp_path / "run")
    cfg = ToyConfig(paths=paths, steps=4, workers=2, shards=2, rows_per_step=8, checkpoint_every=2,
                    log_dir=str(tmp_path))
    for steps in (4, 8):  # 4 steps, then resumed to 8
        memory = fit(ToyTask(replace(cfg, steps=steps)), store)
        try:
            assert memory.step_count == steps and len(memory.shards) == 2  # both writers, one memory step a step
        finally:
            memory.shutdown()
    assert checkpoints.load(store, checkpoints.latest(store))["step"] == 8
    seen = [[int(line) for line in (tmp_path / f"rank-{r}.txt").read_text().split()] for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 64
    assert sorted(seen[0] + seen[1]) == list(range(128))
    listens = [json.loads((tmp_path / f"listening-{r}.json").read_text()) for r in (0, 1)]
    if listens[0] is None:
        pytest.skip("no `ss` to list listening sockets")
    assert listens[0] and set(listens[0] + listens[1]) <= LOOPBACK, listens  # rank 0 serves the store


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_distributed_layer_knows_no_task_and_only_it_imports_ray():
    package = ROOT / "distmem"
    for path in package.rglob("*.py"):
        names = _imports(path)
        if path.parent.name == "distributed":
            assert not {n for n in names if n.startswith(("distmem.tasks", "distmem.models"))}, path
        else:
            assert not {n for n in names if n == "ray" or n.startswith("ray.")}, path
    code = ("import sys, distmem.distributed, distmem.training, distmem.checkpoints; "
            "print(sorted(m for m in sys.modules if m.startswith(('distmem.tasks', 'distmem.models'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
