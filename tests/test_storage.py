"""State and file round trips are exact, and a memory continues identically after a load."""

import pytest
import torch

from distmem import LocalMemory, MemoryConfig

from conftest import state_equal, unit


def trained_memory(backend="torch", steps=5) -> LocalMemory:
    mem = LocalMemory(MemoryConfig(size=50, key_dim=6, k=4, age_noise=8.0, seed=7), backend=backend, device="cpu")
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        mem.step(unit(8, 6, seed=i), torch.randint(0, 9, (8,), generator=g))
    return mem


@pytest.mark.parametrize("suffix", [".arrow", ".parquet"])
def test_file_round_trip_is_exact_and_continues_identically(tmp_path, suffix):
    mem = trained_memory()
    path = tmp_path / f"memory{suffix}"
    mem.save(path)
    loaded = LocalMemory.from_file(path, device="cpu")
    assert loaded.config == mem.config
    assert state_equal(loaded.state(), mem.state())
    q, y = unit(8, 6, seed=100), torch.arange(8)
    a, b = mem.step(q, y), loaded.step(q, y)  # same age noise, same recent slots
    assert torch.equal(a.ids, b.ids) and torch.equal(a.loss, b.loss)
    assert state_equal(loaded.state(), mem.state())


def test_load_into_existing_memory_and_state_round_trip(tmp_path):
    mem = trained_memory()
    other = LocalMemory(mem.config, backend="faiss", device="cpu")
    other.load_state(mem.state())
    assert state_equal(other.state(), mem.state())
    mem.save(tmp_path / "m.arrow")
    fresh = LocalMemory(mem.config, device="cpu")
    fresh.load(tmp_path / "m.arrow")
    assert state_equal(fresh.state(), mem.state())


def test_clear_empties_everything():
    mem = trained_memory()
    mem.clear()
    s = mem.state()
    assert torch.equal(s["keys"], torch.zeros(50, 6))
    assert (s["values"] == -1).all() and (s["ages"] == 0).all() and int(s["step"]) == 0
    assert s["recent_labels"].numel() == 0


def test_load_errors_leave_memory_and_files_intact(tmp_path):
    mem = trained_memory()
    before = mem.state()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mem.load(tmp_path / "missing.arrow")
    small = LocalMemory(MemoryConfig(size=10, key_dim=6, k=4), device="cpu")
    small.save(tmp_path / "small.arrow")
    with pytest.raises(ValueError, match="size=10"):
        mem.load(tmp_path / "small.arrow")
    (tmp_path / "junk.arrow").write_bytes(b"not arrow")
    with pytest.raises((ValueError, OSError)):  # pyarrow's ArrowInvalid is a ValueError
        mem.load(tmp_path / "junk.arrow")
    assert state_equal(mem.state(), before)
    with pytest.raises(FileNotFoundError, match="folder"):
        mem.save(tmp_path / "no" / "such" / "dir.arrow")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.arrow", "small.arrow"]  # no temp files left
