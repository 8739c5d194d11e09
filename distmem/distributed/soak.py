"""Fault-injection soak of `ShardedMemory`: a long stream of steps by several writers while a
shard, a writer or the coordinator is killed at seeded random steps. The memory must end equal to
one `LocalMemory` fed the same batches, each step once.

Recovery follows the memory's own rules: calls to a restarting shard are retried; a writer whose
call to the coordinator was lost asks where the memory stands and writes again; a writer that
dies before writing ends its step for all (the others get an error naming its rank), and the
step is read and written again with a new writer of that rank, as a restarted trainer would.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
import torch
import torch.nn.functional as F
from torch import Tensor

from distmem.config import MemoryConfig
from distmem.distributed.memory import ShardedMemory
from distmem.memory import LocalMemory, states_equal

KINDS = ("shard", "writer", "coordinator")
MOMENTS = {"shard": ("during-read", "during-write"), "writer": ("after-read", "during-write"),
           "coordinator": ("between-steps", "during-write")}


@dataclass(frozen=True)
class SoakConfig:
    """steps: steps of the stream. kills: faults injected at distinct random steps (seeded),
    shards, writers and the coordinator in turn. batch: examples per writer and step, queries
    around `classes` class prototypes (so that reads find their label and keys get averaged)."""

    steps: int = 5000
    kills: int = 12
    seed: int = 0
    shards: int = 3
    writers: int = 2
    batch: int = 8
    classes: int = 48
    memory: MemoryConfig = field(default_factory=lambda: MemoryConfig(size=256, key_dim=16, k=8, age_noise=8.0,
                                                                      seed=1))
    snapshot_every: int = 50
    heartbeat_timeout_s: float = 2.0
    check_every: int = 1000  # compare the whole state with the reference this often (and at the end)

    def __post_init__(self) -> None:
        if self.steps < 1 or not 0 <= self.kills < self.steps:
            raise ValueError(f"steps must be >= 1 and kills in [0, steps), got steps={self.steps}, kills={self.kills}")


@dataclass
class Kill:
    step: int
    kind: str  # shard | writer | coordinator
    moment: str  # during-read | after-read | during-write | between-steps
    target: int  # shard index or writer rank (0 for the coordinator)
    recovery_s: float = 0.0  # the step's wall time


@dataclass
class SoakReport:
    steps: int
    kills: list[Kill]
    seconds: float  # of steps 1.. (step 0 also waits for the processes to start)
    redone_steps: int  # steps read and written again after a writer died before writing
    checks: int  # whole-state comparisons with the reference, all equal (else `mismatch`)
    equal: bool
    mismatch: int | None = None  # the first step after which the states differed

    @property
    def steps_per_s(self) -> float:
        return (self.steps - 1) / self.seconds if self.steps > 1 else float("nan")

    def summary(self) -> str:
        kinds = Counter(k.kind for k in self.kills)
        return (f"{self.steps} steps, {len(self.kills)} kills ({', '.join(f'{kinds[k]} {k}' for k in KINDS)}), "
                f"{self.redone_steps} steps redone: {self.steps_per_s:.1f} steps/s; final state "
                f"{'equals' if self.equal else 'DIFFERS from'} one LocalMemory fed the same batches "
                f"(whole-state checks: {self.checks})")


def batch(cfg: SoakConfig, step: int, rank: int) -> tuple[Tensor, Tensor]:
    """Writer `rank`'s batch of `step`: queries [batch, d] near their labels' prototypes, labels [batch]."""
    prototypes = F.normalize(torch.randn(cfg.classes, cfg.memory.key_dim,
                                         generator=torch.Generator().manual_seed(cfg.seed)), dim=1)
    g = torch.Generator().manual_seed(((cfg.seed * 1_000_003 + step) * 64 + rank) % 2**63)
    labels = torch.randint(0, cfg.classes, (cfg.batch,), generator=g)
    noise = torch.randn(cfg.batch, cfg.memory.key_dim, generator=g)
    return F.normalize(prototypes[labels] + 0.6 * noise, dim=1), labels


class SoakWriter:
    """A writer process (Ray actor): reads and writes its batches of the stream."""

    def __init__(self, cfg: SoakConfig, name: str, rank: int) -> None:
        torch.set_num_threads(1)
        self.cfg, self.rank = cfg, rank
        self.memory = ShardedMemory.attach(name, rank)
        self.pending = None

    def read(self, step: int) -> None:
        self.pending = self.memory.read(*batch(self.cfg, step, self.rank))

    def write(self) -> None:
        read, self.pending = self.pending, None
        self.memory.write(read)


def plan_kills(cfg: SoakConfig) -> list[Kill]:
    """`cfg.kills` faults at distinct seeded steps; the kinds in turn, so each is injected."""
    rng = random.Random(cfg.seed)
    steps = sorted(rng.sample(range(1, cfg.steps), cfg.kills))
    kinds = [KINDS[i % len(KINDS)] for i in range(cfg.kills)]
    rng.shuffle(kinds)
    count = {"shard": cfg.shards, "writer": cfg.writers, "coordinator": 1}
    return [Kill(step, kind, rng.choice(MOMENTS[kind]), rng.randrange(count[kind])) for step, kind in zip(steps, kinds)]


def run_soak(cfg: SoakConfig, progress: Callable[[int], None] | None = None) -> SoakReport:
    """Run the stream with the planned kills on a fresh `ShardedMemory` (on the connected or an
    embedded local Ray) next to a `LocalMemory` reference; stops at the first difference."""
    kills = {k.step: k for k in plan_kills(cfg)}
    rng = random.Random(cfg.seed + 1)  # the delays of kills "during" a call
    memory = ShardedMemory(cfg.memory, cfg.shards, num_writers=cfg.writers, snapshot_every=cfg.snapshot_every,
                           storage=tempfile.mkdtemp(prefix="distmem-soak-"),
                           heartbeat_timeout_s=cfg.heartbeat_timeout_s)
    reference = LocalMemory(cfg.memory, device="cpu")
    actor = ray.remote(SoakWriter).options(num_cpus=0)
    writers = [actor.remote(cfg, memory.name, rank) for rank in range(cfg.writers)]
    redone, checks, mismatch = 0, 0, None

    def inject(kill: Kill) -> None:
        if kill.kind == "shard":
            ray.kill(memory.shards[kill.target], no_restart=False)
        elif kill.kind == "coordinator":
            ray.kill(memory._coordinator, no_restart=False)
        else:
            ray.kill(writers[kill.target], no_restart=True)

    def soon(kill: Kill | None, moment: str) -> None:
        if kill is not None and kill.moment == moment:
            time.sleep(rng.uniform(0, 0.02))
            inject(kill)

    start = seconds = 0.0
    try:
        for step in range(cfg.steps):
            if step == 1:
                start = time.perf_counter()
            kill, t0 = kills.get(step), time.perf_counter()
            if kill is not None and kill.moment == "between-steps":
                inject(kill)
            while True:
                reads = [w.read.remote(step) for w in writers]
                soon(kill, "during-read")
                ray.get(reads)
                dead = None
                if kill is not None and kill.moment == "after-read":
                    inject(kill)
                    dead = kill.target  # sent nothing more: ray.kill is asynchronous
                writes = [None if rank == dead else w.write.remote() for rank, w in enumerate(writers)]
                soon(kill, "during-write")
                outcomes = [_outcome(ref) for ref in writes]
                for rank, outcome in enumerate(outcomes):
                    if outcome == "killed":  # a new writer takes the rank
                        writers[rank] = actor.remote(cfg, memory.name, rank)
                kill = None
                if all(o == "ok" for o in outcomes) or memory.position()[0] == step + 1:
                    break  # (a killed writer's request was in: the step applied all the same)
                redone += 1
            if step in kills:
                kills[step].recovery_s = time.perf_counter() - t0
            queries, labels = zip(*(batch(cfg, step, rank) for rank in range(cfg.writers)))
            reference.step(torch.cat(queries), torch.cat(labels))
            if (step + 1) % cfg.check_every == 0 or step + 1 == cfg.steps:
                checks += 1
                if not states_equal(memory.state(), reference.state()):
                    mismatch = step
                    break
            if progress is not None:
                progress(step + 1)
        seconds = time.perf_counter() - start if start else 0.0
    finally:
        memory.shutdown()
        for w in writers:
            ray.kill(w)
    return SoakReport(steps=step + 1, kills=list(kills.values()), seconds=seconds, redone_steps=redone,
                      checks=checks, equal=mismatch is None, mismatch=mismatch)


def _outcome(write: ray.ObjectRef | None) -> str:
    """How a writer's write call ended: "ok"; "killed" (its process died, or it was killed before
    the call: None); "ended" (another writer died before writing, so the step was ended for all)."""
    if write is None:
        return "killed"
    try:
        ray.get(write)
    except ray.exceptions.RayActorError:
        return "killed"
    except RuntimeError as err:
        if "stopped" not in str(err):
            raise
        return "ended"
    return "ok"
