"""Omniglot one-shot classification (the paper's Section 4.2): everything the task owns.

data: the zips, decoded and cached; splits. training: episode batches and one update.
evaluation: the released one-shot protocol. config: the run config and presets. task: the
`distmem.training.Task` the trainer runs. classify: one-shot classification from a checkpoint.
"""

from distmem.tasks.omniglot.classify import OneShotClassifier
from distmem.tasks.omniglot.config import PRESETS, OmniglotRunConfig
from distmem.tasks.omniglot.task import OmniglotTask

__all__ = ["PRESETS", "OmniglotRunConfig", "OmniglotTask", "OneShotClassifier"]
