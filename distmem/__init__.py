"""distmem: the life-long key-value memory of "Learning to Remember Rare Events", local or sharded.

Importing distmem starts no Ray and imports no faiss; those load when a memory needs them.
"""

from distmem.backends import BackendUnavailableError
from distmem.config import MemoryConfig
from distmem.layer import MemoryLayer
from distmem.memory import LocalMemory, Memory
from distmem.merge import MemoryRead

__all__ = ["BackendUnavailableError", "LocalMemory", "Memory", "MemoryConfig", "MemoryLayer", "MemoryRead",
           "ShardedMemory"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "ShardedMemory":  # the distributed layer imports Ray: load it on first use only
        from distmem.distributed import ShardedMemory
        return ShardedMemory
    raise AttributeError(f"module 'distmem' has no attribute {name!r}")
