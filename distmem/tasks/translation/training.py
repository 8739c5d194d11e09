"""Training and translating with the GNMT-style `Seq2Seq` on prepared translation data.

Training step (the paper's Figure 2): the attention result of every target position queries the
memory with the gold next piece as the label (teacher forcing); the loss is the label-smoothed
cross-entropy plus the memory loss; after the optimizer step the batch is written into the
life-long memory."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distmem.memory import Memory
from distmem.models.seq2seq import Seq2Seq
from distmem.tasks.translation.prepare import BOS, EOS, PAD


@dataclass
class TranslationBatch:
    """src [B, S] (pieces, EOS); tgt_in [B, T + 1] (BOS, pieces); tgt_out [B, T + 1] (pieces, EOS); 0 pads."""

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor

    @property
    def tokens(self) -> int:
        return int((self.src != PAD).sum() + (self.tgt_out != PAD).sum())


def pad(rows: Sequence[Sequence[int]], before: Sequence[int] = (), after: Sequence[int] = ()) -> Tensor:
    """Token rows -> [len(rows), longest] int64, padded with PAD."""
    rows = [[*before, *row, *after] for row in rows]
    out = torch.full((len(rows), max(1, max(map(len, rows), default=1))), PAD, dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.int64)
    return out


def make_batch(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]]) -> TranslationBatch:
    """Teacher-forcing tensors of aligned source and target piece ids."""
    out = pad(tgt, after=[EOS])
    return TranslationBatch(pad(src, after=[EOS]), pad(tgt, before=[BOS])[:, : out.shape[1]], out)


def bucket_batches(rows: Iterator[dict[str, np.ndarray]], pairs: int, window: int, seed: int = 0, rank: int = 0,
                   start: int = 0) -> Iterator[TranslationBatch]:
    """Batches by token count from length buckets, for steps start, start + 1, ... of a worker.

    rows: the worker's Parquet stream ({"src", "tgt"}), from the first row of the window of step
    `start` (windows of `pairs * window` rows, one per `window` steps). Each window is sorted by
    length (ties broken at random) and cut into `window` batches of about equal padded token
    count (short pairs: many to a batch, long: few), whose order is shuffled. The random draws are
    seeded by (seed, rank, window index), so every epoch reshuffles and a resumed worker, whose
    stream starts at its window, skips that window's first start % window batches and continues
    with the batch it would have had."""
    size = pairs * window
    index, skip = divmod(start, window)
    src: list = []
    tgt: list = []
    for chunk in rows:
        src.extend(chunk["src"])
        tgt.extend(chunk["tgt"])
        while len(src) >= size:
            rng = np.random.default_rng([seed, rank, index])
            cost = np.maximum([len(r) for r in src[:size]], [len(r) for r in tgt[:size]]) + 1
            order = np.lexsort((rng.random(size), cost))
            # cut where the sorted costs' running total crosses each window-th of the total (N >= window)
            total = np.cumsum(cost[order])
            cuts = np.searchsorted(total, total[-1] * np.arange(1, window) / window).tolist()
            for j in range(window - 1):  # no empty batch
                cuts[j] = min(max(cuts[j], cuts[j - 1] + 1 if j else 1), size - window + j + 1)
            groups = np.split(order, cuts)
            for g in rng.permutation(window)[skip:]:
                yield make_batch([src[i] for i in groups[g]], [tgt[i] for i in groups[g]])
            src, tgt, index, skip = src[size:], tgt[size:], index + 1, 0


def train_step(model: Seq2Seq, memory: Memory | None, batch: TranslationBatch, optimizer: torch.optim.Optimizer,
               lr: float, label_smoothing: float, clip_norm: float) -> dict[str, float]:
    """One update; writes the batch into `memory` (None: the model without memory)."""
    model.train()
    device = next(model.parameters()).device
    src, tgt_in, tgt_out = batch.src.to(device), batch.tgt_in.to(device), batch.tgt_out.to(device)
    out = model(src, tgt_in, tgt_out, memory, label_smoothing=label_smoothing)
    loss = out.loss
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    if out.read is not None:
        memory.write(out.read)
    accuracy = (out.logits.detach().argmax(-1) == tgt_out[out.mask]).float().mean()
    return {"ce": float(out.ce.detach()), "loss": float(loss.detach()), "lr": lr,
            "memory_loss": float(out.read.loss.detach()) if out.read is not None else 0.0,
            "accuracy": float(accuracy), "tokens": float(batch.tokens)}


def load_run(run: str | os.PathLike, variant: str) -> tuple[Seq2Seq, Memory | None, dict]:
    """The latest checkpoint of `variant` ("memory" or "baseline") of a `jobs.translate` run
    folder: its model, its memory as training left it (None for the baseline), and the payload."""
    from distmem import checkpoints  # noqa: PLC0415
    from distmem.cli import from_dict  # noqa: PLC0415
    from distmem.memory import LocalMemory  # noqa: PLC0415
    from distmem.runs import RunStore  # noqa: PLC0415
    from distmem.tasks.translation.config import TranslationRunConfig  # noqa: PLC0415

    if variant not in ("memory", "baseline"):
        raise ValueError(f"variant: expected 'memory' or 'baseline', got {variant!r}")
    sub = RunStore(RunStore(str(run)).location(variant))
    latest = checkpoints.latest(sub)
    if latest is None:
        raise FileNotFoundError(f"{run}: not a translation run folder with a {variant} checkpoint and spm.model")
    payload = checkpoints.load(sub, latest)
    cfg = from_dict(TranslationRunConfig, payload["config"])
    model = Seq2Seq(cfg.model_config(use_memory=variant == "memory"))
    model.load_state_dict(payload["model"])
    memory = None
    if variant == "memory":
        memory = LocalMemory(cfg.memory_config(), backend=cfg.backend)
        checkpoints.restore_memory(memory, sub, latest)
    return model, memory, payload


class Translator:
    """Text in, text out with a trained model, its sentencepiece model and (optionally) a memory.

    translate(lines) -> lines; remember(src_lines, tgt_lines): pass the pairs teacher-forced,
    reading and writing the memory at every target position (no gradient, no parameter change).
    """

    def __init__(self, model: Seq2Seq, spm_model: str, memory: Memory | None = None, beam: int = 4,
                 length_penalty: float = 0.6, batch_pairs: int = 64, max_len_ratio: float = 1.5) -> None:
        import sentencepiece as spm  # noqa: PLC0415

        self.model, self.memory = model.eval(), memory
        self.sp = spm.SentencePieceProcessor(model_file=str(spm_model))
        self.beam, self.length_penalty = beam, length_penalty
        self.batch_pairs, self.max_len_ratio = batch_pairs, max_len_ratio

    @classmethod
    def from_checkpoint(cls, run: str | os.PathLike, variant: str = "memory", beam: int = 4,
                        length_penalty: float = 0.6) -> Translator:
        """The translator of a `jobs.translate` run folder (path or URI): the latest checkpoint of
        `variant` ("memory" or "baseline"), its memory as training left it, the run's spm.model.
        A checkpoint that would run code when unpickled is refused (`CheckpointError`)."""
        from distmem.runs import RunStore  # noqa: PLC0415

        store = RunStore(str(run))
        if not store.exists("spm.model"):
            raise FileNotFoundError(f"{run}: not a translation run folder with a {variant} checkpoint and spm.model")
        model, memory, _ = load_run(run, variant)
        with tempfile.TemporaryDirectory() as tmp:  # the processor reads the model file once
            spm_model = store.download("spm.model", Path(tmp) / "spm.model")
            return cls(model, str(spm_model), memory, beam=beam, length_penalty=length_penalty)

    def encode(self, lines: Sequence[str]) -> list[list[int]]:
        return self.sp.encode([line.strip() for line in lines])

    def decode(self, tokens: Tensor) -> list[str]:
        """Hypotheses [B, T] (pieces, EOS, padding) -> text."""
        out = []
        for row in tokens.tolist():
            row = row[: row.index(EOS)] if EOS in row else row
            out.append(self.sp.decode([t for t in row if t > EOS]))
        return out

    @torch.no_grad()
    def translate(self, lines: Sequence[str], greedy: bool = False) -> list[str]:
        """One translation per line (beam search; greedy=True: greedy decoding), in order."""
        ids = self.encode(lines)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths per batch
        out: list[str] = [""] * len(ids)
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_pairs):
            rows = order[start:start + self.batch_pairs]
            src = pad([ids[i] for i in rows], after=[EOS]).to(device)
            max_len = int(self.max_len_ratio * src.shape[1]) + 10
            if greedy or self.beam == 1:
                hyp = self.model.greedy(src, self.memory, max_len=max_len)
            else:
                hyp = self.model.beam_search(src, self.memory, beam=self.beam, max_len=max_len,
                                             length_penalty=self.length_penalty)
            for i, text in zip(rows, self.decode(hyp)):
                out[i] = text
        return out

    @torch.no_grad()
    def remember(self, src_lines: Sequence[str], tgt_lines: Sequence[str]) -> None:
        """Write the pairs into the memory, teacher-forced (the context protocol's step (b))."""
        if self.memory is None:
            raise ValueError("remember: this translator has no memory")
        if len(src_lines) != len(tgt_lines):
            raise ValueError(f"tgt_lines: expected one per source line ({len(src_lines)}), got {len(tgt_lines)}")
        src_ids, tgt_ids = self.encode(src_lines), self.encode(tgt_lines)
        device = next(self.model.parameters()).device
        for start in range(0, len(src_ids), self.batch_pairs):
            batch = make_batch(src_ids[start:start + self.batch_pairs], tgt_ids[start:start + self.batch_pairs])
            out = self.model(batch.src.to(device), batch.tgt_in.to(device), batch.tgt_out.to(device), self.memory)
            self.memory.write(out.read)
