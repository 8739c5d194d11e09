"""The distributed layer: the only part of distmem that imports Ray."""

from distmem.distributed.memory import Coordinator, ShardActor, ShardedMemory, connect, shard_ranges

__all__ = ["Coordinator", "ShardActor", "ShardedMemory", "connect", "shard_ranges"]
