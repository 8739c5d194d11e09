"""Checkpoints (`distmem.checkpoints`): save, find the latest, restore, and refuse files that are
not tensors and plain data without running them."""

import json
import os
import pickle

import pytest
import torch

from distmem import LocalMemory, MemoryConfig, checkpoints
from distmem.runs import RunStore

from conftest import state_equal, unit


class Payload:
    """Unpickling this creates a file: a checkpoint that would run code when loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_save_latest_restore_round_trip(tmp_path):
    store = RunStore(tmp_path / "run")
    assert checkpoints.latest(store) is None
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    memory = LocalMemory(MemoryConfig(size=16, key_dim=4, k=2), device="cpu")
    memory.step(unit(3, 4), torch.arange(3))
    for step in (1, 2):
        checkpoints.save(store, f"step-{step}", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                 "config": {"gaps": (1, 2), "name": "x"}, "step": step}, memory)
    assert checkpoints.latest(store) == "checkpoints/step-2"
    assert json.loads(store.read_text("checkpoints/latest.json")) == {"name": "step-2", "step": 2}
    fresh, fresh_opt = torch.nn.Linear(3, 2), None
    fresh_opt = torch.optim.Adam(fresh.parameters())
    saved = checkpoints.restore(store, fresh, fresh_opt)
    assert saved["step"] == 2 and saved["config"] == {"gaps": (1, 2), "name": "x"}
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert fresh_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    other = LocalMemory(memory.config, device="cpu")
    assert checkpoints.restore_memory(other, store, "checkpoints/step-2")
    assert state_equal(other.state(), memory.state())
    assert checkpoints.restore(RunStore(tmp_path / "empty"), fresh) is None  # a new run: nothing to restore


def test_a_checkpoint_is_found_by_its_step(tmp_path):
    store = RunStore(tmp_path / "run")
    checkpoints.save(store, checkpoints.step_name(2000), {"step": 2000})
    assert checkpoints.step_name(2000) == "step-0002000"
    assert checkpoints.at_step(store, 2000) == "checkpoints/step-0002000" == checkpoints.latest(store)
    assert checkpoints.at_step(store, 1000) is None


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    store = RunStore(tmp_path / "run")
    checkpoints.save(store, "step-1", {"model": {}, "step": 1})
    with open(store.path("checkpoints/step-1/model.pt"), "wb") as f:
        pickle.dump({"model": Payload(str(marker)), "step": 1}, f)
    with pytest.raises(checkpoints.CheckpointError, match="not a distmem checkpoint of tensors and plain data"):
        checkpoints.restore(store, torch.nn.Linear(1, 1))
    assert not marker.exists()
    # the same file through torch.save (a zip archive) is refused the same way
    torch.save({"model": Payload(str(marker))}, store.path("checkpoints/step-1/model.pt"))
    with pytest.raises(checkpoints.CheckpointError):
        checkpoints.load(store, "checkpoints/step-1")
    assert not marker.exists()


def test_checkpoints_of_runs_from_before_the_one_training_loop_still_resume(tmp_path):
    """Omniglot counted "batch" and kept its evaluation points as "curve"; rare symbols kept
    "rare_exhausted_at" and its gaps as a string."""
    from distmem.cli import from_dict
    from distmem.tasks.rare_symbols import RareSymbolRunConfig

    store = RunStore(tmp_path / "run")
    model = torch.nn.Linear(2, 2)
    checkpoints.save(store, "batch-0000002", {"model": model.state_dict(), "config": {}, "batch": 2,
                                              "curve": [{"batch": 2, "seconds": 1.0, "1-shot": 80.0}]})
    saved = checkpoints.restore(store, torch.nn.Linear(2, 2))
    assert saved["step"] == 2 and saved["evals"] == [{"step": 2, "seconds": 1.0, "1-shot": 80.0}]
    assert saved["curve"] == [] and saved["summary"] == {}
    checkpoints.save(store, "step-0000003", {"model": model.state_dict(), "step": 3, "curve": [{"step": 3}],
                                             "rare_exhausted_at": 5})
    saved = checkpoints.load(store, checkpoints.latest(store))
    assert saved["evals"] == [] and saved["curve"] == [{"step": 3}] and saved["summary"] == {"rare_exhausted_at": 5}
    assert from_dict(RareSymbolRunConfig, {"gaps": "1,100"}).gaps == (1, 100)
