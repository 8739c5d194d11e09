"""Translation with memory (shared/docs/translation-task.md): data preparation so far."""

from distmem.tasks.translation.prepare import DataError, Prepared, PrepareSettings, load_prepared, prepare, read_lines

__all__ = ["DataError", "PrepareSettings", "Prepared", "load_prepared", "prepare", "read_lines"]
