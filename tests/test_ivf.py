"""The approximate backend (backend="ivf"): against brute force, kept current by in-place writes,
re-trained without losing a slot, and sharded like the local memory."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from distmem import LocalMemory, MemoryConfig
from distmem.ivf import default_lists

from conftest import state_equal, unit

N, D = 8000, 16


def clustered(n: int, d: int, clusters: int = 40, spread: float = 0.3, seed: int = 0) -> torch.Tensor:
    """Unit keys around `clusters` random centres (the structure trained keys have)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, d, generator=g), dim=1)
    return F.normalize(centres[torch.randint(0, clusters, (n,), generator=g)]
                       + spread * torch.randn(n, d, generator=g) / d ** 0.5, dim=1)


def filled(keys: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = len(keys)
    return {"keys": keys, "values": torch.randint(0, 50, (n,), generator=g),
            "ages": torch.randint(0, 100, (n,), generator=g)}


def memories(cfg: MemoryConfig, state) -> tuple[LocalMemory, LocalMemory]:
    """(ivf, exact torch) memories holding `state`."""
    out = []
    for backend in ("ivf", "torch"):
        m = LocalMemory(cfg, backend=backend, device="cpu")
        m.load_state(state)
        out.append(m)
    return out[0], out[1]


def recall(got: torch.Tensor, want: torch.Tensor) -> float:
    """Mean share of each row of want [B, k] found in the same row of got [B, k]."""
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, want)) / want.numel()


def test_full_probe_equals_brute_force_ties_included():
    keys = clustered(N, D)
    keys[100:110] = keys[5]  # equal keys: ties resolved by the lower slot id, as the exact search does
    cfg = MemoryConfig(size=N, key_dim=D, k=32, ivf_lists=32, ivf_probe=32)
    ivf, exact = memories(cfg, filled(keys))
    assert ivf.backend.index is not None and ivf.backend.lists == 32
    q = torch.cat([unit(60, D, seed=1), keys[5:6].clone(), keys[200:220]])
    got, want = ivf.shard.search(q), exact.shard.search(q)
    assert torch.equal(got["ids"], want["ids"]) and torch.equal(got["values"], want["values"])
    assert torch.allclose(got["sims"], want["sims"], atol=1e-6)
    assert got["ids"][60, :11].tolist() == [5, *range(100, 110)]


@pytest.mark.parametrize("kind", ["clustered", "random"])
def test_recall_against_brute_force(kind):
    keys = clustered(N, D) if kind == "clustered" else unit(N, D, seed=3)
    cfg = MemoryConfig(size=N, key_dim=D, k=16, ivf_lists=64, ivf_probe=8)
    ivf, exact = memories(cfg, filled(keys))
    q = F.normalize(keys[torch.arange(0, N, 40)] + 0.1 * unit(N // 40, D, seed=4), dim=1)  # near stored keys
    got, want = ivf.shard.search(q)["ids"], exact.shard.search(q)["ids"]
    r1 = (got[:, 0] == want[:, 0]).float().mean().item()
    assert r1 >= (0.97 if kind == "clustered" else 0.8)
    assert recall(got, want) >= (0.9 if kind == "clustered" else 0.4)
    ivf.backend.index.nprobe = 1  # fewer lists scanned: recall can only fall
    assert recall(ivf.shard.search(q)["ids"], want) <= recall(got, want)


def test_exact_until_trained_then_trained_after_enough_writes():
    cfg = MemoryConfig(size=2000, key_dim=D, k=8, ivf_lists=8, ivf_probe=1, ivf_train_after=0.5, age_noise=0.0)
    ivf, exact = LocalMemory(cfg, backend="ivf", device="cpu"), LocalMemory(cfg, device="cpu")
    g = torch.Generator().manual_seed(0)
    step = 0
    while ivf.backend.index is None:
        q, y = unit(100, D, seed=step), torch.randint(0, 1000, (100,), generator=g)
        a, b = ivf.step(q, y), exact.step(q, y)
        assert torch.equal(a.ids, b.ids), "an untrained ivf memory searches exactly"
        step += 1
    assert ivf.backend.trainings == 1 and 1000 <= step * 100 < 1100  # after half the slots were written
    assert state_equal(ivf.state(), exact.state())


def test_recall_checks_over_a_run():
    keys = clustered(N, D)
    cfg = MemoryConfig(size=N, key_dim=D, k=8, ivf_lists=32, ivf_probe=32, ivf_check_every=2)
    full, _ = memories(cfg, filled(keys))
    thin, _ = memories(dataclasses.replace(cfg, ivf_probe=1), filled(keys))
    g = torch.Generator().manual_seed(0)
    for s in range(5):
        q, y = unit(64, D, seed=s), torch.randint(0, 50, (64,), generator=g)
        if s == 4:
            before = full.backend.stats()["writes"]  # 4 steps of slot writes (queries may share a slot)
        full.step(q, y)
        thin.step(q, y)
    checks = full.backend.stats()["checks"]
    assert [c["search"] for c in checks] == [1, 3, 5] and checks[-1]["writes"] == before > 0  # read before its write
    assert full.backend.stats()["writes"] > before
    assert all(c["recall_at_1"] == 1.0 and c["recall_at_k"] == 1.0 for c in checks)  # every list probed
    assert min(c["recall_at_k"] for c in thin.backend.stats()["checks"]) < 1.0
    assert LocalMemory(cfg, device="cpu").backend.stats() == {"name": "torch"}


def test_writes_count_every_row_also_in_a_step_that_refits_int8_dim_ranges():
    """A re-fit rebuilds the index from scratch instead of updating it; its step's rows still count."""
    cfg = MemoryConfig(size=512, key_dim=D, k=8, age_noise=0.0, key_dtype="int8_dim", key_fit_after=0.5,
                       key_refit_every=0.5, ivf_lists=4, ivf_probe=4)
    mem = LocalMemory(cfg, backend="ivf", device="cpu")
    for step in range(8):  # 64 new labels a step, so 64 slots written: ranges fitted at 256 writes, re-fitted at 512
        mem.step(unit(64, D, seed=step), torch.arange(step * 64, (step + 1) * 64))
    assert mem.shard.codec.fits == 2
    assert mem.backend.stats()["writes"] == 8 * 64


def test_probes_needed_is_what_faiss_needs():
    """The probe count a check computes from list ranks equals the fewest nprobe with which
    faiss's own search meets the targets on the same queries (tried one by one)."""
    keys = clustered(N, D, spread=0.6)
    cfg = MemoryConfig(size=N, key_dim=D, k=16, ivf_lists=64, ivf_probe=1, ivf_check_every=0)
    ivf, exact = memories(cfg, filled(keys))
    q = F.normalize(keys[:32] + 0.3 * unit(32, D, seed=5), dim=1)
    want = exact.shard.search(q)["ids"]
    for target_1, target_k in ((0.99, 0.0), (0.0, 0.9), (0.9, 0.95), (1.0, 1.0)):
        ivf.backend.target_1, ivf.backend.target_k = target_1, target_k
        needed = ivf.backend.probes_needed(q, want)
        ivf.backend.target_1 = ivf.backend.target_k = 0.0  # faiss's own search at each nprobe (no sizing)
        first = None
        for p in range(1, 65):
            ivf.backend.index.nprobe = p
            got = ivf.shard.search(q)["ids"]
            if (got[:, 0] == want[:, 0]).float().mean() >= target_1 and recall(got, want) >= target_k:
                first = p
                break
        assert needed == first, (target_1, target_k)
    ivf.backend.target_1 = ivf.backend.target_k = 1.0
    assert 1 < ivf.backend.probes_needed(q, want) <= 64


def test_recall_targets_set_nprobe_at_each_check():
    keys = clustered(N, D, spread=0.6)
    base = MemoryConfig(size=N, key_dim=D, k=16, ivf_lists=64, ivf_probe=1, ivf_check_every=1,
                        ivf_retrain_every=0, ivf_exact_share=1.0)  # the index's own search at any nprobe
    fixed, _ = memories(base, filled(keys))
    adaptive, _ = memories(dataclasses.replace(base, ivf_target_recall_at_1=0.99, ivf_target_recall_at_k=0.95),
                           filled(keys))
    for s, noise in enumerate([0.3, 1.5, 0.3, 0.3, 0.3, 0.3]):  # the second batch lies far from the keys
        idx = torch.arange(s * 64, (s + 1) * 64)
        q, y = F.normalize(keys[idx] + noise * unit(64, D, seed=s), dim=1), torch.randint(0, 50, (64,))
        fixed.step(q, y)
        adaptive.step(q, y)
    low = fixed.backend.stats()["checks"]
    checks = adaptive.backend.stats()["checks"]
    assert all(c["nprobe"] == 1 for c in low) and min(c["recall_at_k"] for c in low) < 0.95
    needed = [c["probes_needed"] for c in checks]
    assert checks[0]["nprobe"] == 1 and needed[1] > max(needed[:1] + needed[2:])  # the far batch needs most
    for i, (before, after) in enumerate(zip(checks, checks[1:])):  # each probes what the one before set:
        assert after["nprobe"] == before["nprobe_next"] == min(64, math.ceil(1.5 * max(needed[max(0, i - 7):i + 1])))
    assert all(c["nprobe"] >= math.ceil(1.5 * needed[1]) for c in checks[2:])  # 1.5 x the most of the last 8
    # the first search (k not sized yet) ran exact; then the index, which met both targets exactly
    # when it probed at least what the check found needed
    assert [c["exact"] for c in checks] == [True] + [False] * (len(checks) - 1)
    for c in checks:
        met = c["recall_at_1"] >= 0.99 and c["recall_at_k"] >= 0.95
        assert met == (c["exact"] or c["nprobe"] >= c["probes_needed"]), c
    assert adaptive.backend.stats()["nprobe"] == checks[-1]["nprobe_next"] > 1
    with pytest.raises(ValueError, match="ivf_check_every"):
        dataclasses.replace(base, ivf_check_every=0, ivf_target_recall_at_k=0.9)


def test_a_retraining_sizes_nprobe_on_the_last_queries_before_any_check():
    """The checks' figures were measured against the old lists: right after a re-training the
    last search's queries are sized against the new ones, so the next search meets the targets."""
    keys = clustered(N, D, spread=0.6)
    cfg = MemoryConfig(size=N, key_dim=D, k=16, ivf_lists=64, ivf_probe=1, ivf_check_every=1000,
                       ivf_retrain_every=0.01, ivf_target_recall_at_1=0.99, ivf_target_recall_at_k=0.95,
                       ivf_exact_share=1.0)
    ivf, _ = memories(cfg, filled(keys))
    assert ivf.backend.trainings == 1 and ivf.backend.stats()["sizings"] == []  # loaded: no query yet
    near = F.normalize(keys[:64] + 0.3 * unit(64, D, seed=1), dim=1)
    far = F.normalize(keys[64:128] + 1.5 * unit(64, D, seed=2), dim=1)  # lies far from the keys
    ivf.step(near, torch.arange(1000, 1064))  # search 1: a check; 64 new labels, 64 slots written
    (check,) = ivf.backend.stats()["checks"]
    ivf.step(far, torch.arange(2000, 2064))  # search 2, no check; its writes pass 80: re-trained
    stats = ivf.backend.stats()
    assert stats["trainings"] == 2 and len(stats["checks"]) == 1
    (sizing,) = stats["sizings"]
    exact = LocalMemory(cfg, backend="torch", device="cpu")
    exact.load_state(ivf.state())
    want = exact.shard.search(far[:32])["ids"]
    assert sizing == {"search": 2, "trainings": 2, "k": 16, "probes_needed": ivf.backend.probes_needed(far[:32], want),
                      "nprobe_next": stats["nprobe"]}
    assert sizing["probes_needed"] > check["probes_needed"]  # the far queries need more than the check saw
    assert stats["nprobe"] == min(64, math.ceil(1.5 * sizing["probes_needed"]))
    got = ivf.shard.search(far[:32])["ids"]
    assert (got[:, 0] == want[:, 0]).float().mean() >= 0.99 and recall(got, want) >= 0.95


def test_a_search_that_would_scan_many_lists_runs_exact_until_fewer_suffice():
    """With recall targets, an nprobe above ivf_exact_share of the lists makes the search exact
    (the cheaper one there); the checks keep sizing nprobe, and the index searches again once the
    queries need few lists."""
    keys = clustered(N, D, spread=0.6)
    cfg = MemoryConfig(size=N, key_dim=D, k=16, ivf_lists=64, ivf_probe=1, ivf_check_every=1, ivf_retrain_every=0,
                       ivf_target_recall_at_1=0.99, ivf_target_recall_at_k=1.0, ivf_exact_share=0.25)
    ivf, exact = memories(cfg, filled(keys))
    far = F.normalize(keys[:64] + 1.5 * unit(64, D, seed=1), dim=1)  # lies far from the keys
    ivf.shard.search(far)  # k = 16 not sized yet: exact; its check sizes nprobe for such queries
    assert ivf.backend.stats()["nprobe"] > 0.25 * 64 and ivf.backend.searches_exactly(16)
    got, want = ivf.shard.search(far), exact.shard.search(far)
    assert torch.equal(got["ids"], want["ids"]) and torch.equal(got["sims"], want["sims"])
    for s in range(2, 12):  # near queries: the window forgets the far ones after 8 checks
        ivf.shard.search(F.normalize(keys[s * 64:(s + 1) * 64] + 0.3 * unit(64, D, seed=s), dim=1))
    stats = ivf.backend.stats()
    flags = [c["exact"] for c in stats["checks"]]
    assert flags[0] is True and flags[1] is True and flags[-1] is False, flags
    assert stats["exact_searches"] == sum(flags) and stats["searches"] == len(flags) == 12
    for i, c in enumerate(stats["checks"]):  # then exact exactly when the nprobe it would use was above the share
        assert c["exact"] == (i == 0 or c["nprobe"] > 0.25 * 64), c
        assert not c["exact"] or (c["recall_at_1"], c["recall_at_k"]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="ivf_exact_share"):
        dataclasses.replace(cfg, ivf_exact_share=1.5)


def test_nprobe_is_sized_for_each_k_a_memory_is_searched_with():
    """A memory searched for k = 1 (the nearest slot, for a write) and k = 16 (the loss's
    candidates): each k probes what the checks of searches for that k found needed, so the few
    lists that k = 1 needs never cut the probes of k = 16."""
    keys = clustered(N, D, spread=0.6)
    cfg = MemoryConfig(size=N, key_dim=D, k=16, ivf_lists=64, ivf_probe=1, ivf_check_every=1, ivf_retrain_every=0,
                       ivf_target_recall_at_1=0.99, ivf_target_recall_at_k=0.95, ivf_exact_share=1.0)
    ivf, exact = memories(cfg, filled(keys))
    for s in range(10):  # k = 16 far from the keys, then k = 1 near them, in turn
        far = F.normalize(keys[s * 64:(s + 1) * 64] + 1.5 * unit(64, D, seed=s), dim=1)
        near = F.normalize(keys[s * 64:(s + 1) * 64] + 0.3 * unit(64, D, seed=100 + s), dim=1)
        ivf.shard.search(far)
        ivf.shard.search(near, k=1)
    checks = ivf.backend.stats()["checks"]
    assert [c["k"] for c in checks] == [16, 1] * 10
    for k in (16, 1):
        mine = [c for c in checks if c["k"] == k]
        for i, (before, after) in enumerate(zip(mine, mine[1:])):  # each probes what its k's last check set
            assert after["nprobe"] == before["nprobe_next"] == min(
                64, math.ceil(1.5 * max(c["probes_needed"] for c in mine[max(0, i - 7):i + 1])))
    needs = {k: [c["probes_needed"] for c in checks[2:] if c["k"] == k] for k in (16, 1)}
    assert max(needs[1]) < min(needs[16])  # after the first pair, k = 1 always needed fewer lists
    assert ivf.backend.probes_for(16) > ivf.backend.probes_for(1)  # one shared window would give them the same
    # a k no check has sized yet searches exactly, and that search's check sizes it
    q8 = F.normalize(keys[:32] + 1.5 * unit(32, D, seed=8), dim=1)
    assert ivf.backend.searches_exactly(8) and 8 not in ivf.backend.probes
    assert torch.equal(ivf.shard.search(q8, k=8)["ids"], exact.shard.search(q8, k=8)["ids"])
    first8 = ivf.backend.stats()["checks"][-1]
    assert (first8["k"], first8["exact"], first8["recall_at_k"]) == (8, True, 1.0)
    assert ivf.backend.probes_for(8) == first8["nprobe_next"] == min(64, math.ceil(1.5 * first8["probes_needed"]))
    q = F.normalize(keys[:32] + 1.5 * unit(32, D, seed=0), dim=1)  # the k = 16 searches keep their recall
    got, want = ivf.shard.search(q)["ids"], exact.shard.search(q)["ids"]
    assert recall(got, want) >= 0.95


def test_in_place_writes_are_visible_to_the_next_search():
    keys = clustered(N, D)
    cfg = MemoryConfig(size=N, key_dim=D, k=4, ivf_lists=64, ivf_probe=1, age_noise=0.0, ivf_retrain_every=0)
    ivf, _ = memories(cfg, filled(keys))
    new = unit(50, D, seed=7)  # far from the clusters: they move to other lists
    read = ivf.query(new, k=1)
    ivf.write(read, torch.arange(1000, 1050))  # labels no slot holds: every key is stored as given
    found = ivf.query(new, k=1)  # one probed list: the new key's own list
    assert torch.equal(found.prediction, torch.arange(1000, 1050))
    assert torch.allclose(found.sims[:, 0], torch.ones(50), atol=1e-5)
    slots = found.ids[:, 0]
    assert torch.equal(ivf.keys[slots], new)
    index = ivf.backend.index
    assert index.ntotal == N
    assert all(torch.allclose(torch.from_numpy(index.reconstruct(int(s))), ivf.keys[s]) for s in slots)


def test_retraining_keeps_every_slot_findable():
    keys = clustered(4000, D, seed=1)
    cfg = MemoryConfig(size=4000, key_dim=D, k=4, ivf_lists=32, ivf_probe=1, age_noise=0.0,
                       ivf_retrain_every=0.25)
    ivf, exact = memories(cfg, filled(keys))
    drifted = clustered(1500, D, clusters=10, seed=2)  # new clusters: the keys drift
    for start in range(0, 1500, 100):
        q, y = drifted[start:start + 100], torch.arange(start, start + 100)
        ivf.step(q, y)
        exact.step(q, y)
    assert ivf.backend.trainings == 2  # trained at load, re-trained after 1,000 slot writes
    assert state_equal(ivf.state(), exact.state())
    assert ivf.backend.index.ntotal == 4000
    distinct = torch.unique(ivf.keys, dim=0, return_inverse=True)[1]
    first = {}
    for slot, group in enumerate(distinct.tolist()):
        first.setdefault(group, slot)
    own = torch.tensor([first[g] for g in distinct.tolist()])
    assert torch.equal(ivf.query(ivf.keys.clone(), k=1).ids[:, 0], own)  # each key finds its own slot


@pytest.mark.parametrize("key_dtype", ["float16", "int8", "int8_dim"])
def test_compressed_keys_use_a_compressed_index_and_round_trip(tmp_path, key_dtype):
    keys = clustered(N, D)
    cfg = MemoryConfig(size=N, key_dim=D, k=8, ivf_lists=32, ivf_probe=32, key_dtype=key_dtype)
    ivf, exact = memories(cfg, filled(keys))
    assert "ScalarQuantizer" in type(ivf.backend.index).__name__
    q = unit(40, D, seed=5)
    got, want = ivf.shard.search(q), exact.shard.search(q)
    # every list probed: the lists hold the memory's own 16 / 8 bits, so faiss scores as the exact search does
    assert torch.equal(got["ids"], want["ids"])
    torch.testing.assert_close(got["sims"], want["sims"], rtol=0, atol=1e-5)
    ivf.save(tmp_path / "m.arrow")
    back = LocalMemory.from_file(tmp_path / "m.arrow", backend="ivf", device="cpu")
    assert back.config == cfg and back.backend.index is not None
    if key_dtype == "int8_dim":  # loading fits ranges to the saved (decoded) keys: within half a step of them
        assert ((back.state()["keys"] - ivf.state()["keys"]).abs() <= back.shard.codec.step / 2 + 1e-6).all()
        assert ivf.shard.codec.fits == back.shard.codec.fits == 1
        back_exact = LocalMemory(cfg, device="cpu")
        back_exact.load_state(back.state())
        assert torch.equal(back.shard.search(q)["ids"], back_exact.shard.search(q)["ids"])
    else:
        assert torch.equal(back.keys, ivf.keys) and state_equal(back.state(), ivf.state())
        assert torch.equal(back.shard.search(q)["ids"], got["ids"])


def test_config_checks_and_default_lists():
    assert default_lists(4_000_000) == 8192 and default_lists(100) == 2 and default_lists(10) == 1
    for bad in (dict(ivf_lists=-1), dict(ivf_probe=0), dict(ivf_train_after=float("nan")), dict(ivf_retrain_every=-1),
                dict(ivf_target_recall_at_1=1.5), dict(ivf_target_recall_at_k=-0.1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MemoryConfig(size=10, key_dim=4, k=2, **bad)
    with pytest.raises(ValueError, match="backend=.ivf. keeps its keys on"):
        LocalMemory(MemoryConfig(size=10, key_dim=4, k=2), backend="ivf", device="meta")


def step_both_alike(mem, local, steps: int = 12) -> None:
    """The same 40-query steps on both memories; each step's candidates and predictions agree."""
    g = torch.Generator().manual_seed(0)
    for s in range(steps):
        q, y = unit(40, 8, seed=100 + s), torch.randint(0, 30, (40,), generator=g)
        got, want = mem.step(q, y), local.step(q, y)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.prediction, want.prediction)


def test_sharded_ivf_equals_local_ivf(ray_local):
    from distmem import ShardedMemory

    # every list probed: each shard's index answers what the local one does, through training
    cfg = MemoryConfig(size=600, key_dim=8, k=6, age_noise=8.0, seed=3, ivf_lists=4, ivf_probe=4,
                       ivf_train_after=0.3, ivf_retrain_every=0.4)
    local = LocalMemory(cfg, backend="ivf", device="cpu")
    mem = ShardedMemory(cfg, 2, backend="ivf")
    try:
        step_both_alike(mem, local)
        assert local.backend.trainings >= 2
        assert state_equal(mem.state(), local.state())
        stats = [shard["backend"] for shard in mem.placement()]
        assert [s["name"] for s in stats] == ["ivf", "ivf"] and all(s["trainings"] >= 1 for s in stats)
    finally:
        mem.shutdown()
    assert dataclasses.asdict(cfg)["ivf_lists"] == 4


@pytest.mark.parametrize("backend", ["torch", "ivf"])
def test_sharded_int8_dim_memory_equals_its_local_twin(ray_local, backend):
    from distmem import ShardedMemory

    # one shard holds every slot: it fits (and re-fits) its 8-bit ranges exactly when the local memory does
    cfg = MemoryConfig(size=600, key_dim=8, k=6, age_noise=8.0, seed=3, key_dtype="int8_dim", key_fit_after=0.25,
                       key_refit_every=0.375, ivf_lists=4, ivf_probe=4, ivf_train_after=0.25, ivf_retrain_every=0.375)
    local = LocalMemory(cfg, backend=backend, device="cpu")
    mem = ShardedMemory(cfg, 1, backend=backend)
    try:
        step_both_alike(mem, local)
        assert local.shard.codec.fits == 2  # fitted after 150 writes (at 160), re-fitted 225 later (at 400)
        if backend == "ivf":  # on the same schedule, each (re)fit and (re)training share one rebuild
            assert local.backend.trainings == 2
        assert state_equal(mem.state(), local.state())
    finally:
        mem.shutdown()
