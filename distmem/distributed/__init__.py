"""The distributed layer: the only part of distmem that imports Ray, and it knows no task.

cluster: joining a cluster or an embedded local Ray, shard placement. memory: `ShardedMemory`
(shard actors, coordinator). trainer: `fit(task, store)`, the Ray Train trainer of every task.
ray_compat: the Ray internals this relies on.
"""

from distmem.distributed.cluster import connect
from distmem.distributed.memory import Coordinator, ShardActor, ShardedMemory, shard_ranges
from distmem.distributed.trainer import fit

__all__ = ["Coordinator", "ShardActor", "ShardedMemory", "connect", "fit", "shard_ranges"]
