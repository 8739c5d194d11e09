"""MemoryShard without Ray: several in-process shards merged exactly like one memory, and a shard
that restarts from its snapshot plus write log."""

import pytest
import torch

from distmem import LocalMemory, MemoryConfig, merge, storage
from distmem.distributed import shard_ranges
from distmem.shard import MemoryShard

from conftest import state_equal, unit


class InProcessShards:
    """The sharded protocol with plain objects: reads over all shards, one write per step from
    any number of writers' requests."""

    def __init__(self, config, num_shards, **kw):
        self.config = config
        self.ranges = shard_ranges(config.size, num_shards)
        self.shards = [MemoryShard(config, lo, hi, **kw) for lo, hi in self.ranges]

    def read(self, q, labels=None, k=None):
        return merge.read(self.config, q, labels, lambda qq, yy, kk: [s.search(qq, yy, kk) for s in self.shards],
                          lambda i, w: sum(s.weighted_keys(i, w) for s in self.shards), version=None, k=k)

    def write(self, reads_and_labels):
        requests = [merge.write_request(self.config, r, y) for r, y in reads_and_labels]
        step, total = self.shards[0].step, sum(len(r.labels) for r in requests)
        oldest = merge.merge_oldest([s.oldest(step, total) for s in self.shards], total)
        for shard, w in zip(self.shards, merge.plan_step(step, requests, oldest, self.ranges)):
            shard.apply(step, w)


def global_recent(parts):
    from distmem.rules import RecentSlots
    r = RecentSlots()
    r.update(*(torch.cat([p[n] for p in parts]) for n in ("recent_labels", "recent_slots", "recent_seqs")))
    return r.state()


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5])
@pytest.mark.parametrize("writers", [1, 3])
def test_in_process_shards_equal_local_memory(num_shards, writers):
    cfg = MemoryConfig(size=60, key_dim=6, k=7, age_noise=8.0, seed=3)
    local, sharded = LocalMemory(cfg, device="cpu"), InProcessShards(cfg, num_shards)
    g = torch.Generator().manual_seed(0)
    for step in range(8):
        batches = [(unit(5, 6, seed=100 * step + w), torch.randint(0, 12, (5,), generator=g)) for w in range(writers)]
        train = step % 3 != 2
        q_all, y_all = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        expected = local.read(q_all, y_all if train else None)
        reads = [sharded.read(q, y if train else None) for q, y in batches]
        for field in ("ids", "sims", "values", "prediction", "confidence"):
            assert torch.allclose(torch.cat([getattr(r, field) for r in reads]).float(),
                                  getattr(expected, field).float(), atol=1e-6), field
        if train:  # each writer's loss is the mean over its own batch
            assert torch.allclose(torch.stack([r.loss for r in reads]).mean(), expected.loss, atol=1e-6)
            assert torch.equal(torch.cat([r.positive for r in reads]), expected.positive)
        local.write(expected, y_all)
        sharded.write([(r, y) for r, (_, y) in zip(reads, batches)])
    parts = [s.state() for s in sharded.shards]
    got = {n: torch.cat([p[n] for p in parts]) for n in ("keys", "values", "ages")}
    want = local.state()
    assert all(torch.equal(got[n], want[n]) for n in got)
    assert state_equal(global_recent(parts), {n: want[n] for n in ("recent_labels", "recent_slots", "recent_seqs")})


def stream(shard_like, steps, seed=0, start=0):
    g = torch.Generator().manual_seed(seed)
    for step in range(start, start + steps):
        y = torch.randint(0, 9, (4,), generator=g)
        q = unit(4, shard_like.config.key_dim, seed=step)
        shard_like.write([(shard_like.read(q, y), y)])


@pytest.mark.parametrize("snapshot_every", [1, 3, 1000])
def test_shard_restarts_from_snapshot_and_log(tmp_path, snapshot_every):
    cfg = MemoryConfig(size=30, key_dim=5, k=3, age_noise=8.0)
    durable = InProcessShards(cfg, 2, storage_dir=None)
    durable.shards = [MemoryShard(cfg, lo, hi, storage_dir=tmp_path / str(i), snapshot_every=snapshot_every)
                      for i, (lo, hi) in enumerate(durable.ranges)]
    twin = InProcessShards(cfg, 2)
    stream(durable, 7)
    stream(twin, 7)
    # crash: every in-memory object is lost; shards come back from their folders
    durable.shards = [MemoryShard(cfg, lo, hi, storage_dir=tmp_path / str(i), snapshot_every=snapshot_every)
                      for i, (lo, hi) in enumerate(durable.ranges)]
    for a, b in zip(durable.shards, twin.shards):
        assert state_equal(a.state(), b.state())
    stream(durable, 4, seed=1, start=7)
    stream(twin, 4, seed=1, start=7)
    for a, b in zip(durable.shards, twin.shards):
        assert state_equal(a.state(), b.state())


def test_logged_but_unacknowledged_step_is_replayed_once(tmp_path):
    cfg = MemoryConfig(size=20, key_dim=4, k=2, age_noise=0.0)
    shard = MemoryShard(cfg, 0, 20, storage_dir=tmp_path, snapshot_every=100)
    mem = InProcessShards(cfg, 1)
    mem.shards = [shard]
    y = torch.arange(4)
    r = mem.read(unit(4, 4), y)
    request = merge.write_request(cfg, r, y)
    (write,) = merge.plan_step(0, [request], merge.merge_oldest([shard.oldest(0, 4)], 4), [(0, 20)])
    storage.write_log_entry(tmp_path / "log-000000000000.arrow", 0, write)  # crash after the log write
    back = MemoryShard(cfg, 0, 20, storage_dir=tmp_path)
    assert back.step == 1
    assert back.apply(0, write) is False  # the caller's retry is a no-op
    shard.apply(0, write)
    assert state_equal(back.state(), shard.state())


def test_clear_on_disk_and_bad_step(tmp_path):
    cfg = MemoryConfig(size=20, key_dim=4, k=2)
    mem = InProcessShards(cfg, 1, storage_dir=tmp_path, snapshot_every=2)
    stream(mem, 3)
    mem.shards[0].clear()
    assert MemoryShard(cfg, 0, 20, storage_dir=tmp_path).state()["step"] == 0
    with pytest.raises(ValueError, match="step"):
        mem.shards[0].oldest(5, 2)


def test_read_range_across_parts_and_files(tmp_path):
    cfg = MemoryConfig(size=30, key_dim=5, k=3, age_noise=8.0)
    mem = InProcessShards(cfg, 3)
    stream(mem, 5)
    files = []
    for i, s in enumerate(mem.shards):
        storage.write_memory_file(tmp_path / f"p{i}.arrow", cfg, s.state(), lo=s.lo)
        files.append((f"p{i}.arrow", s.lo, s.hi))
    with pytest.raises(FileNotFoundError, match="manifest"):
        storage.read_range(tmp_path, 0, 30)  # unfinished checkpoint: no manifest yet
    storage.write_manifest(tmp_path, cfg, 5, files)
    whole = {n: torch.cat([s.state()[n] for s in mem.shards]) for n in ("keys", "values", "ages")}
    _, part = storage.read_range(tmp_path, 7, 23)  # spans all three parts
    assert all(torch.equal(part[n], whole[n][7:23]) for n in whole)
    assert ((part["recent_slots"] >= 7) & (part["recent_slots"] < 23)).all()
    with pytest.raises(ValueError, match="does not hold"):
        storage.read_range(tmp_path / "p0.arrow", 0, 30)


@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_a_top1_read_writes_exactly_like_a_full_read(num_shards, backend):
    """write(query(q, k=1), y) == write(query(q), y): the update needs the nearest neighbour only."""
    cfg = MemoryConfig(size=60, key_dim=8, k=12, age_noise=8.0, seed=3)
    full = LocalMemory(cfg, device="cpu")
    top1 = InProcessShards(cfg, num_shards, backend=backend)
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        q, y = unit(7, 8, seed=step), torch.randint(0, 9, (7,), generator=g)
        if step % 3 == 0:  # training steps in between: recent slots as in a real run
            full.step(q, y)
            top1.write([(top1.read(q, y), None)])
            continue
        want, got = full.query(q), top1.read(q, k=1)
        assert got.ids.shape == (7, 1) and torch.equal(got.ids[:, 0], want.ids[:, 0])
        assert torch.equal(got.prediction, want.prediction)
        assert torch.allclose(got.sims[:, 0], want.sims[:, 0], atol=1e-6)
        full.write(want, y)
        top1.write([(got, y)])
    state = {name: torch.cat([s.state()[name] for s in top1.shards]) for name in ("keys", "values", "ages")}
    assert all(torch.equal(state[name], full.state()[name]) for name in state)
    assert (full.state()["values"] >= 0).sum() > 30
