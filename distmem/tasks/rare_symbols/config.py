"""The rare-symbol run config and its presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from distmem.cli import check_fields, option
from distmem.config import MemoryConfig
from distmem.models.neural_gpu import NeuralGPU, NeuralGPUConfig
from distmem.models.seq2seq import MODEL_PRESETS, Seq2Seq, Seq2SeqConfig
from distmem.tasks.rare_symbols.data import RareSymbolTask


@dataclass(frozen=True)
class RareSymbolRunConfig:
    """Everything a rare-symbol run needs; saved with every checkpoint (config.json in the run folder)."""

    preset: str = option("default", "the preset this config started from")
    model: Literal["tiny", "small", "gnmt", "neural_gpu"] = option(
        "tiny", "the GNMT-style seq2seq's size (models.seq2seq.MODEL_PRESETS) or the Extended Neural GPU")
    nmaps: int = option(64, "neural_gpu: channels of the tape (also the memory's key size)")
    height: int = option(4, "neural_gpu: rows of the tape")
    gate_bias: float = option(1.0, "neural_gpu: initial bias of the CGRU gates (higher: the tape keeps more)")
    workers: int = option(2, "data-parallel trainers (Ray Train)")
    cpus_per_worker: int = option(0, "CPUs each trainer reserves (0: the cluster's CPUs / workers)")
    threads: int = option(0, "torch threads per trainer (0: its CPUs)")
    shards: int = option(2, "memory shards")
    steps: int = option(2000, "training steps (one batch per trainer each)")
    batch_size: int = option(16, "sequences per trainer per step")
    lr: float = option(3e-3, "Adam learning rate")
    clip_norm: float = option(5.0, "gradient-norm clipping")
    memory_size: int = option(65536, "memory slots")
    k: int = option(256, "nearest neighbours per query")
    age_noise: float = option(8.0, "half-width of the age noise of the memory's update")
    backend: Literal["torch", "faiss", "ivf"] = option("torch", "k-NN backend of the memory (ivf: approximate)")
    ivf_lists: int = option(0, "backend ivf: inverted lists per shard (0: about 4 sqrt(slots))")
    ivf_probe: int = option(32, "backend ivf: lists scanned per query")
    ivf_check_every: int = option(100, "backend ivf: searches between recall checks against the exact search")
    ivf_target_recall_at_1: float = option(0.0, "backend ivf: recall@1 target; each check sets nprobe to meet it "
                                                "(0: nprobe stays --ivf-probe)")
    ivf_target_recall_at_k: float = option(0.0, "backend ivf: recall@k target, likewise")
    gaps: tuple[int, ...] = option((1, 100, 1000, 5000), "test gaps between a context and its probe, in steps")
    symbols_per_gap: int = option(0, "rare test symbols per gap (0: all 2,048 split evenly)")
    log_every: int = option(100, "steps between points of the training curve")
    checkpoint_every: int = option(500, "steps between checkpoints")
    seed: int = option(0, "seed of the task, the streams, the initialisation and the memory")

    def __post_init__(self) -> None:
        check_fields(self, at_least_one=("workers", "shards", "steps", "batch_size", "memory_size", "k", "log_every",
                                         "checkpoint_every"),
                     non_negative=("cpus_per_worker", "threads", "symbols_per_gap"), positive_finite=("lr",))
        if self.nmaps < 2:
            raise ValueError(f"--nmaps: expected >= 2, got {self.nmaps}")
        if self.model not in (*MODEL_PRESETS, "neural_gpu"):
            raise ValueError(f"--model: expected one of {sorted(MODEL_PRESETS)} or neural_gpu, got {self.model!r}")
        if not self.gaps or min(self.gaps) < 1:
            raise ValueError(f"--gaps: expected comma-separated steps >= 1 such as 1,100,1000, got {self.gaps!r}")
        self.memory_config()

    def task(self) -> RareSymbolTask:
        return RareSymbolTask(seed=self.seed)

    def model_config(self, use_memory: bool) -> Seq2SeqConfig | NeuralGPUConfig:
        """The network (the same for the runs with and without memory, but the memory's parts)."""
        task = self.task()
        if self.model == "neural_gpu":  # output i under input i: the tape needs no BOS / EOS
            return NeuralGPUConfig(in_vocab=task.vocab + 1, out_vocab=task.target_vocab, nmaps=self.nmaps,
                                   height=self.height, gate_bias=self.gate_bias, extended=True,
                                   use_memory=use_memory)
        return Seq2SeqConfig(src_vocab=task.vocab + 1, tgt_vocab=task.target_vocab, bos=task.bos, eos=task.eos,
                             use_memory=use_memory, **MODEL_PRESETS[self.model])

    def build_model(self, use_memory: bool) -> nn.Module:
        """A freshly initialised `Seq2Seq` or `NeuralGPU` (seed the RNG first for a reproducible one)."""
        cfg = self.model_config(use_memory)
        return NeuralGPU(cfg) if isinstance(cfg, NeuralGPUConfig) else Seq2Seq(cfg)

    def memory_config(self) -> MemoryConfig:
        """The life-long memory: key size = the model's hidden size (the Neural GPU's channels)."""
        key_dim = self.nmaps if self.model == "neural_gpu" else MODEL_PRESETS[self.model]["hidden"]
        return MemoryConfig(size=self.memory_size, key_dim=key_dim, k=self.k, age_noise=self.age_noise, seed=self.seed,
                            ivf_lists=self.ivf_lists, ivf_probe=self.ivf_probe,
                            ivf_check_every=self.ivf_check_every, ivf_target_recall_at_1=self.ivf_target_recall_at_1,
                            ivf_target_recall_at_k=self.ivf_target_recall_at_k)


PRESETS: dict[str, dict] = {
    # CI smoke run: a few steps and short gaps, a few test symbols
    "quick": dict(steps=20, memory_size=4096, k=64, gaps=(1, 10), symbols_per_gap=16, log_every=10,
                  checkpoint_every=10),
    # the measured run: within 45 minutes on 2 CPU cores, both models and the whole protocol
    "default": dict(steps=700),
    # the Extended Neural GPU on the same task (it re-runs its CGRUs over the tape at every output step):
    # a narrow, low tape to fit the hour; gates that start by keeping the tape (at the default bias
    # of 1, 80 CGRUs wash the input out and the cross-entropy stays at log V for 200 steps)
    "neural_gpu": dict(model="neural_gpu", nmaps=32, height=2, gate_bias=2.0, lr=1e-2, k=64, steps=900),
    # GNMT sizes (a GPU job)
    "gnmt": dict(model="gnmt", steps=50000, batch_size=128, memory_size=1_048_576, lr=2e-4, checkpoint_every=2000),
}
