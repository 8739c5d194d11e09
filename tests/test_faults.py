"""Faults of a running ShardedMemory on a real local Ray: a writer that dies between its read and
its write, a coordinator that dies (between steps, at the barrier, between the shards' applies),
and the fault-injection soak (slow tier). The oracle is one LocalMemory fed the same batches."""

import time

import pytest
import torch

from distmem import LocalMemory, MemoryConfig, merge

from conftest import state_equal, unit

CFG = MemoryConfig(size=120, key_dim=8, k=9, age_noise=8.0, seed=3)


def stream(steps, writers=2, batch=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[(unit(batch, CFG.key_dim, seed=100 * s + w + 1000 * seed), torch.randint(0, 12, (batch,), generator=g))
             for w in range(writers)] for s in range(steps)]


def reference(steps):
    local = LocalMemory(CFG, device="cpu")
    for step in steps:
        local.step(torch.cat([q for q, _ in step]), torch.cat([y for _, y in step]))
    return local


@pytest.fixture(scope="module")
def ray(ray_local):
    return ray_local


@pytest.fixture(scope="module")
def writer_cls(ray):
    class Writer:
        """A writer process that can be killed between its read and its write."""

        def __init__(self, name, rank):
            from distmem import ShardedMemory
            self.memory = ShardedMemory.attach(name, rank)

        def read(self, q, y):
            self.pending = self.memory.read(q, y)

        def write(self):
            self.memory.write(self.pending)

    return ray.remote(num_cpus=0)(Writer)


def test_a_writer_killed_between_read_and_write_ends_the_step_for_all_within_seconds(ray, writer_cls):
    from distmem import ShardedMemory
    steps = stream(3, seed=1)
    mem = ShardedMemory(CFG, 2, name="dead-writer", num_writers=2, heartbeat_timeout_s=2.0)  # write timeout: 600 s
    try:
        rank1 = writer_cls.remote("dead-writer", 1)
        for q, y in (steps[0][1],):
            ray.get(rank1.read.remote(q, y))
            waiting = rank1.write.remote()
            mem.step(*steps[0][0])
            ray.get(waiting)
        before = mem.state()
        ray.get(rank1.read.remote(*steps[1][1]))
        ray.kill(rank1)  # between its read and its write
        read = mem.read(*steps[1][0])
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"step 1: the writer of rank 1 stopped .*nothing of this step"):
            mem.write(read)
        assert time.monotonic() - start < 60  # noticed after heartbeats stop, not after write_timeout_s
        assert state_equal(mem.state(), before)  # no half-applied step, no request left behind
        assert ray.get(mem._coordinator.info.remote())["waiting"] == {}
        rank1 = writer_cls.remote("dead-writer", 1)  # the restarted writer: the step again, then one more
        for step in steps[1:]:
            ray.get(rank1.read.remote(*step[1]))
            waiting = rank1.write.remote()
            mem.step(*step[0])
            ray.get(waiting)
        assert state_equal(mem.state(), reference(steps).state())
    finally:
        mem.shutdown()


@pytest.mark.slow
def test_a_killed_coordinator_comes_back_and_the_run_equals_an_uninterrupted_one(ray, writer_cls):
    """Killed between steps and while a writer waits at the barrier: the writers' lost calls are
    sent again to the restarted coordinator, which takes the step from the shards."""
    from distmem import ShardedMemory
    steps = stream(7, seed=2)
    mem = ShardedMemory(CFG, 3, name="coordinator-kill", num_writers=2)
    try:
        rank1 = writer_cls.remote("coordinator-kill", 1)
        pids = set()
        for t, step in enumerate(steps):
            pids.add(ray.get(mem._coordinator.__ray_call__.remote(lambda self: __import__("os").getpid())))
            if t == 2:
                ray.kill(mem._coordinator, no_restart=False)
            ray.get(rank1.read.remote(*step[1]))
            read = mem.read(*step[0])
            waiting = rank1.write.remote()
            if t == 4:  # rank 1's request waits in the coordinator
                deadline = time.monotonic() + 30
                while 1 not in ray.get(mem._coordinator.info.remote())["waiting"]:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                ray.kill(mem._coordinator, no_restart=False)
            mem.write(read)
            ray.get(waiting)
        assert len(pids) == 3  # it did restart, twice
        assert state_equal(mem.state(), reference(steps).state())
    finally:
        mem.shutdown()


@pytest.mark.slow  # 11-17 s of restarts: the default tier stays within 5 minutes
def test_a_step_some_shards_applied_when_the_coordinator_died_is_finished_by_its_restart(ray):
    """Every shard gets the step's whole plan and keeps it; a coordinator that died between the
    shards' applies leaves a step that its restart finishes from the copy of a shard ahead."""
    from distmem import ShardedMemory
    from distmem.distributed.memory import _unwire, _wire
    steps = stream(3, writers=1, seed=3)
    mem = ShardedMemory(CFG, 3, name="half-applied")
    try:
        for step in steps[:2]:
            mem.step(*step[0])
        # step 2 as the coordinator plans it, applied on shard 1 only when the coordinator "dies"
        request = merge.write_request(CFG, mem.read(*steps[2][0]), None)
        offers = _unwire(ray.get([s.oldest.remote(2, len(request.labels)) for s in mem.shards]))
        plan = merge.plan_step(2, [request], merge.merge_oldest(offers, len(request.labels)), mem.ranges)
        ray.get(mem.shards[1].apply.remote(2, [_wire(w) for w in plan], 1))
        assert [p["step"] for p in mem.placement()] == [2, 3, 2]
        ray.kill(mem._coordinator, no_restart=False)
        assert mem.position()[0] == 3  # the restarted coordinator finished the step
        assert state_equal(mem.state(), reference(steps).state())
    finally:
        mem.shutdown()


@pytest.mark.slow
def test_fault_injection_soak(ray):
    """2 writers x 3 shards, 5,000 steps with age noise, 12 seeded kills of shards, writers and
    the coordinator: the memory ends equal to one LocalMemory fed the same batches."""
    from distmem.distributed.soak import SoakConfig, run_soak
    calm = run_soak(SoakConfig(steps=1000, kills=0))
    soak = run_soak(SoakConfig(steps=5000, kills=12, seed=7))
    print(f"\nwithout kills: {calm.summary()}\nwith kills:    {soak.summary()}")
    for kill in soak.kills:
        print(f"  step {kill.step}: {kill.kind} {kill.target} killed {kill.moment}, step took {kill.recovery_s:.2f} s")
    assert calm.equal and calm.steps == 1000
    assert soak.equal and soak.steps == 5000 and soak.checks == 5
    assert {k.kind for k in soak.kills} == {"shard", "writer", "coordinator"} and len(soak.kills) == 12
