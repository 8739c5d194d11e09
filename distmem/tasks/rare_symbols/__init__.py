"""The rare-symbol task (`shared/docs/rare-symbol-task.md`): everything the task owns.

data: the seeded task, its life-long training stream and the test stream. training: one step
of a sequence-to-sequence model. protocol: the test protocol. config: the run config and
presets. task: the `distmem.training.Task` the trainer runs (one model, with or without memory).
"""

from distmem.tasks.rare_symbols.config import PRESETS, RareSymbolRunConfig
from distmem.tasks.rare_symbols.task import RareSymbolsTask

__all__ = ["PRESETS", "RareSymbolRunConfig", "RareSymbolsTask"]
