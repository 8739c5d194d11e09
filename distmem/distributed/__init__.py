"""The distributed layer: the only part of distmem that imports Ray, and it knows no task.

cluster: joining a cluster or an embedded local Ray, shard placement. memory: `ShardedMemory`
(shard actors, coordinator). trainer: `fit(task, store)`, the Ray Train trainer of every task.
parallel: `map_tasks`, independent work (an evaluation's parts) as Ray tasks.
ray_compat: the Ray internals this relies on.
"""

from typing import Any

from distmem.distributed.cluster import connect
from distmem.distributed.memory import Coordinator, ShardActor, ShardedMemory, shard_ranges
from distmem.distributed.parallel import map_tasks

__all__ = ["Coordinator", "ShardActor", "ShardedMemory", "connect", "fit", "map_tasks", "shard_ranges"]


def __getattr__(name: str) -> Any:
    # `fit` on first use: Ray Train and Ray Data take about a second to import, which every shard
    # and coordinator process (they import this package) would otherwise pay at its start
    if name == "fit":
        from distmem.distributed.trainer import fit  # noqa: PLC0415
        return fit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
