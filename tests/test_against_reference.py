"""LocalMemory (both backends) against the naive reference, and update invariants (hypothesis)."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distmem import LocalMemory, MemoryConfig
from distmem.rules import age_noise

from conftest import unit
from reference import ReferenceMemory

BACKENDS = ["torch", "faiss"]


def run_both(backend, size, dim, k, batch, steps, classes, seed, noise=0.0, train_every=1):
    mem = LocalMemory(MemoryConfig(size=size, key_dim=dim, k=k, age_noise=noise, seed=seed),
                      backend=backend, device="cpu")
    ref = ReferenceMemory(size, dim, k)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        qs = unit(batch, dim, seed=seed * 1000 + step)
        ys = torch.randint(0, classes, (batch,), generator=g)
        train = step % train_every == 0
        noise_vec = age_noise(seed, step, 0, size, noise).numpy() if noise else None
        expected = ref.step(qs.double().numpy(), ys.tolist(), train=train, noise=noise_vec)
        if train:
            got = mem.step(qs, ys)
        else:  # the evaluation protocol: read without labels, then write with them
            got = mem.read(qs)
            mem.write(got, ys)
        assert got.ids.tolist() == [e[0] for e in expected]
        assert got.prediction.tolist() == [e[1] for e in expected]
        np.testing.assert_allclose(got.confidence.detach().numpy(), [e[2] for e in expected], rtol=1e-4, atol=1e-6)
        if train:
            assert got.loss.item() == pytest.approx(np.mean([e[3] for e in expected]), abs=1e-5)
    state = mem.state()
    np.testing.assert_allclose(state["keys"].numpy(), ref.keys, atol=1e-5)
    assert state["values"].tolist() == ref.values.tolist()
    assert state["ages"].tolist() == ref.ages.tolist()
    return mem


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_over_a_stream(backend):
    run_both(backend, size=48, dim=6, k=5, batch=8, steps=12, classes=10, seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_with_age_noise_and_evaluation_writes(backend):
    run_both(backend, size=40, dim=5, k=4, batch=6, steps=10, classes=8, seed=2, noise=8.0, train_every=2)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(4, 40), dim=st.integers(2, 6), k_frac=st.floats(0.0, 1.0),
       batch_frac=st.floats(0.0, 1.0), classes=st.integers(1, 12), seed=st.integers(0, 10_000),
       noise=st.sampled_from([0.0, 3.0]))
def test_property_matches_reference(size, dim, k_frac, batch_frac, classes, seed, noise):
    k = 1 + int(k_frac * (size - 1))
    batch = 1 + int(batch_frac * (size - 1))
    run_both("torch", size, dim, k, batch, steps=4, classes=classes, seed=seed, noise=noise)


@settings(max_examples=30, deadline=None)
@given(size=st.integers(2, 50), batch_frac=st.floats(0.0, 1.0), classes=st.integers(1, 6),
       seed=st.integers(0, 10_000), noise=st.sampled_from([0.0, 8.0]))
def test_update_invariants(size, batch_frac, classes, seed, noise):
    batch = 1 + int(batch_frac * (size - 1))
    mem = LocalMemory(MemoryConfig(size=size, key_dim=4, k=1, age_noise=noise, seed=seed), device="cpu")
    g = torch.Generator().manual_seed(seed)
    for step in range(3):
        before = mem.state()
        ys = torch.randint(0, classes, (batch,), generator=g)
        r = mem.step(unit(batch, 4, seed=seed + step), ys)
        after = mem.state()
        changed = (after["ages"] == 0)
        # written slots: age 0 and hold one of the batch's labels; the rest age by one, untouched
        assert int(changed.sum()) <= batch
        assert set(after["values"][changed].tolist()) <= set(ys.tolist())
        assert torch.equal(after["ages"][~changed], before["ages"][~changed] + 1)
        assert torch.equal(after["keys"][~changed], before["keys"][~changed])
        assert torch.equal(after["values"][~changed], before["values"][~changed])
        # every non-empty key is unit-norm; the step's last example wrote the slot it names
        norms = after["keys"][after["values"] >= 0].norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
        assert after["ages"][r.ids[-1, 0]] == 0 or r.values[-1, 0] != ys[-1]
        # recent slots point at slots written this step for this step's labels
        recent = dict(zip(after["recent_labels"].tolist(), after["recent_slots"].tolist()))
        for y in set(ys.tolist()):
            assert after["ages"][recent[y]] == 0
