"""Bad input: a clear TypeError/ValueError naming the argument, and the memory unchanged."""

import sys

import pytest
import torch

from distmem import BackendUnavailableError, LocalMemory, MemoryConfig

from conftest import state_equal, unit


@pytest.fixture
def mem() -> LocalMemory:
    m = LocalMemory(MemoryConfig(size=16, key_dim=4, k=3, age_noise=8.0), device="cpu")
    m.step(unit(4, 4), torch.tensor([0, 1, 2, 3]))
    return m


GOOD_Q = unit(4, 4, seed=5)
GOOD_Y = torch.tensor([1, 2, 3, 4])
NAN_Q = GOOD_Q.clone()
NAN_Q[1, 2] = float("nan")

BAD_CALLS = [
    ("q", TypeError, dict(q=GOOD_Q.numpy())),
    ("q", TypeError, dict(q=torch.ones(4, 4, dtype=torch.int64))),
    ("q", ValueError, dict(q=unit(4, 5))),
    ("q", ValueError, dict(q=unit(4))),
    ("q", ValueError, dict(q=torch.empty(0, 4))),
    ("q", ValueError, dict(q=NAN_Q)),
    ("unit-norm", ValueError, dict(q=GOOD_Q * 2)),
    ("labels", TypeError, dict(labels=GOOD_Y.int())),
    ("labels", TypeError, dict(labels=[1, 2, 3, 4])),
    ("labels", ValueError, dict(labels=torch.tensor([1, 2, 3]))),
    ("labels", ValueError, dict(labels=torch.tensor([1, -2, 3, 4]))),
    ("batch", ValueError, dict(q=unit(17, 4), labels=torch.zeros(17, dtype=torch.int64))),
]


@pytest.mark.parametrize("match, error, kwargs", BAD_CALLS)
@pytest.mark.parametrize("method", ["step", "read"])
def test_bad_read_and_step_are_rejected_without_change(mem, method, match, error, kwargs):
    before = mem.state()
    args = {"q": GOOD_Q, "labels": GOOD_Y, **kwargs}
    with pytest.raises(error, match=match):
        getattr(mem, method)(args["q"], args["labels"])
    assert state_equal(mem.state(), before)


@pytest.mark.parametrize("k, error", [(0, ValueError), (4, ValueError), (1.0, TypeError), (True, TypeError)])
def test_bad_k_is_rejected_without_change(mem, k, error):
    before = mem.state()
    with pytest.raises(error, match="k must"):
        mem.query(GOOD_Q, k=k)
    with pytest.raises(ValueError, match="k: a read with labels"):  # the loss needs the config's k candidates
        mem.read(GOOD_Q, GOOD_Y, k=1)
    assert state_equal(mem.state(), before)
    assert mem.read(GOOD_Q, GOOD_Y, k=3).ids.shape == (4, 3)  # k = the config's is fine with labels


def test_bad_writes_are_rejected_without_change(mem):
    read = mem.read(GOOD_Q)  # no labels
    before = mem.state()
    with pytest.raises(ValueError, match="labels"):
        mem.write(read)
    with pytest.raises(TypeError, match="labels"):
        mem.write(read, GOOD_Y.float())
    with pytest.raises(TypeError, match="read"):
        mem.write(GOOD_Q, GOOD_Y)
    assert state_equal(mem.state(), before)
    mem.write(read, GOOD_Y)
    after = mem.state()
    with pytest.raises(ValueError, match="stale"):
        mem.write(read, GOOD_Y)  # the memory changed since this read
    other = LocalMemory(mem.config, device="cpu")
    with pytest.raises(ValueError, match="stale"):
        other.write(mem.read(GOOD_Q), GOOD_Y)  # a read of another memory
    assert state_equal(mem.state(), after)


def test_bad_state_is_rejected_without_change(mem):
    before = mem.state()
    cases = [
        ({**before, "keys": before["keys"][:, :3]}, ValueError, "keys"),
        ({**before, "keys": before["keys"].clone().fill_diagonal_(float("nan"))}, ValueError, "finite"),
        ({**before, "values": before["values"].float()}, ValueError, "values"),
        ({**before, "values": before["values"] - 5}, ValueError, "values"),
        ({**before, "ages": -before["ages"] - 1}, ValueError, "ages"),
        ({k: v for k, v in before.items() if k != "ages"}, ValueError, "ages"),
        ({k: v for k, v in before.items() if k != "recent_slots"}, ValueError, "recent"),
        ([1, 2], TypeError, "mapping"),
    ]
    before = mem.state()
    for state, error, match in cases:
        with pytest.raises(error, match=match):
            mem.load_state(state)
        assert state_equal(mem.state(), before)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(size=10, key_dim=4, k=11), ValueError, "k=11 is larger than the memory"),
    (dict(size=0, key_dim=4), ValueError, "size"),
    (dict(size=10, key_dim=0, k=1), ValueError, "key_dim"),
    (dict(size=10, key_dim=4, k=2, alpha=-1.0), ValueError, "alpha"),
    (dict(size=10, key_dim=4, k=2, age_noise=float("nan")), ValueError, "age_noise"),
    (dict(size=10.0, key_dim=4, k=2), TypeError, "size"),
    (dict(size=10, key_dim=4, k=2, key_dtype="int4"), ValueError, "key_dtype"),
])
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        MemoryConfig(**kwargs)


def test_unknown_backend_and_missing_package(monkeypatch):
    cfg = MemoryConfig(size=8, key_dim=4, k=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        LocalMemory(cfg, backend="annoy", device="cpu")
    with pytest.raises(TypeError, match="config"):
        LocalMemory({"size": 8}, device="cpu")
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss were not installed
    with pytest.raises(BackendUnavailableError, match=r"distmem\[faiss\]") as info:
        LocalMemory(cfg, backend="faiss", device="cpu")
    assert isinstance(info.value, ValueError)


def test_importing_distmem_starts_no_ray_and_imports_no_faiss():
    import subprocess
    code = "import sys, distmem; distmem.LocalMemory(distmem.MemoryConfig(8, 4, k=2), device='cpu'); " \
           "print('ray' in sys.modules, 'faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
