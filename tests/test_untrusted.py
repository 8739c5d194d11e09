"""Untrusted files never run code, and damaged ones leave every memory as it was: checkpoints
whose model.pt carries a pickle payload (every loader), sharded checkpoints whose manifest names a
part outside its folder, and memory files that are truncated, of the wrong size or with wrong
column types."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

from distmem import LocalMemory, MemoryConfig, checkpoints
from distmem.runs import RunStore
from distmem.tasks.omniglot import OmniglotRunConfig, OneShotClassifier

from conftest import state_equal, unit

ROOT = Path(__file__).parents[1]
CFG = MemoryConfig(size=40, key_dim=8, k=4, age_noise=0.0)


class Payload:
    """Unpickling this creates a file: a checkpoint that would run code when loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def poisoned_run(folder: Path, marker: Path) -> Path:
    """A run folder whose latest checkpoint's model.pt is a pickle payload (and a real config)."""
    (folder / "checkpoints" / "step-0000001").mkdir(parents=True)
    cfg = OmniglotRunConfig(preset="quick", batches=2, checkpoint_every=1, memory_size=64, k=8)
    (folder / "config.json").write_text(json.dumps(vars(cfg)))
    with open(folder / "checkpoints" / "step-0000001" / "model.pt", "wb") as f:
        pickle.dump({"model": Payload(str(marker)), "config": vars(cfg), "step": 1}, f)
    (folder / "checkpoints" / "latest.json").write_text(json.dumps({"name": "step-0000001", "step": 1}))
    return folder


def test_every_checkpoint_loader_refuses_a_pickle_payload_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"
    run = poisoned_run(tmp_path / "run", marker)
    with pytest.raises(checkpoints.CheckpointError, match="refused to unpickle"):
        OneShotClassifier.from_checkpoint(run)
    with pytest.raises(checkpoints.CheckpointError):
        checkpoints.restore(RunStore(run), torch.nn.Linear(1, 1))
    support = tmp_path / "support" / "a"
    support.mkdir(parents=True)
    from PIL import Image
    Image.new("L", (28, 28), 255).save(support / "x.png")
    for cmd in ([sys.executable, "-m", "jobs.omniglot_classify", str(run), "--support", str(tmp_path / "support"),
                 "--query", str(support / "x.png")],
                [sys.executable, "-m", "jobs.omniglot", "--resume", str(run)]):  # resume: refused in the driver
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "error: checkpoint:" in out.stderr and "Traceback" not in out.stderr, \
            out.stderr[-2000:]
    assert not marker.exists()


def _filled(seed: int = 0) -> LocalMemory:
    mem = LocalMemory(CFG, device="cpu")
    for s in range(3):
        mem.step(unit(6, CFG.key_dim, seed=seed + s), torch.arange(6) + 10 * s)
    return mem


def _table_with(path: Path, column: str, array: pa.Array) -> None:
    """Rewrite a memory file with one column replaced (its metadata kept)."""
    with pa.memory_map(str(path)) as source:
        table = ipc.open_file(source).read_all()
    table = table.set_column(table.schema.get_field_index(column), column, array)
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def bad_memory_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Damaged memory files and checkpoints, each with the message its load must give."""
    folder.mkdir()
    good = folder / "good.arrow"
    _filled(seed=50).save(good)
    out = {}
    data = good.read_bytes()
    (folder / "truncated.arrow").write_bytes(data[: len(data) // 2])
    out["truncated"] = (folder / "truncated.arrow", "not a readable Arrow")
    LocalMemory(MemoryConfig(size=30, key_dim=8, k=4), device="cpu").save(folder / "small.arrow")
    out["wrong size"] = (folder / "small.arrow", "holds a memory of size=30")
    (folder / "keys.arrow").write_bytes(data)
    _table_with(folder / "keys.arrow", "keys", pa.array(np.zeros(CFG.size, np.float32)))
    out["keys not vectors"] = (folder / "keys.arrow", "column 'keys' must be fixed_size_list<float>")
    (folder / "values.arrow").write_bytes(data)
    _table_with(folder / "values.arrow", "values", pa.array(["x"] * CFG.size))
    out["string values"] = (folder / "values.arrow", "column 'values' must be integers")
    (folder / "rows.arrow").write_bytes(data)
    with pa.memory_map(str(folder / "rows.arrow")) as source:
        table = ipc.open_file(source).read_all().slice(0, CFG.size - 5)
    with pa.OSFile(str(folder / "rows.arrow"), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    out["fewer rows than slots"] = (folder / "rows.arrow", "does not hold slots")
    for name, part in (("parent", "../good.arrow"), ("absolute", str(good)), ("uri", "s3://bucket/part.arrow")):
        ckpt = folder / f"ckpt-{name}"
        ckpt.mkdir()
        (ckpt / "manifest.json").write_text(json.dumps({"format_version": 1, "config": CFG.to_dict(), "step": 3,
                                                        "parts": [{"file": part, "lo": 0, "hi": CFG.size}]}))
        out[f"manifest part {name}"] = (ckpt, "which is not a file inside")
    return out


def test_damaged_memory_files_are_refused_by_name_and_the_memory_stays_as_it_was(tmp_path):
    mem = _filled()
    before = mem.state()
    read = mem.read(unit(2, CFG.key_dim, seed=9), torch.tensor([1, 2]))
    for case, (path, message) in bad_memory_files(tmp_path / "bad").items():
        with pytest.raises(ValueError, match=message) as err:
            mem.load(path)
        assert str(path.name) in str(err.value), case
        assert state_equal(mem.state(), before), case
        if case != "wrong size":  # a memory of another size is a fine file to open as such
            with pytest.raises(ValueError):
                LocalMemory.from_file(path)
    mem.write(read)  # nothing was loaded: the read made before is still current
    assert mem.step_count == int(before["step"]) + 1


def test_a_sharded_load_of_a_damaged_file_changes_no_shard(ray_local, tmp_path):
    from distmem import ShardedMemory
    sharded = ShardedMemory(CFG, 2)
    try:
        for s in range(3):
            sharded.step(unit(6, CFG.key_dim, seed=s), torch.arange(6) + 10 * s)
        before = sharded.state()
        bad = bad_memory_files(tmp_path / "bad")
        # the second shard's part is damaged, the first one's is fine: neither may change
        half = tmp_path / "half"
        _filled(seed=50).save(half.with_suffix(".arrow"))
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        good = LocalMemory.from_file(half.with_suffix(".arrow"), device="cpu").state()
        from distmem import storage
        storage.write_memory_file(ckpt / "part-0.arrow", CFG, {**storage.slice_state(good, slice(0, 20), 0, 20),
                                                              "step": good["step"]}, lo=0)
        (ckpt / "part-1.arrow").write_bytes(b"not arrow at all")
        storage.write_manifest(ckpt, CFG, int(good["step"]), [("part-0.arrow", 0, 20), ("part-1.arrow", 20, 40)])
        for path in [ckpt, bad["truncated"][0], bad["manifest part parent"][0], bad["string values"][0]]:
            with pytest.raises(ValueError):
                sharded.load(path)
            assert state_equal(sharded.state(), before), path
        sharded.step(unit(6, CFG.key_dim, seed=7), torch.arange(6))  # and it goes on
    finally:
        sharded.shutdown()
