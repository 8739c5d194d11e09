"""ShardedMemory on a real local Ray: equal to LocalMemory for any shard count and any number of
writers, crash recovery, checkpoints across shard counts, and errors."""

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from distmem import LocalMemory, MemoryConfig

from conftest import state_equal, unit
from sockets import LOOPBACK, descendants, listening

CFG = MemoryConfig(size=120, key_dim=8, k=9, age_noise=0.0)


def batches(steps, writers, batch=6, seed=0, classes=15):
    g = torch.Generator().manual_seed(seed)
    return [[(unit(batch, CFG.key_dim, seed=1000 * seed + 10 * s + w), torch.randint(0, classes, (batch,), generator=g))
             for w in range(writers)] for s in range(steps)]


def local_run(stream, config=CFG):
    local = LocalMemory(config, device="cpu")
    results = [local.step(torch.cat([q for q, _ in step]), torch.cat([y for _, y in step])) for step in stream]
    return local, results


@pytest.fixture(scope="module")
def sharded_cls(ray_local):
    from distmem import ShardedMemory
    return ShardedMemory


@pytest.mark.parametrize("num_shards", [1, 2, pytest.param(4, marks=pytest.mark.slow)])  # 4: 9 s, slow tier
def test_equals_local_memory(sharded_cls, num_shards):
    cfg = MemoryConfig(size=120, key_dim=8, k=9, age_noise=8.0, seed=5)  # the counter-based noise is shard-exact
    stream = batches(10, 1)
    local, expected = local_run(stream, cfg)
    mem = sharded_cls(cfg, num_shards)
    grad = 0.0
    try:
        for (q, y), want in zip((s[0] for s in stream), expected):
            q = q.clone().requires_grad_()
            got = mem.step(q, y)
            assert torch.equal(got.ids, want.ids) and torch.equal(got.prediction, want.prediction)
            assert torch.allclose(got.loss, want.loss) and torch.allclose(got.confidence, want.confidence)
            (got.loss + got.confidence.sum()).backward()
            grad += q.grad.abs().sum().item()
        assert grad > 0
        assert state_equal(mem.state(), local.state())
        q, y = unit(6, cfg.key_dim, seed=99), torch.arange(6)  # a top-1 read without labels, then its write
        got, want = mem.query(q, k=1), local.query(q, k=1)
        assert got.ids.shape == (6, 1) and torch.equal(got.ids, want.ids)
        assert torch.equal(got.prediction, want.prediction)
        mem.write(got, y)
        local.write(want, y)
        assert state_equal(mem.state(), local.state())
        assert [(lo, hi) for lo, hi in mem.ranges] == [(120 * i // num_shards, 120 * (i + 1) // num_shards)
                                                       for i in range(num_shards)]
    finally:
        mem.shutdown()


@pytest.mark.parametrize("writers", [2, pytest.param(3, marks=pytest.mark.slow)])  # 3: 8 s, slow tier
def test_data_parallel_writers_equal_one_writer_with_concatenated_batches(sharded_cls, ray_local, writers):
    ray = ray_local
    stream = batches(6, writers, seed=writers)
    local, expected = local_run(stream)
    mem = sharded_cls(CFG, 2, name=f"dp-{writers}", num_writers=writers)

    @ray.remote(num_cpus=0)
    def writer(name, rank, my_batches):
        from distmem import ShardedMemory
        memory = ShardedMemory.attach(name, rank)
        return [memory.step(q, y).ids for q, y in my_batches]

    try:
        futures = [writer.remote(mem.name, r, [step[r] for step in stream]) for r in range(1, writers)]
        mine = [mem.step(*step[0]).ids for step in stream]  # this process is rank 0
        ids = [mine] + ray.get(futures)
        for t, want in enumerate(expected):  # reads of step t saw every write of earlier steps
            assert torch.equal(torch.cat([ids[r][t] for r in range(writers)]), want.ids)
        assert state_equal(mem.state(), local.state())
    finally:
        mem.shutdown()


def test_killed_shard_restarts_from_snapshot_and_log(sharded_cls, ray_local, tmp_path):
    ray = ray_local
    stream = batches(12, 1, seed=7)
    local, expected = local_run(stream)
    mem = sharded_cls(CFG, 3, storage=tmp_path, snapshot_every=4)
    try:
        for t, (step, want) in enumerate(zip(stream, expected)):
            if t in (4, 7):  # right after a snapshot, and between snapshots (log replay)
                before = ray.get(mem.shards[1].info.remote())["pid"]
                ray.kill(mem.shards[1], no_restart=False)
            got = mem.step(*step[0])  # calls to the restarting shard are retried
            assert torch.equal(got.ids, want.ids), t
        assert ray.get(mem.shards[1].info.remote())["pid"] != before
        assert state_equal(mem.state(), local.state())
    finally:
        mem.shutdown()


def test_checkpoint_loads_into_other_shard_counts(sharded_cls, ray_local, tmp_path):
    ray = ray_local
    stream = batches(25, 1, seed=3)  # 150 writes into 120 slots: labels have recent slots in both shards
    two = sharded_cls(CFG, 2)
    three = sharded_cls(CFG, 3)
    try:
        for step in stream:
            two.step(*step[0])
        two.save(tmp_path / "ckpt")
        per_shard = [set(ray.get(s.state.remote())["recent_labels"].tolist()) for s in two.shards]
        assert per_shard[0] & per_shard[1]  # the case where loading must keep each label's newest slot
        three.load(tmp_path / "ckpt")
        local = LocalMemory.from_file(tmp_path / "ckpt", device="cpu")
        assert state_equal(three.state(), two.state()) and state_equal(local.state(), two.state())
        for step in batches(3, 1, seed=4):  # all three continue identically
            a, b, c = two.step(*step[0]), three.step(*step[0]), local.step(*step[0])
            assert torch.equal(a.ids, b.ids) and torch.equal(a.ids, c.ids)
        assert state_equal(three.state(), local.state())
        local.save(tmp_path / "local.arrow")  # and a LocalMemory file loads into shards
        two.load(tmp_path / "local.arrow")
        assert state_equal(two.state(), local.state())
    finally:
        two.shutdown()
        three.shutdown()


def test_a_restarted_writer_replaces_its_lost_request(sharded_cls, ray_local):
    """A trainer restarted mid-step (new handle, same rank) replaces the request its dead
    predecessor left; the step applies once, with the new batch, and equals LocalMemory."""
    ray = ray_local
    stream = batches(2, 2, seed=9)
    mem = sharded_cls(CFG, 2, name="restart", num_writers=2)

    @ray.remote(num_cpus=0)
    def rank1_step(q, y):
        from distmem import ShardedMemory
        ShardedMemory.attach("restart", 1).step(q, y)

    try:
        lost = rank1_step.remote(*stream[0][1])  # rank 1 writes, then waits for rank 0 ...
        dead = _waiting_writer(ray, mem, 1, other_than=None)
        ray.cancel(lost, force=True)  # ... and dies before the step is applied
        with pytest.raises(ray.exceptions.RayError):
            ray.get(lost)
        q, y = stream[0][1]
        replacement = rank1_step.remote(q.flip(0), y.flip(0))  # its restart sends its own batch
        _waiting_writer(ray, mem, 1, other_than=dead)  # it has replaced the lost request
        mem.step(*stream[0][0])
        ray.get(replacement)
        local, _ = local_run([[stream[0][0], (q.flip(0), y.flip(0))]])
        assert state_equal(mem.state(), local.state())
        again = sharded_cls.attach("restart", 0)
        alive = sharded_cls.attach("restart", 1)
        alive.read(*stream[1][1])  # rank 1 beats again: the replacement's task (and heartbeat) ended,
        # and the coordinator ends a step whose missing writer is silent for heartbeat_timeout_s
        request = _wire_request(mem, stream[1][0])
        waiting = mem._coordinator.write.remote(1, 0, request, again._writer)  # waits for rank 1
        # an async actor need not start calls in their order: the duplicate goes once the first waits
        _waiting_writer(ray, mem, 0, other_than=None)
        with pytest.raises(ValueError, match="rank"):  # one handle still writes once per step
            ray.get(mem._coordinator.write.remote(1, 0, request, again._writer))
        ray.cancel(waiting)
        del alive  # its heartbeat stops with the handle
    finally:
        mem.shutdown()


def _waiting_writer(ray, mem, rank, other_than, timeout_s=60.0):
    """The id of the writer whose request of `rank` waits in the coordinator (polled until it is
    not `other_than`)."""
    deadline = time.time() + timeout_s
    while True:
        writer = ray.get(mem._coordinator.info.remote())["waiting"].get(rank)
        if writer is not None and writer != other_than:
            return writer
        assert time.time() < deadline, f"no new request of rank {rank} reached the coordinator"
        time.sleep(0.05)


def _wire_request(mem, step):
    from distmem import merge
    from distmem.distributed.memory import _wire
    return _wire(merge.write_request(CFG, mem.read(*step), None))


def test_errors_and_bad_input_leave_memory_unchanged(sharded_cls):
    from distmem import ShardedMemory
    with pytest.raises(ValueError, match="num_shards"):
        ShardedMemory(MemoryConfig(size=4, key_dim=2, k=2), 5)
    with pytest.raises(ValueError, match="no memory called 'nope'"):
        ShardedMemory.attach("nope", 0)
    mem = sharded_cls(CFG, 2, name="errors")
    try:
        with pytest.raises(ValueError, match="already exists"):
            sharded_cls(CFG, 2, name="errors")
        with pytest.raises(ValueError, match="rank"):
            ShardedMemory.attach("errors", 1)
        mem.step(unit(4, 8), torch.arange(4))
        before = mem.state()
        with pytest.raises(ValueError, match="shape"):
            mem.step(unit(4, 7), torch.arange(4))
        with pytest.raises(ValueError, match="labels"):
            mem.step(unit(4, 8), torch.tensor([0, 1, -1, 2]))
        with pytest.raises(ValueError, match="batch"):
            mem.step(unit(121, 8), torch.zeros(121, dtype=torch.int64))
        stale = mem.read(unit(4, 8), torch.arange(4))
        with pytest.raises(ValueError, match="state"):
            mem.load_state({**before, "values": before["values"][:3]})
        assert state_equal(mem.state(), before)
        mem.write(stale)
        with pytest.raises(ValueError, match="stale"):
            mem.write(stale)
    finally:
        mem.shutdown()


def test_unreachable_cluster_is_a_clear_error():
    code = ("from distmem import ShardedMemory, MemoryConfig\n"
            "ShardedMemory(MemoryConfig(size=8, key_dim=2, k=2), 2, address='127.0.0.1:9')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "ConnectionError: address: no Ray cluster reachable at '127.0.0.1:9'" in out.stderr


def test_the_embedded_ray_lives_on_loopback_only(sharded_cls, ray_local):
    """connect() (as the jobs and this suite start Ray, after `import ray`): every node, actor and
    listening socket of the local Ray (this process's and those below it) on 127.0.0.1, not the
    host's outward address."""
    ray = ray_local
    mem = sharded_cls(CFG, 2)
    try:
        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
        where = ray.get([shard.__ray_call__.remote(lambda self: ray.util.get_node_ip_address())
                         for shard in mem.shards])
        assert where == ["127.0.0.1", "127.0.0.1"]
        shard_pids = set(ray.get([shard.__ray_call__.remote(lambda self: os.getpid()) for shard in mem.shards]))
        mine = listening(descendants(os.getpid()))
        if mine is None:
            pytest.skip("no `ss` to list listening sockets")
        assert shard_pids <= set(mine)  # the shards' own sockets are among those checked
        assert set().union(*mine.values()) <= LOOPBACK, mine
    finally:
        mem.shutdown()


def test_inference_read_is_one_call_per_shard(sharded_cls):
    mem = sharded_cls(CFG, 2)
    try:
        mem.step(unit(6, 8), torch.arange(6))
        r = mem.query(unit(3, 8, seed=9))
        # only the search replies moved: no weighted-key round trip without a gradient to compute
        assert mem.traffic["read_bytes"] == 2 * 3 * 8 * 4 + sum(
            3 * n * 20 + 3 * 8 * 4 + 8 + 8 for n in (9, 9))  # queries out; ids/values/sims, first key, step, generation
        assert r.confidence.grad_fn is None
    finally:
        mem.shutdown()


def test_both_memories_refuse_a_read_made_before_a_clear_or_a_load(sharded_cls, tmp_path):
    """The same rule for both: a read made before clear(), load_state() or load() is stale, even
    when the memory comes back to the same step (here: step 0, the state it had). Both satisfy
    the Memory protocol."""
    from distmem import Memory
    q, y = unit(4, CFG.key_dim, seed=3), torch.arange(4)
    file = tmp_path / "empty.arrow"
    LocalMemory(CFG, device="cpu").save(file)  # an empty memory at step 0, like both before each change
    sharded = sharded_cls(CFG, 2)
    try:
        for mem in (LocalMemory(CFG, device="cpu"), sharded):
            assert isinstance(mem, Memory)
            for change in ("clear", "load_state", "load"):
                mem.clear()
                state = mem.state()
                read = mem.read(q, y)
                if change == "clear":
                    mem.clear()
                elif change == "load_state":
                    mem.load_state(state)
                else:
                    mem.load(file)
                assert mem.step_count == 0
                with pytest.raises(ValueError, match="read is stale"):
                    mem.write(read)
                assert state_equal(mem.state(), state), change  # the refused write changed nothing
                mem.write(mem.read(q, y))  # a fresh read is accepted
                assert mem.step_count == 1, change
    finally:
        sharded.shutdown()


@pytest.mark.slow  # 11-17 s of restarts: the default tier stays within 5 minutes
def test_a_restarted_shard_keeps_its_generation(sharded_cls, ray_local, tmp_path):
    """After a clear, a shard that dies comes back with the clear's generation: reads made after
    the clear still write."""
    mem = sharded_cls(CFG, 2, storage=tmp_path, snapshot_every=2)
    try:
        mem.step(unit(4, CFG.key_dim, seed=1), torch.arange(4))
        mem.clear()
        read = mem.read(unit(4, CFG.key_dim, seed=2), torch.arange(4))
        pid = mem.placement()[1]["pid"]
        ray_local.kill(mem.shards[1], no_restart=False)
        mem.write(read)  # retried on the restarted shard; its generation came back from storage
        assert mem.step_count == 1 and mem.placement()[1]["pid"] != pid
    finally:
        mem.shutdown()


def test_the_loopback_workaround_names_the_missing_ray_internal(monkeypatch):
    from ray._private import ray_constants

    from distmem.distributed import ray_compat
    monkeypatch.delattr(ray_constants, "ENABLE_RAY_CLUSTER")
    with pytest.raises(RuntimeError, match=r"no ray._private.ray_constants.ENABLE_RAY_CLUSTER.*ray==2\.60\.\*"):
        with ray_compat.single_machine():
            pass


def test_a_dashboard_url_in_ray_address_says_what_to_set(tmp_path):
    """`cluster/local.sh env` exports the dashboard URL for `ray job submit`; a program run directly
    with it gets one line naming the variable and what to set instead, not a hang or a wrong cluster."""
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8275"}
    root = os.path.dirname(os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-m", "jobs.rare_symbols", "--preset", "quick", "--storage", str(tmp_path)],
                         env=env, capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 2 and "error: RAY_ADDRESS: 'http://127.0.0.1:8275' is a Ray dashboard URL" in out.stderr
    assert "--address HOST:PORT" in out.stderr and "Traceback" not in out.stderr


def _bytes_read(pid: int) -> int:
    """Bytes the process has read through read() calls so far (files, pipes and sockets)."""
    return int(dict(line.split(": ") for line in open(f"/proc/{pid}/io").read().splitlines())["rchar"])


@pytest.mark.slow  # 11-17 s (5 shard processes, 10 MB through a URI): the default tier stays within 5 minutes
def test_a_checkpoint_through_a_uri_moves_only_what_each_process_needs(sharded_cls, tmp_path):
    """Saved through a URI (each shard uploads its own part) and loaded through one into 3 shards:
    each shard fetches only the parts that overlap its slots, the caller only the manifest (before:
    the whole checkpoint once in the caller and once in every shard)."""
    cfg = MemoryConfig(size=120_000, key_dim=16, k=4, age_noise=0.0)  # two parts of about 5 MB each
    source = sharded_cls(cfg, 2)
    try:
        for step in batches(3, 1, seed=5):
            source.step(F.normalize(torch.cat([step[0][0]] * 2, 1), dim=1), step[0][1])
        source.save(f"file://{tmp_path}/ckpt")
        saved = source.state()
    finally:
        source.shutdown()
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"manifest.json", "part-0000-of-0002.arrow",
                                                              "part-0001-of-0002.arrow"}
    part_bytes = [(tmp_path / "ckpt" / f"part-000{i}-of-0002.arrow").stat().st_size for i in (0, 1)]
    mem = sharded_cls(cfg, 3)
    try:
        pids = [info["pid"] for info in mem.placement()]
        # a first step first: the shards' first Arrow call imports pandas (pyarrow imports it lazily),
        # whose files would count here as read
        mem.step(unit(3, 16), torch.arange(3))
        before = [_bytes_read(pid) for pid in pids], _bytes_read(os.getpid())
        mem.load(f"file://{tmp_path / 'ckpt'}")
        shard_read = [_bytes_read(pid) - b for pid, b in zip(pids, before[0])]
        driver_read = _bytes_read(os.getpid()) - before[1]
        assert state_equal(mem.state(), saved)
    finally:
        mem.shutdown()
    # slots [0, 40k) lie in part 0, [40k, 80k) in both, [80k, 120k) in part 1
    for got, needed in zip(shard_read, [part_bytes[0], sum(part_bytes), part_bytes[1]]):
        assert needed <= got < needed + min(part_bytes) / 2, (shard_read, part_bytes)
    assert driver_read < 1_000_000, driver_read  # the manifest (and Ray's own messages), no part


def test_shards_take_a_gpu_each_or_share_whole_gpus_evenly():
    from distmem.distributed.cluster import gpu_share

    assert gpu_share(0, 2) == 0 and gpu_share(0.5, 1) == 0  # no whole GPU: the shards run on CPUs
    assert gpu_share(4, 2) == gpu_share(2, 2) == 1
    assert gpu_share(1, 2) == 0.5 and gpu_share(3, 4) == 0.5 and gpu_share(1, 3) == pytest.approx(1 / 3)
    for gpus in range(1, 9):
        for shards in range(1, 17):
            per_gpu = round(1 / gpu_share(gpus, shards))  # shards on one GPU
            assert per_gpu * gpus >= shards  # they all fit
            assert per_gpu == 1 or (per_gpu - 1) * gpus < shards  # and share no more than they must
