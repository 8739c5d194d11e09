"""`ShardedMemory`: one memory partitioned over Ray actors.

- Shard actors (`ShardActor`) are thin shells over `MemoryShard`, one contiguous slot range each,
  on GPUs where the cluster has them (one each, or an equal share of one: `gpu_share`). They
  restart after a crash (`max_restarts`) from their snapshot plus write log, and calls to them
  are retried (`max_task_retries`).
- Readers call every shard at once and merge on the caller (`distmem.merge.read`).
- A step's writes go through a named coordinator actor, which waits for all `num_writers` writers,
  concatenates their batches in rank order, takes the globally oldest slots from the shards'
  offers, plans the update and has every shard apply its part. A writer's `write` returns once the
  whole step is applied, so its next read sees every write of earlier steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tempfile
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Iterator, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy
from torch import Tensor

from distmem import merge, storage
from distmem.backends import BACKENDS, import_faiss
from distmem.config import MemoryConfig
from distmem.distributed.cluster import NAMESPACE, connect, gpu_share, spread_shards
from distmem.memory import MemoryBase
from distmem.merge import MemoryRead, WriteRequest
from distmem.rules import RecentSlots, ShardWrite
from distmem.runs import RunStore
from distmem.shard import MemoryShard
from distmem.validation import check_state


def _wire(obj: Any) -> Any:
    """Tensors -> numpy for a hot-path Ray message (Ray deserialises numpy without a copy)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _wire(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_wire(v) for v in obj)
    if isinstance(obj, (ShardWrite, WriteRequest)):
        return type(obj)(**_wire(vars(obj)))
    return obj


def _unwire(obj: Any) -> Any:
    """The inverse of `_wire`: numpy -> (read-only, never written) tensors."""
    if isinstance(obj, np.ndarray):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _unwire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwire(v) for v in obj)
    if isinstance(obj, (ShardWrite, WriteRequest)):
        return type(obj)(**_unwire(vars(obj)))
    return obj


@contextlib.contextmanager
def _local_copy(path: str, lo: int | None = None, hi: int | None = None) -> Iterator[str]:
    """A local path of a memory file or checkpoint folder: itself, or a temporary download of a
    URI. Of a checkpoint folder only the manifest comes down, plus the parts that overlap slots
    [lo, hi) when a range is given: a shard fetches its own slots, the driver only the config."""
    if "://" not in path:
        yield path
        return
    parent, _, name = path.rstrip("/").rpartition("/")
    folder = RunStore(path)
    with tempfile.TemporaryDirectory() as tmp:
        if not folder.exists(storage.MANIFEST):  # a single memory file
            yield str(RunStore(parent).download(name, Path(tmp) / name))
            return
        local = Path(tmp) / name
        folder.download(storage.MANIFEST, local / storage.MANIFEST)
        if lo is not None:
            for file, p_lo, p_hi in storage.read_manifest(local)[1]:  # names checked: files inside the folder
                if p_lo < hi and p_hi > lo:
                    folder.download(file.name, local / file.name)
        yield str(local)


def _new_generation() -> int:
    return random.getrandbits(62)


def shard_ranges(size: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous slot ranges [lo, hi) of near-equal size, in slot order."""
    bounds = [size * i // num_shards for i in range(num_shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class ShardActor:
    """Ray shell over `MemoryShard` (tensors in and out on the CPU)."""

    def __init__(self, config: MemoryConfig, lo: int, hi: int, backend: str, device: str,
                 storage_dir: str, snapshot_every: int, threads: int) -> None:
        torch.set_num_threads(threads)
        if backend in ("faiss", "ivf"):
            import_faiss().omp_set_num_threads(threads)
        self.shard = MemoryShard(config, lo, hi, backend=backend, device=device,
                                 storage_dir=storage_dir, snapshot_every=snapshot_every)
        self._staged: dict[str, Tensor] | None = None  # a checked part of a load, until every shard has its own
        self._last_plan: tuple[int, list[ShardWrite]] | None = None  # (step, every shard's part) last applied

    # hot path: numpy over the wire
    def search(self, queries: np.ndarray, labels: np.ndarray | None, k: int | None = None) -> dict[str, np.ndarray]:
        return _wire(self.shard.search(_unwire(queries), _unwire(labels), k))

    def weighted_keys(self, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return _wire(self.shard.weighted_keys(_unwire(ids), _unwire(weights)))

    def oldest(self, step: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        return _wire(self.shard.oldest(step, count))

    def apply(self, step: int, plan: list[ShardWrite], index: int) -> bool:
        """Apply this shard's part `plan[index]` of update `step` (a retried call is skipped). The
        whole plan is kept until the next step: if the coordinator dies while the shards apply
        it, the shards still behind get their parts from here (`Coordinator.resync`)."""
        applied = self.shard.apply(step, _unwire(plan[index]))
        self._last_plan = (step, plan)
        return applied

    def plan_of(self, step: int) -> list[ShardWrite] | None:
        """The whole plan of update `step` if this shard applied it (and has not restarted since)."""
        return self._last_plan[1] if self._last_plan is not None and self._last_plan[0] == step else None

    def step(self) -> int:
        return self.shard.step

    def position(self) -> tuple[int, int]:
        """(step, generation): where a read made now stands."""
        return self.shard.step, self.shard.generation

    def state(self) -> dict[str, Tensor]:
        return self.shard.state()

    def load_state(self, state: dict[str, Tensor], generation: int) -> None:
        self.shard.load_state(state, copy=False)  # a deserialised copy that only this call holds
        self.shard.set_generation(generation)

    def stage_range(self, path: str) -> None:
        """Read and check this shard's slots of a memory file or checkpoint; nothing changes yet."""
        self._staged = None
        with _local_copy(path, self.shard.lo, self.shard.hi) as local:
            state = storage.read_range(local, self.shard.lo, self.shard.hi)[1]
        self._staged = check_state(state, self.shard.n, self.shard.config.key_dim, lo=self.shard.lo)

    def commit_staged(self, generation: int) -> None:
        if self._staged is None:
            raise RuntimeError("load: nothing staged on this shard (it restarted during the load); load again")
        state, self._staged = self._staged, None
        self.shard.load_state(state, copy=False)
        self.shard.set_generation(generation)

    def drop_staged(self) -> None:
        self._staged = None

    def save_part(self, folder: str, name: str) -> tuple[int, int, int]:
        """Write this shard's part into `folder` (a local folder or a URI: written here, then uploaded)."""
        if "://" not in folder:
            storage.write_memory_file(Path(folder) / name, self.shard.config, self.shard.state(), lo=self.shard.lo)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                storage.write_memory_file(Path(tmp) / name, self.shard.config, self.shard.state(), lo=self.shard.lo)
                RunStore(folder).upload(Path(tmp) / name, name)
        return self.shard.lo, self.shard.hi, self.shard.step

    def clear(self, generation: int) -> None:
        self.shard.clear()
        self.shard.set_generation(generation)

    def info(self) -> dict[str, Any]:
        return {"lo": self.shard.lo, "hi": self.shard.hi, "step": self.shard.step, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id(), "device": str(self.shard.device),
                "backend": self.shard.backend.stats()}


class _Barrier:
    """One step's rendezvous: the writers' requests by rank, and how it ended."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[str, WriteRequest]] = {}  # rank -> (writer id, request)
        self.done = asyncio.Event()
        self.error: BaseException | None = None


class Coordinator:
    """Async Ray actor: the memory's name, its shards, and the step barrier of the writers.

    It holds nothing that the shards do not: after a crash Ray restarts it, it takes the step from
    the shards (finishing a step that some shards applied before the crash), and writers whose
    call was lost ask where the memory stands and send their request again (`ShardedMemory.write`).
    """

    def __init__(self, config: MemoryConfig, shard_names: list[str], ranges: list[tuple[int, int]], num_writers: int,
                 write_timeout_s: float, heartbeat_timeout_s: float) -> None:
        # the shards by name, not by handle: a restart needs only these plain arguments (Ray keeps
        # handles passed to a constructor in the object store, lost with the creating process)
        self.shards = [ray.get_actor(shard, namespace=NAMESPACE) for shard in shard_names]
        self.config, self.ranges = config, ranges
        self.num_writers, self.write_timeout_s = num_writers, write_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.step: int | None = None  # taken from the shards on first use (also after a restart)
        self.generation: int | None = None  # changed by every clear / load (see MemoryShard.set_generation)
        self.barrier = _Barrier()
        self.superseded: set[str] = set()
        self.last_seen: dict[int, float] = {}  # rank -> time of its writer's last heartbeat or write
        self.lock = asyncio.Lock()  # one step's update, or one resync, at a time

    def heartbeat(self, rank: int) -> None:
        """A writer of `rank` is alive (its handle calls this every heartbeat_timeout_s / 4)."""
        self.last_seen[rank] = time.monotonic()

    async def resync(self) -> tuple[int, int]:
        """Take (step, generation) from the shards (after a restart, a load or a clear). If this
        actor died while the shards applied a step, the shards still behind apply their parts of
        it from the plan that those ahead kept."""
        async with self.lock:
            positions = await asyncio.gather(*[s.position.remote() for s in self.shards])
            steps, generations = sorted({p[0] for p in positions}), {p[1] for p in positions}
            if len(generations) == 1 and len(steps) == 2 and steps[1] == steps[0] + 1:
                ahead = [s for s, p in zip(self.shards, positions) if p[0] == steps[1]]
                plans = [p for p in await asyncio.gather(*[s.plan_of.remote(steps[0]) for s in ahead]) if p]
                if plans:
                    await asyncio.gather(*[s.apply.remote(steps[0], plans[0], i) for i, (s, p)
                                           in enumerate(zip(self.shards, positions)) if p[0] == steps[0]])
                    positions = await asyncio.gather(*[s.position.remote() for s in self.shards])
            if len(set(positions)) != 1:
                raise RuntimeError(f"shards disagree on (step, generation): {sorted(set(positions))}; the shards "
                                   "that applied the last step restarted since, so its plan is lost: load the last "
                                   "checkpoint")
            self.step, self.generation = positions[0]
            return self.step, self.generation

    def info(self) -> dict[str, Any]:
        return {"config": self.config, "shards": self.shards, "ranges": self.ranges,
                "num_writers": self.num_writers, "step": self.step, "heartbeat_timeout_s": self.heartbeat_timeout_s,
                "waiting": {rank: writer for rank, (writer, _) in sorted(self.barrier.pending.items())}}

    async def write(self, step: int, rank: int, request: WriteRequest, writer: str = "", generation: int = 0) -> int:
        """Wait for every writer's request of `step`, then apply the step. Returns the new step.

        writer: the id of the writing process's handle. A request from a new handle for a rank
        that already wrote in this step replaces the old one (the old writer was restarted, e.g.
        by Ray Train after its node was lost); the old writer, if still waiting, gets an error.
        A writer that stops (no heartbeat for heartbeat_timeout_s) before writing ends the step
        for all: nothing of it is applied and the waiting writers get an error naming its rank.
        """
        if self.step is None:
            await self.resync()
        async with self.lock:  # a step being applied (or a resync) first settles self.step
            pass
        if generation != self.generation:
            raise ValueError("read is stale: the memory was cleared or loaded since it was made; read again")
        if step != self.step:
            raise ValueError(f"read is stale: it was made at step {step}, the memory is at step {self.step}; "
                             "read again")
        barrier = self.barrier
        if not 0 <= rank < self.num_writers or barrier.pending.get(rank, ("",))[0] == writer:
            raise ValueError(f"rank: expected a writer rank in [0, {self.num_writers}) not yet written "
                             f"in step {step}, got {rank}")
        self.last_seen[rank] = time.monotonic()
        if rank in barrier.pending:
            self.superseded.add(barrier.pending[rank][0])
        barrier.pending[rank] = (writer, request)
        if len(barrier.pending) < self.num_writers:
            await self._wait(barrier, step)
            if writer in self.superseded:
                raise RuntimeError(f"step {step}: this write of rank {rank} was replaced by a newer writer of "
                                   "the same rank and not applied")
            return step + 1
        self.barrier = _Barrier()
        try:
            await self._apply(step, [barrier.pending[r][1] for r in range(self.num_writers)])
        except BaseException as err:  # every writer of this step hears of it
            barrier.error = err
            raise
        finally:
            barrier.done.set()
        return self.step

    async def _wait(self, barrier: _Barrier, step: int) -> None:
        """Until `barrier` is done; ends it for every writer when a missing writer stopped or the
        write timeout passed."""
        start = time.monotonic()
        while not barrier.done.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(barrier.done.wait(), min(1.0, self.heartbeat_timeout_s / 4))
            if barrier.done.is_set():
                break
            now, missing = time.monotonic(), sorted(set(range(self.num_writers)) - set(barrier.pending))
            stopped = [r for r in missing if now - self.last_seen.get(r, now) > self.heartbeat_timeout_s]
            if stopped:
                self._end(barrier, RuntimeError(
                    f"step {step}: the writer of rank {', '.join(map(str, stopped))} stopped (no heartbeat for "
                    f"{self.heartbeat_timeout_s:g} s) before writing; nothing of this step was applied. Restart "
                    "that writer (Ray Train restarts its worker group) and write the step again"))
            elif now - start > self.write_timeout_s:
                self._end(barrier, TimeoutError(f"step {step}: writers {missing} did not write within "
                                                f"{self.write_timeout_s:g} s; nothing of this step was applied"))
        if barrier.error is not None:
            raise barrier.error

    def _end(self, barrier: _Barrier, error: BaseException) -> None:
        """End a step that cannot complete: its requests are dropped, its waiting writers get `error`."""
        if self.barrier is barrier:
            self.barrier = _Barrier()
        barrier.error = error
        barrier.done.set()

    async def _apply(self, step: int, requests: list[WriteRequest]) -> None:
        """Plan step `step` from every writer's request and have every shard apply its part. Each
        shard gets (a reference to) the whole plan and keeps it, so a crash of this actor between
        the shards' applies never leaves the step half-applied: `resync` finishes it."""
        async with self.lock:
            total = sum(len(r.labels) for r in requests)
            if total > self.config.size:
                raise ValueError(f"the writers' batches hold {total} examples but the memory has "
                                 f"{self.config.size} slots")
            offers = _unwire(await asyncio.gather(*[s.oldest.remote(step, total) for s in self.shards]))
            oldest = merge.merge_oldest(offers, total)
            plan = ray.put([_wire(w) for w in merge.plan_step(step, [_unwire(r) for r in requests], oldest,
                                                              self.ranges)])
            await asyncio.gather(*[s.apply.remote(step, plan, i) for i, s in enumerate(self.shards)])
            self.step = step + 1


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in a message (a tensor, a dict or dataclass of them, or a list)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return _nbytes(vars(obj))
    return 0


def _heartbeats(coordinator: Any, rank: int, every_s: float, stop: threading.Event) -> None:
    """A writer's heartbeat thread. It holds no reference to the handle, so dropping the handle stops it."""
    while ray.is_initialized():
        with contextlib.suppress(Exception):  # the coordinator restarts: it hears from us at the next beat
            ray.get(coordinator.heartbeat.remote(rank), timeout=2 * every_s)
        if stop.wait(every_s):
            return


class ShardedMemory(MemoryBase):
    """The same interface and semantics as `LocalMemory`, with the slots on `num_shards` Ray actors.

    Create it once (rank 0 of a job, or a driver), then attach from other writer processes with
    `ShardedMemory.attach(name, rank)`. Every attached writer writes once per step.

    backend: "torch" | "faiss" (exact) | "ivf" (approximate) per shard. name: the memory's name in
    the cluster (default: a fresh one). num_writers: writers per step. storage: folder for the
    shards' snapshots and write logs (default: a new temporary folder; on a multi-node cluster use
    one every node reaches).
    address: a Ray cluster to join; None starts (or reuses) a local Ray on 127.0.0.1.
    write_timeout_s: how long writers wait for the others at a step. heartbeat_timeout_s: a writer
    that has read or written and then sends no heartbeat for this long (its process died) ends the
    step it did not write: the waiting writers get an error naming its rank.
    """

    def __init__(self, config: MemoryConfig, num_shards: int, backend: str = "torch", *, name: str | None = None,
                 num_writers: int = 1, storage: str | PathLike | None = None, snapshot_every: int = 100,
                 address: str | None = None, write_timeout_s: float = 600.0, heartbeat_timeout_s: float = 10.0,
                 detached: bool = False) -> None:
        if not isinstance(config, MemoryConfig):
            raise TypeError(f"config must be a MemoryConfig, got {type(config).__name__}")
        if isinstance(num_shards, bool) or not isinstance(num_shards, int) or not 1 <= num_shards <= config.size:
            raise ValueError(f"num_shards must be an int in [1, size={config.size}], got {num_shards!r}")
        if isinstance(num_writers, bool) or not isinstance(num_writers, int) or num_writers < 1:
            raise ValueError(f"num_writers must be an int >= 1, got {num_writers!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for arg, value in (("write_timeout_s", write_timeout_s), ("heartbeat_timeout_s", heartbeat_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{arg} must be a number of seconds > 0, got {value!r}")
        connect(address)
        name = name or f"memory-{os.getpid()}-{id(self):x}"
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            pass
        else:
            raise ValueError(f"name: a memory called {name!r} already exists; attach to it with "
                             f"ShardedMemory.attach({name!r}, rank) or pick another name")
        root = Path(storage) if storage is not None else Path(tempfile.mkdtemp(prefix=f"distmem-{name}-"))
        gpu = gpu_share(ray.cluster_resources().get("GPU", 0), num_shards)
        threads = max(1, (os.cpu_count() or 1) // num_shards)
        lifetime = {"lifetime": "detached"} if detached else {}
        ranges = shard_ranges(config.size, num_shards)
        # Shards spread over the nodes through a SPREAD placement group: one bundle per shard that
        # reserves its key memory (and its GPU share where there are GPUs). When a node is lost, Ray
        # reschedules its bundles on the other nodes and the shards restart there from their
        # snapshots and logs. (Soft node affinity was tried first: it put both shards of a
        # submitted job on one node in 2 of 3 runs.) The coordinator stays on this node (a
        # submitted job's driver runs on the head), so losing a worker node costs only shards.
        self._placement_group = spread_shards(config, ranges, gpu, detached)
        actor = ray.remote(ShardActor)
        shard_names = [f"{name}.shard-{i}" for i in range(num_shards)]
        shards = [actor.options(num_cpus=0, num_gpus=gpu, max_restarts=-1, max_task_retries=-1,
                                name=shard_names[i], namespace=NAMESPACE, **lifetime,
                                scheduling_strategy=PlacementGroupSchedulingStrategy(
                                    self._placement_group, placement_group_bundle_index=i))
                  .remote(config, lo, hi, backend, "cuda" if gpu else "cpu",
                          str(root / f"shard-{i:04d}"), snapshot_every, threads)
                  for i, (lo, hi) in enumerate(ranges)]
        # the coordinator's process starts beside the shards' (a named actor is registered when
        # `.remote()` returns, so it finds them by name): each start imports torch, seconds apiece
        coordinator = ray.remote(Coordinator).options(
            name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=-1, max_concurrency=1000, **lifetime,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        ).remote(config, shard_names, ranges, num_writers, write_timeout_s, heartbeat_timeout_s)
        try:
            ray.get([s.step.remote() for s in shards])  # surface construction errors here
        except BaseException:
            ray.kill(coordinator, no_restart=True)
            raise
        ray.get(coordinator.resync.remote())
        self._connect(name, coordinator, rank=0)
        self._owned = shards  # the creator's handles keep the (non-detached) shards alive
        self.storage = root

    @classmethod
    def attach(cls, name: str, rank: int, address: str | None = None) -> ShardedMemory:
        """Join the memory called `name` as writer `rank` (0 <= rank < num_writers)."""
        connect(address)
        try:
            coordinator = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            raise ValueError(f"name: no memory called {name!r} exists in this Ray cluster") from None
        memory = cls.__new__(cls)
        memory._connect(name, coordinator, rank)
        memory.storage = None
        memory._placement_group = None  # owned by the creating process
        return memory

    def _connect(self, name: str, coordinator: Any, rank: int) -> None:
        info = ray.get(coordinator.info.remote())
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < info["num_writers"]:
            raise ValueError(f"rank must be an int in [0, {info['num_writers']}), got {rank!r}")
        self.name, self.rank, self._coordinator = name, rank, coordinator
        self._writer = uuid.uuid4().hex
        self.config: MemoryConfig = info["config"]
        self.shards: list = info["shards"]
        self.ranges: list[tuple[int, int]] = info["ranges"]
        self.num_writers: int = info["num_writers"]
        self.traffic: dict[str, int] = {"read_bytes": 0, "write_bytes": 0}  # tensor bytes of the last read / write
        self._heartbeat_s: float = info["heartbeat_timeout_s"] / 4
        self._heartbeat: threading.Event | None = None  # set: stop beating

    def _beat(self) -> None:
        """From the first read or write on, tell the coordinator every heartbeat_timeout_s / 4 that
        this writer is alive (until the handle is dropped or shut down)."""
        if self._heartbeat is not None:
            return
        self._heartbeat = stop = threading.Event()
        weakref.finalize(self, stop.set)
        threading.Thread(target=_heartbeats, args=(self._coordinator, self.rank, self._heartbeat_s, stop),
                         name=f"distmem-heartbeat-{self.name}-{self.rank}", daemon=True).start()

    # -- read / write ----------------------------------------------------------------------------
    def read(self, q: Tensor, labels: Tensor | None = None, k: int | None = None) -> MemoryRead:
        """As `LocalMemory.read`: one call per shard, issued to all shards at once."""
        replies: list[dict[str, Tensor]] = []

        def search(queries: Tensor, labels_: Tensor | None, k_: int) -> list[dict[str, Tensor]]:
            q_ref, y_ref = ray.put(_wire(queries)), ray.put(_wire(labels_))
            replies.extend(_unwire(ray.get([s.search.remote(q_ref, y_ref, k_) for s in self.shards])))
            self.traffic["read_bytes"] = len(self.shards) * _nbytes([queries, labels_]) + _nbytes(replies)
            return replies

        def weighted_keys(ids: Tensor, weights: Tensor) -> Tensor:
            ids_ref, w_ref = ray.put(_wire(ids)), ray.put(_wire(weights))
            parts = _unwire(ray.get([s.weighted_keys.remote(ids_ref, w_ref) for s in self.shards]))
            self.traffic["read_bytes"] += len(self.shards) * _nbytes([ids, weights]) + _nbytes(parts)
            return torch.stack(parts).sum(0)

        self._beat()
        result = merge.read(self.config, q, labels, search, weighted_keys, version=None, k=k)
        positions = {(int(r["step"]), int(r["generation"])) for r in replies}
        if len(positions) != 1:  # a management call (load, clear) ran during the read
            raise RuntimeError(f"shards answered from different (step, generation) {sorted(positions)}; read again")
        step, generation = positions.pop()
        result.version = (self.name, generation, step)
        return result

    def write(self, read: MemoryRead, labels: Tensor | None = None) -> None:
        """Contribute this writer's batch to the current step; returns when the step is applied."""
        request = merge.write_request(self.config, read, labels)
        if len(read.version) != 3 or read.version[0] != self.name:
            raise ValueError(f"read is stale: it was not made by memory {self.name!r}; read again")
        _, generation, step = read.version
        # to the coordinator, then about as much again on to the shards
        self.traffic["write_bytes"] = 2 * _nbytes(request)
        self._beat()
        request = _wire(request)
        while True:
            try:
                ray.get(self._coordinator.write.remote(step, self.rank, request, self._writer, generation))
                return
            except ray.exceptions.RayTaskError as err:  # the coordinator's own message, without Ray's wrapping
                raise err.cause from None
            except ray.exceptions.RayActorError:  # the coordinator died with the request: was the step applied?
                position = self.position()
            if position == (step + 1, generation):
                return  # before the coordinator died (a step applies only once every rank's request is in)
            if position != (step, generation):
                raise RuntimeError(f"the coordinator restarted and the memory is at (step, generation) {position}, "
                                   f"not {(step, generation)} or the step after; read again")

    def position(self, timeout_s: float = 120.0) -> tuple[int, int]:
        """(step, generation) of the memory, from the coordinator (waiting up to `timeout_s` while
        it restarts; it first finishes a step that some shards applied before it died)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return tuple(ray.get(self._coordinator.resync.remote()))
            except ray.exceptions.RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    # -- state -----------------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        return int(ray.get(self.shards[0].step.remote()))

    def state(self) -> dict[str, Tensor]:
        """The whole memory on this process's CPU, as `LocalMemory.state()`."""
        parts = ray.get([s.state.remote() for s in self.shards])
        steps = {int(p["step"]) for p in parts}
        if len(steps) != 1:
            raise RuntimeError(f"shards are at different steps {sorted(steps)}; call state() between steps")
        out = {name: torch.cat([p[name] for p in parts]) for name in ("keys", "values", "ages")}
        out["step"] = parts[0]["step"]
        recent = RecentSlots()  # the global R: each label's newest entry over all shards
        recent.update(*(torch.cat([p[name] for p in parts]) for name in ("recent_labels", "recent_slots",
                                                                          "recent_seqs")))
        return {**out, **recent.state()}

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Replace the whole state (as `state()` returns). Checked whole before any shard changes."""
        checked = check_state(state, self.config.size, self.config.key_dim)  # fills the default recent order
        parts = [{**storage.slice_state(checked, slice(lo, hi), lo, hi), "step": checked["step"]}
                 for lo, hi in self.ranges]
        generation = _new_generation()
        ray.get([shard.load_state.remote(part, generation) for shard, part in zip(self.shards, parts)])
        ray.get(self._coordinator.resync.remote())

    def clear(self) -> None:
        """Empty every slot of every shard."""
        generation = _new_generation()
        ray.get([s.clear.remote(generation) for s in self.shards])
        ray.get(self._coordinator.resync.remote())

    def save(self, path: str | PathLike) -> None:
        """A consistent checkpoint of all shards at one step: a folder with one part per shard and
        a manifest. Loads into a memory with any number of shards (or a `LocalMemory`).

        path: a local folder (every shard's node must reach it) or a pyarrow.fs URI (s3://, gs://):
        each shard writes its own part; nothing passes through this process."""
        remote = "://" in str(path)
        folder = str(path) if remote else str(Path(path).resolve())
        if not remote:
            Path(folder).mkdir(parents=True, exist_ok=True)
        files = [f"part-{i:04d}-of-{len(self.shards):04d}.arrow" for i in range(len(self.shards))]
        done = ray.get([s.save_part.remote(folder, f) for s, f in zip(self.shards, files)])
        steps = {step for _, _, step in done}
        if len(steps) != 1:
            raise RuntimeError(f"shards saved different steps {sorted(steps)}; save between steps")
        parts = [(f, lo, hi) for f, (lo, hi, _) in zip(files, done)]
        if not remote:
            storage.write_manifest(folder, self.config, steps.pop(), parts)
            return
        with tempfile.TemporaryDirectory() as tmp:
            storage.write_manifest(tmp, self.config, steps.pop(), parts)
            RunStore(folder).upload(Path(tmp) / storage.MANIFEST, storage.MANIFEST)

    def load(self, path: str | PathLike) -> None:
        """Load a checkpoint folder or memory file (local, or a URI) of a memory of the same size
        (any shard count). From a URI, this process reads only the manifest and each shard only
        the parts that overlap its slots. A damaged file changes no shard."""
        with _local_copy(str(path)) as local:
            storage.read_config_for(local, self.config)
        where = str(path) if "://" in str(path) else str(Path(path).resolve())
        try:  # every shard reads and checks its part first: a bad file changes no shard
            ray.get([s.stage_range.remote(where) for s in self.shards])
        except BaseException:
            ray.get([s.drop_staged.remote() for s in self.shards])
            raise
        generation = _new_generation()
        ray.get([s.commit_staged.remote(generation) for s in self.shards])
        ray.get(self._coordinator.resync.remote())

    def placement(self) -> list[dict[str, Any]]:
        """Per shard: its slot range, step, process id, Ray node id, device and backend stats."""
        return ray.get([s.info.remote() for s in self.shards])

    def shutdown(self) -> None:
        """Kill the shard and coordinator actors and free their placement (the storage folder stays)."""
        if self._heartbeat is not None:
            self._heartbeat.set()
        for actor in [*self.shards, self._coordinator]:
            ray.kill(actor, no_restart=True)
        if self._placement_group is not None:
            remove_placement_group(self._placement_group)
            self._placement_group = None

    def __repr__(self) -> str:
        return (f"ShardedMemory(name={self.name!r}, size={self.config.size}, shards={len(self.shards)}, "
                f"writers={self.num_writers}, rank={self.rank})")
