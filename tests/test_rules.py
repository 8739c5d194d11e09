"""Hand-computed cases, one per rule of shared/docs/memory-module.md."""

import math

import pytest
import torch

from distmem import LocalMemory, MemoryConfig
from distmem.rules import age_noise, oldest_slots

T = torch.tensor


def memory_with(keys, values, ages=None, step=0, k=3, recent=None, alpha=0.1) -> LocalMemory:
    keys = T(keys, dtype=torch.float32)
    n, d = keys.shape
    mem = LocalMemory(MemoryConfig(size=n, key_dim=d, k=k, alpha=alpha, age_noise=0.0), device="cpu")
    state = {"keys": keys, "values": T(values), "ages": T(ages if ages is not None else [0] * n),
             "step": T(step)}
    if recent:
        state["recent_labels"], state["recent_slots"] = T(list(recent)), T(list(recent.values()))
    mem.load_state(state)
    return mem


def q(*rows):
    return T(rows, dtype=torch.float32)


KEYS = [[1, 0], [0, 1], [1, 0], [0.6, 0.8], [0, 0], [0, 0]]
VALUES = [5, 6, 7, 5, -1, -1]


def test_empty_memory_candidates_are_lowest_slots_and_prediction_is_empty():
    mem = LocalMemory(MemoryConfig(size=6, key_dim=2, k=3, age_noise=0.0), device="cpu")
    r = mem.read(q([1.0, 0.0]))
    assert r.ids.tolist() == [[0, 1, 2]]  # all similarities 0: ties by lower slot id
    assert r.prediction.tolist() == [-1]
    assert r.confidence.item() == pytest.approx(1 / 3)


def test_candidates_sorted_by_similarity_ties_by_lower_id():
    mem = memory_with(KEYS, VALUES)
    r = mem.read(q([1.0, 0.0]))
    assert r.ids.tolist() == [[0, 2, 3]]  # slots 0 and 2 tie at 1.0
    assert r.sims[0].tolist() == pytest.approx([1.0, 1.0, 0.6])
    assert r.prediction.tolist() == [5]


@pytest.mark.parametrize("label, expected", [(7, 0.1), (5, 0.1), (6, 1.1)])
def test_margin_loss_positive_negative_and_no_positive(label, expected):
    mem = memory_with(KEYS, VALUES)
    r = mem.read(q([1.0, 0.0]), T([label]))
    # label 7: p = slot 2 (1.0), n = slot 0 (1.0). label 6: no positive -> q.K[p] = 0, n = slot 0.
    assert r.loss.item() == pytest.approx(expected)


def test_recent_slot_is_appended_as_positive_when_not_a_candidate():
    qv = q([0.8, 0.6])  # sims: 0.8, 0.6, 0.8, 0.96, 0, 0 -> candidates [3, 0, 2]
    without = memory_with(KEYS, VALUES).read(qv, T([6]))
    assert without.ids.tolist() == [[3, 0, 2]]
    assert without.loss.item() == pytest.approx(0.96 - 0 + 0.1)
    with_recent = memory_with(KEYS, VALUES, recent={6: 1}).read(qv, T([6]))
    assert with_recent.positive.tolist() == [1]
    assert with_recent.loss.item() == pytest.approx(0.96 - 0.6 + 0.1)


def test_recent_slot_is_ignored_once_it_holds_another_label():
    r = memory_with(KEYS, VALUES, recent={6: 4}).read(q([0.8, 0.6]), T([6]))  # slot 4 is empty now
    assert r.positive.tolist() == [-1]
    assert r.loss.item() == pytest.approx(1.06)


def test_no_negative_gives_zero_loss():
    r = memory_with(KEYS, [5, 6, 5, 5, -1, -1]).read(q([0.8, 0.6]), T([5]))
    assert r.ids.tolist() == [[3, 0, 2]] and r.negative.tolist() == [-1]
    assert r.loss.item() == 0.0


def test_loss_is_mean_over_batch():
    mem = memory_with(KEYS, VALUES)
    r = mem.read(q([1.0, 0.0], [1.0, 0.0]), T([7, 6]))
    assert r.loss.item() == pytest.approx((0.1 + 1.1) / 2)


def test_soft_output_uses_inverse_temperature():
    assert MemoryConfig(size=300, key_dim=2).inverse_temperature == pytest.approx(math.log(51.2) / 0.1)
    assert MemoryConfig(size=6, key_dim=2, k=3).inverse_temperature == 1.0  # ln(0.6) < 0 -> 1
    mem = memory_with(KEYS, VALUES, k=5, alpha=0.01)  # t = ln(1) / 0.01 = 0 -> 1
    t = max(1.0, math.log(0.2 * 5) / 0.01)
    r = mem.read(q([0.8, 0.6]))
    sims = [0.96, 0.8, 0.8, 0.6, 0.0]
    expected = math.exp(t * sims[0]) / sum(math.exp(t * s) for s in sims)
    assert r.confidence.item() == pytest.approx(expected, rel=1e-5)


def test_update_hit_miss_oldest_and_ageing():
    keys = [[0.6, 0.8], [0, 1], [-1, 0], [0, -1], [1, 0], [-0.6, -0.8]]
    mem = memory_with(keys, [1, 9, 2, 3, 4, 5], ages=[3, 0, 5, 5, 1, 2], step=10, k=2)
    # oldest by age, ties by lower id: 2, 3, 0, 5, 4, 1
    qs = q([1.0, 0.0], [0.28, 0.96], [-1.0, 0.0])
    mem.step(qs, T([7, 9, 8]))
    # ex 0: n1 = slot 4 (value 4 != 7): miss -> oldest[0] = slot 2
    # ex 1: n1 = slot 1 (value 9): hit -> normalize(q + K[1])
    # ex 2: n1 = slot 2 (value 2 != 8, judged before ex 0's write): miss -> oldest[2] = slot 0
    s = mem.state()
    hit = torch.nn.functional.normalize(T([0.28, 1.96]), dim=0)
    assert torch.allclose(s["keys"][2], T([1.0, 0.0]))
    assert torch.allclose(s["keys"][1], hit)
    assert torch.allclose(s["keys"][0], T([-1.0, 0.0]))
    assert s["values"].tolist() == [8, 9, 7, 3, 4, 5]
    assert s["ages"].tolist() == [0, 0, 0, 6, 2, 3]
    assert int(s["step"]) == 11
    assert dict(zip(s["recent_labels"].tolist(), s["recent_slots"].tolist())) == {7: 2, 8: 0, 9: 1}


def test_later_write_wins_in_batch_order():
    # ex 0 hits slot 0; ex 1 misses and takes oldest[1] = slot 0 too: the later (miss) wins.
    mem = memory_with([[1, 0], [0, 1], [0, -1]], [1, 2, 3], ages=[4, 9, 0], k=1)
    mem.step(q([1.0, 0.0], [-0.6, 0.8]), T([1, 5]))  # oldest: 1, 0, 2
    s = mem.state()
    assert torch.allclose(s["keys"][0], T([-0.6, 0.8])) and s["values"][0] == 5
    # two hits on one slot: the later example's key, each computed from the key before the batch
    mem = memory_with([[1, 0], [0, -1], [-1, 0]], [1, 2, 3], ages=[0, 9, 9], k=1)
    r = mem.step(q([0.8, 0.6], [0.6, 0.8]), T([1, 1]))
    assert r.ids[:, 0].tolist() == [0, 0]
    assert torch.allclose(mem.state()["keys"][0], torch.nn.functional.normalize(T([1.6, 0.8]), dim=0))


def test_write_without_training_read_keeps_recent_slots():
    mem = memory_with(KEYS, VALUES)
    r = mem.read(q([0.0, 1.0]))  # inference read: evaluation protocol
    mem.write(r, T([11]))
    s = mem.state()
    assert s["recent_labels"].numel() == 0
    assert 11 in s["values"].tolist()


def test_age_noise_is_seeded_bounded_and_shard_consistent():
    a = age_noise(seed=3, step=7, start=0, count=1000, width=8.0)
    assert torch.equal(a, age_noise(3, 7, 0, 1000, 8.0))
    assert not torch.equal(a, age_noise(3, 8, 0, 1000, 8.0))
    assert not torch.equal(a, age_noise(4, 7, 0, 1000, 8.0))
    assert a.abs().max() <= 8.0 and abs(a.mean().item()) < 0.6 and a.std().item() > 4.0
    assert torch.equal(a[300:700], age_noise(3, 7, 300, 400, 8.0))  # a shard draws its own slice


def test_oldest_slots_rank_by_age_ties_by_lower_id():
    last_write = T([10, 0, 0, 7])  # at step 10: ages 0, 10, 10, 3
    assert oldest_slots(last_write, 10, 3)[1].tolist() == [1, 2, 3]
    assert oldest_slots(last_write, 10, 0)[1].tolist() == []


def brute_force_oldest(last_write, step, count, width, seed, first_id):
    """Every slot scored: age + noise, sorted by score descending, ties by lower id."""
    ages = (step - last_write).double()
    if width:
        ages = ages + age_noise(seed, step, first_id, len(last_write), width)
    order = sorted(range(len(ages)), key=lambda i: (-float(ages[i]), i))[:count]
    return ages[order], T(order)


@pytest.mark.parametrize("width", [0.0, 0.5, 2.0, 8.0])
def test_oldest_slots_equal_scoring_every_slot(width):
    """Only slots that can win are scored; the result is that of scoring all (ties, fresh slots,
    loaded ages beyond the step, a span of write steps too wide for a histogram)."""
    g = torch.Generator().manual_seed(int(width * 10))
    for trial in range(40):
        n = int(torch.randint(1, 300, (1,), generator=g))
        spread = [3, 40, 1000, 10 ** 12][trial % 4]
        last_write = torch.randint(-5, spread, (n,), generator=g)
        last_write[torch.rand(n, generator=g) < 0.2] = 0  # never written
        step = int(last_write.max()) + int(torch.randint(0, 20, (1,), generator=g))
        count = int(torch.randint(0, n + 1, (1,), generator=g))
        first_id = int(torch.randint(0, 10 ** 6, (1,), generator=g))
        scores, ids = oldest_slots(last_write, step, count, width, seed=trial, first_id=first_id)
        want_scores, want_ids = brute_force_oldest(last_write, step, count, width, trial, first_id)
        assert ids.tolist() == want_ids.tolist(), (trial, n, count)
        assert torch.equal(scores, want_scores)


def test_noise_changes_which_slots_are_replaced_deterministically():
    def run(noise: float, seed: int):
        mem = LocalMemory(MemoryConfig(size=64, key_dim=4, k=2, age_noise=noise, seed=seed), device="cpu")
        g = torch.Generator().manual_seed(0)
        for _ in range(6):
            mem.step(torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=1),
                     torch.randint(0, 50, (8,), generator=g))
        return mem.state()
    assert torch.equal(run(8.0, 1)["values"], run(8.0, 1)["values"])
    assert not torch.equal(run(8.0, 1)["values"], run(0.0, 1)["values"])
