"""Property-based fuzzing of the public memory API: random sequences of read, write (of fresh and
stale reads), step, clear, save, load, state and load_state, with valid and invalid arguments, on
a `LocalMemory` and a 2-shard `ShardedMemory` side by side. Both give the same results and the
same errors, and after every refused call the state is unchanged."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distmem import LocalMemory, MemoryConfig

from conftest import state_equal

CFG = MemoryConfig(size=24, key_dim=4, k=3, age_noise=2.0, seed=3)  # counter-based noise: shard-exact


def queries(seed: int, rows: int, kind: str) -> torch.Tensor:
    q = F.normalize(torch.randn(rows, CFG.key_dim, generator=torch.Generator().manual_seed(seed)), dim=1)
    if kind == "nan":
        q[0, 0] = math.nan
    elif kind == "not unit":
        q = q * 2
    elif kind == "wrong dim":
        q = F.normalize(torch.randn(rows, CFG.key_dim + 1), dim=1)
    elif kind == "float64":
        q = q.double()
    return q


def labels(seed: int, rows: int, kind: str) -> torch.Tensor | None:
    y = torch.randint(0, 6, (rows,), generator=torch.Generator().manual_seed(seed + 1))  # few labels: hits
    if kind == "none":
        return None
    if kind == "negative":
        y[0] = -2
    elif kind == "wrong length":
        y = y[:-1] if rows > 1 else torch.zeros(2, dtype=torch.int64)
    elif kind == "float":
        y = y.float()
    return y


QUERY_KINDS = st.sampled_from(["ok"] * 16 + ["nan", "not unit", "wrong dim", "float64"])
LABEL_KINDS = st.sampled_from(["ok"] * 12 + ["none"] * 4 + ["negative", "wrong length", "float"])
ROWS = st.one_of(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8), st.just(30))  # 30 > size: refused
READ = st.tuples(st.just("read"), st.integers(0, 10**6), ROWS, QUERY_KINDS, LABEL_KINDS,
                 st.sampled_from([None, None, 1, 2, 4]))
WRITE = st.tuples(st.just("write"), st.integers(0, 3), st.sampled_from(["own", "own", "other", "none"]))
OPS = st.one_of(
    READ, READ, WRITE, WRITE,
    st.tuples(st.just("step"), st.integers(0, 10**6), ROWS, QUERY_KINDS, LABEL_KINDS),
    st.tuples(st.just("clear")),
    st.tuples(st.just("save_load")),
    st.tuples(st.just("load_state"), st.sampled_from(["own", "wrong shape", "nan keys"])),
)
# a training step's pattern too: a read, then its write (other calls in between make it stale)
SEQUENCES = st.lists(st.one_of(OPS.map(lambda op: [op]), st.tuples(READ, st.just(("write", 0, "own"))).map(list)),
                     min_size=1, max_size=10).map(lambda parts: [op for part in parts for op in part])


def outcome(call, *args, **kwargs):
    """("ok", call(*args, **kwargs)) or ("error", its exception type)."""
    try:
        return "ok", call(*args, **kwargs)
    except (TypeError, ValueError) as err:  # a RayTaskError(ValueError) is a ValueError too
        return "error", TypeError if isinstance(err, TypeError) else ValueError


def same_read(a, b) -> bool:
    close = torch.allclose(a.confidence, b.confidence, atol=1e-6) and (
        (a.loss is None and b.loss is None) or torch.allclose(a.loss, b.loss, atol=1e-6))
    return torch.equal(a.ids, b.ids) and torch.equal(a.prediction, b.prediction) and close


@pytest.fixture(scope="module")
def sharded(ray_local):
    from distmem import ShardedMemory
    mem = ShardedMemory(CFG, 2)
    yield mem
    mem.shutdown()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=SEQUENCES)
def test_local_and_sharded_memories_agree_on_random_call_sequences(ops, sharded, tmp_path):
    local = LocalMemory(CFG, device="cpu")
    sharded.clear()
    pairs: list[tuple] = []  # (local read, sharded read) of every successful read, in order
    for i, op in enumerate(ops):
        before = local.state()
        assert state_equal(sharded.state(), before), f"diverged before op {i}: {op}"
        name, got = op[0], None
        if name in ("read", "step"):
            _, seed, rows, q_kind, y_kind, *k = op
            q, y = queries(seed, rows, q_kind), labels(seed, rows, y_kind)
            if name == "read":
                kk = k[0] if y is None else None
                got = [outcome(m.read, q, y, k=kk) for m in (local, sharded)]
            else:
                got = [outcome(m.step, q, y) for m in (local, sharded)]
            assert got[0][0] == got[1][0] and (got[0][0] == "ok" or got[0][1] == got[1][1]), (op, got)
            if got[0][0] == "ok":
                assert same_read(got[0][1], got[1][1]), op
                if name == "read":
                    pairs.append((got[0][1], got[1][1]))
        elif name == "write" and pairs:
            _, index, label_kind = op
            read_local, read_sharded = pairs[-1 - index % len(pairs)]  # mostly the newest; stale or fresh alike
            y = None if label_kind == "none" else labels(index, len(read_local.prediction), "ok")
            if label_kind == "other":
                y = labels(index, len(read_local.prediction) + 1, "ok")  # wrong length
            got = [outcome(local.write, read_local, y), outcome(sharded.write, read_sharded, y)]
            assert got[0][0] == got[1][0] and (got[0][0] == "ok" or got[0][1] == got[1][1]), (op, got)
        elif name == "clear":
            local.clear()
            sharded.clear()
        elif name == "save_load":
            path = tmp_path / f"m{i}.arrow"
            local.save(path)
            local.load(path)
            sharded.load(path)
        elif name == "load_state":
            state = dict(before)
            if op[1] == "wrong shape":
                state["keys"] = state["keys"][:, :-1]
            elif op[1] == "nan keys":
                state["keys"] = state["keys"].clone()
                state["keys"][0, 0] = math.nan
            got = [outcome(m.load_state, state) for m in (local, sharded)]
            assert got[0][0] == got[1][0] and (got[0][0] == "ok" or got[0][1] == got[1][1]), (op, got)
        after = local.state()
        if name == "read" or (got is not None and got[0][0] == "error"):
            assert state_equal(after, before), f"a refused or read-only call changed the memory: {op}"
    assert state_equal(sharded.state(), local.state())
