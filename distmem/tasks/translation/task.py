"""Translation as a `distmem.training.Task`: the GNMT-style model with or without memory, fed by
the prepared Parquet shards (Ray Data under Ray), with a dev BLEU curve."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from distmem.memory import Memory
from distmem.models.seq2seq import Seq2Seq
from distmem.tasks.translation.config import TranslationRunConfig
from distmem.tasks.translation.evaluation import bleu
from distmem.tasks.translation.prepare import Prepared, read_lines
from distmem.tasks.translation.training import TranslationBatch, Translator, bucket_batches, train_step
from distmem.training import MemorySpec, ParquetSource, Schedule


class TranslationTask:
    """cfg: the run config; prepared: its prepared training data; use_memory: with the memory or not."""

    def __init__(self, cfg: TranslationRunConfig, prepared: Prepared, use_memory: bool) -> None:
        self.config, self.use_memory = cfg, use_memory
        self.files = tuple(str(f) for f in prepared.files)
        self.spm_model = str(prepared.spm_model)
        self.name = f"translation-{'memory' if use_memory else 'baseline'}"
        dev = cfg.dev_set()
        self.dev_src = list(read_lines(dev.src))[: cfg.dev_sentences]
        self.dev_ref = list(read_lines(dev.ref))[: cfg.dev_sentences]
        self._memory: Memory | None = None  # the training memory, read (never written) by the dev curve

    def schedule(self) -> Schedule:
        c = self.config
        return Schedule(steps=c.steps, workers=c.workers, cpus_per_worker=c.cpus_per_worker, log_every=c.log_every,
                        eval_every=c.eval_every if c.dev_sentences else 0, checkpoint_every=c.checkpoint_every,
                        seed=c.seed)

    def memory_spec(self) -> MemorySpec | None:
        if not self.use_memory:
            return None
        return MemorySpec(self.config.memory_config(), shared=True, shards=self.config.shards,
                          backend=self.config.backend)

    def data(self) -> ParquetSource:
        return ParquetSource(self.files, rows_per_step=self.config.batch_pairs, columns=("src", "tgt"),
                             steps_per_window=self.config.bucket_window)

    def build(self) -> tuple[Seq2Seq, torch.optim.Optimizer]:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        torch.manual_seed(self.config.seed)
        model = Seq2Seq(self.config.model_config(self.use_memory))
        return model, torch.optim.Adam(model.parameters(), lr=self.config.lr)

    def batches(self, rank: int, world: int, start: int, rows=None) -> Iterator[TranslationBatch]:
        return bucket_batches(rows, self.config.batch_pairs, self.config.bucket_window, self.config.seed, rank, start)

    def train_step(self, model: torch.nn.Module, memory: Memory | None, batch: TranslationBatch,
                   optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        self._memory = memory
        c = self.config
        return train_step(model, memory, batch, optimizer, c.lr_at(step), c.label_smoothing, c.clip_norm)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Dev BLEU of greedy translations of the first dev_sentences (the memory read, not written)."""
        net = getattr(model, "module", model)  # DDP's wrapped model
        was_training = net.training
        translator = Translator(net, self.spm_model, self._memory if self.use_memory else None)
        hyps = translator.translate(self.dev_src, greedy=True)
        net.train(was_training)
        return {"dev_bleu": bleu(hyps, self.dev_ref)["bleu"]}

    def summary(self) -> dict[str, Any]:
        return {}
