"""The distributed layer: the only part of distmem that imports Ray."""

from distmem.distributed.memory import Coordinator, ShardActor, ShardedMemory, shard_ranges

__all__ = ["Coordinator", "ShardActor", "ShardedMemory", "shard_ranges"]
