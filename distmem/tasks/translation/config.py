"""The translation run config, its presets and the corpora each preset uses."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from distmem.cli import check_fields, option
from distmem.config import MemoryConfig
from distmem.models.seq2seq import MODEL_PRESETS, Seq2SeqConfig
from distmem.tasks.translation.prepare import BOS, EOS, PAD, PrepareSettings


@dataclass(frozen=True)
class EvalSet:
    name: str
    src: str
    ref: str


@dataclass(frozen=True)
class TranslationRunConfig:
    """Everything a translation run needs; saved with every checkpoint (config.json in the run folder)."""

    preset: Literal["quick", "multi30k", "wmt14-sample", "wmt14"] = option(
        "multi30k", "the preset this config started from (it picks the corpora)")
    data: str = option("../shared/data", "the shared data folder (multi30k/, wmt14/)")
    train: tuple[str, ...] = option((), "wmt14: training corpora as SRC,TGT[,SRC,TGT...] (paths or URIs)")
    prepared: str = option("data", "folder of prepared data sets (each reused when its inputs are the same)")
    vocab: int = option(8000, "joint sentencepiece vocabulary")
    sample_sentences: int = option(10_000_000, "the tokeniser's training sample (sentences)")
    model: Literal["tiny", "small", "gnmt"] = option("tiny", "model size (distmem.models.seq2seq.MODEL_PRESETS)")
    hidden: int = option(0, "hidden size (0: the model preset's)")
    dropout: float = option(0.2, "dropout between LSTM layers")
    workers: int = option(2, "data-parallel trainers (Ray Train)")
    cpus_per_worker: int = option(0, "CPUs each trainer reserves (0: the cluster's CPUs / workers)")
    threads: int = option(0, "torch threads per trainer (0: its CPUs)")
    shards: int = option(2, "memory shards")
    steps: int = option(3000, "training steps (one batch per trainer each)")
    batch_pairs: int = option(32, "sentence pairs per trainer per step (on average: batches are cut by token count)")
    bucket_window: int = option(50, "steps whose pairs are sorted by length and cut into batches of equal token count")
    lr: float = option(2e-3, "peak Adam learning rate")
    warmup: int = option(200, "steps of linear warm-up; then a cosine decay to lr / 10")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy")
    clip_norm: float = option(1.0, "gradient-norm clipping")
    memory_size: int = option(65536, "memory slots")
    k: int = option(256, "nearest neighbours per query")
    age_noise: float = option(8.0, "half-width of the age noise of the memory's update")
    backend: Literal["torch", "faiss"] = option("torch", "exact k-NN backend of the memory")
    beam: int = option(4, "beam size of the test translations")
    length_penalty: float = option(0.6, "GNMT length penalty alpha of the beam search")
    dev_sentences: int = option(300, "dev sentences translated (greedy) for each point of the BLEU curve")
    test_sentences: int = option(0, "the first sentences of each test set evaluated (0: all)")
    eval_every: int = option(500, "steps between points of the dev BLEU curve (0: none)")
    log_every: int = option(50, "steps between points of the training curve")
    checkpoint_every: int = option(500, "steps between checkpoints")
    seed: int = option(0, "seed of the data order, the initialisation and the memory")

    def __post_init__(self) -> None:
        check_fields(self, at_least_one=("vocab", "workers", "shards", "steps", "batch_pairs", "memory_size", "k",
                                         "beam", "log_every", "checkpoint_every", "sample_sentences",
                                         "bucket_window"),
                     non_negative=("cpus_per_worker", "threads", "warmup", "dev_sentences", "eval_every", "hidden",
                                   "test_sentences"),
                     positive_finite=("lr",))
        if not 0 <= self.dropout < 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError("--dropout and --label-smoothing: expected values in [0, 1)")
        if self.hidden % 2:
            raise ValueError(f"--hidden: expected an even size, got {self.hidden}")
        if self.preset == "wmt14" and (not self.train or len(self.train) % 2):
            raise ValueError("--train: the wmt14 preset needs the training corpora as SRC,TGT[,SRC,TGT...]")
        self.memory_config()

    @property
    def hidden_size(self) -> int:
        return self.hidden or MODEL_PRESETS[self.model]["hidden"]

    def model_config(self, use_memory: bool) -> Seq2SeqConfig:
        """The network (the same with and without memory, but the memory's parts)."""
        sizes = {**MODEL_PRESETS[self.model], "hidden": self.hidden_size, "dropout": self.dropout}
        return Seq2SeqConfig(src_vocab=self.vocab, tgt_vocab=self.vocab, bos=BOS, eos=EOS, pad=PAD,
                             use_memory=use_memory, **sizes)

    def memory_config(self) -> MemoryConfig:
        """The life-long memory: key size = the model's hidden size."""
        return MemoryConfig(size=self.memory_size, key_dim=self.hidden_size, k=self.k, age_noise=self.age_noise,
                            seed=self.seed)

    def prepare_settings(self) -> PrepareSettings:
        return PrepareSettings(vocab=self.vocab, sample_sentences=self.sample_sentences, seed=self.seed)

    def lr_at(self, step: int) -> float:
        """Linear warm-up to lr, then a cosine decay to lr / 10 at the last step."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    # -- corpora -------------------------------------------------------------------------------
    def train_corpora(self) -> list[tuple[str, str]]:
        d = Path(self.data)
        if self.preset in ("quick", "multi30k"):
            return [(str(d / "multi30k" / "train.en.gz"), str(d / "multi30k" / "train.de.gz"))]
        if self.preset == "wmt14-sample":
            sample = d / "wmt14" / "train_sample_opennmt10k"
            return [(str(sample / "train.en.gz"), str(sample / "train.de.gz"))]
        return list(zip(self.train[::2], self.train[1::2]))

    def dev_set(self) -> EvalSet:
        d = Path(self.data)
        if self.preset in ("quick", "multi30k"):
            return EvalSet("val", str(d / "multi30k" / "val.en.gz"), str(d / "multi30k" / "val.de.gz"))
        return EvalSet("newstest2013", str(d / "wmt14" / "newstest2013.en"), str(d / "wmt14" / "newstest2013.de"))

    def test_sets(self) -> list[EvalSet]:
        d = Path(self.data)
        if self.preset in ("quick", "multi30k"):
            return [EvalSet("test_2016_flickr", str(d / "multi30k" / "test_2016_flickr.en.gz"),
                            str(d / "multi30k" / "test_2016_flickr.de.gz"))]
        return [EvalSet(f"newstest2014-{kind}", str(d / "wmt14" / f"newstest2014-{kind}.en"),
                        str(d / "wmt14" / f"newstest2014-{kind}.de")) for kind in ("full", "filtered")]

    def prepared_name(self) -> str:
        """The prepared data set's folder under `prepared` (the folder checks its inputs' hashes)."""
        return f"{'multi30k' if self.preset == 'quick' else self.preset}-v{self.vocab}"


PRESETS: dict[str, dict] = {
    # CI smoke run: a few steps of a small model, a few sentences translated
    "quick": dict(vocab=8000, hidden=64, steps=8, batch_pairs=8, warmup=2, memory_size=4096, k=32, shards=2,
                  beam=2, dev_sentences=8, eval_every=4, log_every=4, checkpoint_every=4),
    # the measured CPU run: Multi30k En->De, both variants and the evaluation within an hour on 2 cores
    "multi30k": dict(steps=3000, eval_every=500, dev_sentences=200, dropout=0.1, memory_size=16384, k=128),
    # the WMT path end to end on the 10k sample (a smoke run; its BLEU is not a target)
    "wmt14-sample": dict(vocab=8000, steps=300, eval_every=100, dev_sentences=100, checkpoint_every=100,
                         memory_size=16384, k=128, test_sentences=500),
    # the real thing, for a GPU cluster: --train gives the full WMT14 corpus
    "wmt14": dict(vocab=32000, model="gnmt", steps=200_000, batch_pairs=128, lr=5e-4, warmup=2000,
                  memory_size=1_048_576, shards=4, eval_every=5000, dev_sentences=3000, checkpoint_every=2000),
}
