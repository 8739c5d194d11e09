"""The Neural GPU's algorithmic tasks (badd, bmul, rev, copy, sort): everything the task owns.

data: seeded instances, their plain text form and the length curriculum. config: the run config
and presets. task: the `distmem.training.Task` the trainer runs, and the sequence accuracy.
"""

from distmem.tasks.algorithmic.config import PRESETS, AlgorithmicRunConfig
from distmem.tasks.algorithmic.task import AlgorithmicTask, sequence_accuracy

__all__ = ["PRESETS", "AlgorithmicRunConfig", "AlgorithmicTask", "sequence_accuracy"]
