"""distmem: the life-long key-value memory of "Learning to Remember Rare Events", local or sharded.

Importing distmem starts no Ray and imports no faiss; those load when a memory needs them.
"""

from distmem.backends import BackendUnavailableError
from distmem.config import MemoryConfig
from distmem.layer import MemoryLayer
from distmem.memory import LocalMemory, MemoryRead

__all__ = ["BackendUnavailableError", "LocalMemory", "MemoryConfig", "MemoryLayer", "MemoryRead"]
__version__ = "0.1.0"
