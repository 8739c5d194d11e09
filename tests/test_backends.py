"""Every backend gives the candidates of a brute-force full sort (ties by lower slot id)."""

import dataclasses

import numpy as np
import pytest
import torch

from distmem.backends import FaissBackend, TorchExactBackend, make_backend
from distmem.topk import ordered_topk

from conftest import state_equal, unit


def brute_force(keys: torch.Tensor, queries: torch.Tensor, k: int):
    sims = (queries.double() @ keys.double().T).numpy()
    ids = np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in sims])
    return ids


def keys_with_ties(n: int, d: int, seed: int) -> torch.Tensor:
    keys = unit(n, d, seed=seed)
    keys[n // 2:] = 0  # empty slots: many exact ties at similarity 0
    keys[5] = keys[40]  # duplicates: exact ties between filled slots
    keys[17] = keys[3]
    return keys


BACKENDS = [
    ("torch-pruned", lambda: TorchExactBackend(chunk_size=64, prune=True)),
    ("torch-topk", lambda: TorchExactBackend(chunk_size=64, prune=False)),
    ("torch-one-chunk", lambda: TorchExactBackend(chunk_size=100_000)),
    ("faiss", lambda: FaissBackend(torch.device("cpu"))),
]


@pytest.mark.parametrize("name, make", BACKENDS, ids=[b[0] for b in BACKENDS])
@pytest.mark.parametrize("k", [1, 7, 64, 300])
def test_backend_equals_brute_force(name, make, k):
    keys = keys_with_ties(600, 12, seed=k)
    queries = torch.cat([unit(30, 12, seed=99), keys[[3, 40, 7]]])  # includes exact-duplicate hits
    sims, ids = make().search(keys, queries, k)
    assert ids.dtype == torch.int64 and sims.dtype == torch.float32 and ids.shape == (33, k)
    np.testing.assert_array_equal(ids.numpy(), brute_force(keys, queries, k))
    np.testing.assert_allclose(sims.numpy(), (queries @ keys.T).gather(1, ids).numpy(), atol=1e-6)


@pytest.mark.parametrize("chunk_size", [64, None])
@pytest.mark.parametrize("k", [1, 7, 300])
def test_few_queries_take_the_transposed_product_and_equal_brute_force(chunk_size, k):
    """At most FEW_QUERIES queries on the CPU are scored the other way round (and, by default, in
    chunks of 8192): the same candidates, ties included."""
    keys = keys_with_ties(20_000, 12, seed=k)
    queries = torch.cat([unit(3, 12, seed=5), keys[[3, 40]]])  # 5 queries, two exact-duplicate hits
    assert len(queries) <= TorchExactBackend.FEW_QUERIES
    sims, ids = TorchExactBackend(chunk_size=chunk_size).search(keys, queries, k)
    np.testing.assert_array_equal(ids.numpy(), brute_force(keys, queries, k))
    np.testing.assert_allclose(sims.numpy(), (queries @ keys.T).gather(1, ids).numpy(), atol=1e-6)


def test_all_empty_memory_returns_lowest_ids():
    keys = torch.zeros(500, 8)
    for make in (b[1] for b in BACKENDS):
        _, ids = make().search(keys, unit(4, 8), 10)
        assert ids.tolist() == [list(range(10))] * 4


def test_faiss_and_torch_agree_on_a_larger_random_memory():
    keys, queries = unit(20_000, 32, seed=1), unit(64, 32, seed=2)
    s_t, i_t = make_backend("torch", torch.device("cpu")).search(keys, queries, 50)
    s_f, i_f = make_backend("faiss", torch.device("cpu")).search(keys, queries, 50)
    assert torch.equal(i_t, i_f)
    assert torch.allclose(s_t, s_f, atol=1e-5)


def test_ordered_topk_breaks_ties_by_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0]])
    vals, idx = ordered_topk(scores, 3)
    assert idx.tolist() == [[1, 2, 4]] and vals.tolist() == [[3.0, 3.0, 3.0]]


@pytest.mark.parametrize("levels", [3, 40, 0])
def test_ordered_topk_equals_a_sort_by_score_then_index(levels):
    """Against Python's sort of (-score, index) on rows with many ties (scores from `levels` values,
    so the k-th score is often tied across the boundary) and without (0: continuous scores), for
    every k from 1 to C."""
    gen = torch.Generator().manual_seed(levels)
    C = 37
    scores = (torch.randint(0, levels, (50, C), generator=gen).float() if levels
              else torch.randn(50, C, generator=gen))
    for k in range(1, C + 1):
        vals, idx = ordered_topk(scores, k)
        want = [sorted(range(C), key=lambda j, row=row: (-row[j], j))[:k] for row in scores.tolist()]
        assert idx.tolist() == want and torch.equal(vals, scores.gather(1, idx)), k


@pytest.mark.parametrize("key_dtype", ["float16", "bfloat16", "int8", "int8_dim"])
def test_compressed_keys(key_dtype, tmp_path):
    from distmem import LocalMemory, MemoryConfig
    from distmem.keycodes import DTYPES
    cfg = MemoryConfig(size=400, key_dim=16, k=5, age_noise=0.0, key_dtype=key_dtype)
    mem = LocalMemory(cfg, device="cpu")
    assert mem.keys.dtype == DTYPES[key_dtype] and mem.keys.element_size() == (1 if "int8" in key_dtype else 2)
    protos = unit(40, 16, seed=3)  # well separated classes: compressed keys find the same neighbours
    mem.step(protos, torch.arange(40))
    stored = mem.state()["keys"][mem.values >= 0].float()
    # (int8_dim: 40 of 400 slots written, its ranges are not fitted yet: [-1, 1] as for int8)
    assert (stored - protos[mem.values[mem.values >= 0]]).abs().max() <= (0.5 / 127 + 1e-6 if "int8" in key_dtype
                                                                             else 4e-3)
    noisy = torch.nn.functional.normalize(protos + 0.05 * unit(40, 16, seed=4), dim=1)
    exact = LocalMemory(MemoryConfig(size=400, key_dim=16, k=5, age_noise=0.0), device="cpu")
    exact.step(protos, torch.arange(40))
    r, want = mem.step(noisy, torch.arange(40)), exact.step(noisy, torch.arange(40))
    assert torch.equal(r.prediction, torch.arange(40)) and torch.equal(r.ids[:, 0], want.ids[:, 0])
    assert torch.allclose(r.sims, want.sims, atol=0.02)
    state = mem.state()
    assert state["keys"].dtype == (torch.float32 if "int8" in key_dtype else DTYPES[key_dtype])
    mem.save(tmp_path / "m.arrow")  # the file holds float keys; loading re-encodes them to the same codes
    back = LocalMemory.from_file(tmp_path / "m.arrow", device="cpu")
    assert back.config == cfg and torch.equal(back.keys, mem.keys) and state_equal(back.state(), state)
    with pytest.raises(ValueError, match="needs backend='torch'"):
        LocalMemory(cfg, backend="faiss", device="cpu")


def cone(n: int, d: int, width: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Unit keys in a narrow cone around one axis (as a trained network's keys lie)."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    return torch.nn.functional.normalize(axis + width * torch.randn(n, d, generator=g), dim=1)


def slots_of(mem, labels) -> torch.Tensor:
    """The slot holding each label (each written once)."""
    slot = {int(v): i for i, v in enumerate(mem.values.tolist()) if v >= 0}
    return torch.tensor([slot[v] for v in labels])


def test_int8_dim_fits_ranges_to_the_written_keys_and_searches_them_exactly(tmp_path):
    from distmem import LocalMemory, MemoryConfig
    from distmem.keycodes import EMPTY
    n, d = 512, 16
    cfg = MemoryConfig(size=n, key_dim=d, k=8, age_noise=0.0, key_dtype="int8_dim", key_fit_after=0.5,
                       key_refit_every=0.5)
    mem, fixed = LocalMemory(cfg, device="cpu"), LocalMemory(dataclasses.replace(cfg, key_dtype="int8"), device="cpu")
    assert (mem.keys == EMPTY).all() and (mem.state()["keys"] == 0).all()  # empty slots decode to 0
    keys = cone(n * 2, d)
    codec = mem.shard.codec
    for step in range(8):  # 64 writes a step: the ranges are fitted at 256 writes, re-fitted at 512
        batch = keys[step * 64:(step + 1) * 64]
        mem.step(batch, torch.arange(step * 64, (step + 1) * 64))
        fixed.step(batch, torch.arange(step * 64, (step + 1) * 64))
        assert codec.fits == (0 if step < 3 else 1 if step < 7 else 2), step
    written = mem.values >= 0
    lo, hi = codec.offset - 127 * codec.step, codec.offset + 127 * codec.step
    got = mem.state()["keys"][written]
    assert (got >= lo - 1e-6).all() and (got <= hi + 1e-6).all() and (codec.step < 0.5 / 127).all()
    # keys written after the re-fit (inside its ranges): within half a step of the key, per component
    last, labels = keys[:64], range(1000, 1064)
    mem.step(last, torch.tensor(labels))
    fixed.step(last, torch.tensor(labels))
    written = mem.values >= 0
    got_last = mem.state()["keys"][slots_of(mem, labels)]
    assert ((got_last - last).abs() <= codec.step / 2 + 1e-6).all()
    # at least 4 times finer than one fixed scale on these keys
    fixed_last = fixed.state()["keys"][slots_of(fixed, labels)]
    assert 4 * (got_last - last).norm(dim=1).median() < (fixed_last - last).norm(dim=1).median()
    # the exact search over int8_dim keys is the brute force over the decoded keys, ties by the lower id
    q = torch.nn.functional.normalize(keys[:32] + 0.05 * cone(32, d, seed=1), dim=1)
    decoded = mem.state()["keys"]
    scores = (q @ decoded.T).tolist()
    want = torch.tensor([sorted(range(n), key=lambda j: (-row[j], j))[:8] for row in scores])
    assert torch.equal(mem.shard.search(q)["ids"], want)
    # save / load: the file holds the float keys; loading fits ranges to them, keys within half a step
    mem.save(tmp_path / "m.arrow")
    back = LocalMemory.from_file(tmp_path / "m.arrow", device="cpu")
    assert back.shard.codec.fits == 1 and back.shard.codec.writes == 0
    assert ((back.state()["keys"] - decoded).abs() <= back.shard.codec.step / 2 + 1e-6).all()
    assert torch.equal(back.values, mem.values) and (back.state()["keys"][~written] == 0).all()
    mem.clear()
    assert mem.shard.codec.fits == 0 and (mem.keys == EMPTY).all()
