"""Training a sequence-to-sequence model on the rare-symbol stream: one step.

Training step: the batch is read from the memory with the gold next tokens as labels (all
decoding positions at once, teacher forcing), the loss is cross-entropy + memory loss, and after
the optimizer step the batch is written (the memory is never emptied)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from distmem.memory import Memory
from distmem.models.neural_gpu import NeuralGPU
from distmem.models.seq2seq import Seq2Seq
from distmem.tasks.rare_symbols.data import RareSymbolTask, StreamBatch


@dataclass
class Seq2SeqBatch:
    """src [B, L]; tgt_in [B, L + 1] (BOS, y_1..y_L); tgt_out [B, L + 1] (y_1..y_L, EOS)."""

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor


def to_tensors(task: RareSymbolTask, inputs: np.ndarray, device: torch.device | str = "cpu") -> Seq2SeqBatch:
    """Teacher-forcing tensors of input sequences [B, L]."""
    src = torch.from_numpy(np.ascontiguousarray(inputs)).to(device)
    y = torch.from_numpy(task.targets(inputs)).to(device)
    bos = torch.full((len(y), 1), task.bos, dtype=torch.int64, device=device)
    eos = torch.full((len(y), 1), task.eos, dtype=torch.int64, device=device)
    return Seq2SeqBatch(src, torch.cat([bos, y], 1), torch.cat([y, eos], 1))


def train_step(model: Seq2Seq | NeuralGPU, memory: Memory | None, task: RareSymbolTask, batch: StreamBatch,
               optimizer: torch.optim.Optimizer, clip_norm: float = 5.0) -> dict[str, float]:
    """One update on a stream batch; writes the batch into `memory` (None: a model without one).

    Returns the cross-entropy, the memory loss, the token accuracy, and the accuracy on the rare
    symbols that come back (kind 2: seen before, so only the memory can know them early on): the
    model's, and (with a memory) the memory's own value there.
    """
    model.train()
    device = next(model.parameters()).device
    t = to_tensors(task, batch.inputs, device)
    if isinstance(getattr(model, "module", model), NeuralGPU):  # output i under input i: y, no BOS / EOS
        gold = t.tgt_out[:, :-1]
        out = model(t.src, gold, memory)
        pred, mask = out.logits.detach().argmax(-1), torch.ones_like(gold, dtype=torch.bool)
    else:
        gold = t.tgt_out
        out = model(t.src, t.tgt_in, t.tgt_out, memory)
        pred, mask = out.padded(out.logits.detach().argmax(-1), fill=-1), out.mask  # (B, T)
    optimizer.zero_grad()
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    if out.read is not None:
        memory.write(out.read)
    metrics = {"ce": float(out.ce.detach()),
               "memory_loss": float(out.read.loss.detach()) if out.read is not None else 0.0,
               "accuracy": float((pred == gold)[mask].float().mean())}
    returns = np.nonzero(batch.kind == 2)[0]
    if len(returns):
        rows, pos = torch.from_numpy(returns), torch.from_numpy(batch.rare_pos[returns])
        want = gold[rows, pos]
        metrics["return_accuracy"] = float((pred[rows, pos] == want).float().mean())
        if out.read is not None:  # what the memory itself returned there
            metrics["return_memory_accuracy"] = float((out.value[rows, pos] == want).float().mean())
            if hasattr(out, "confidence"):  # both models scale the value's direct path by it
                metrics["return_confidence"] = float(out.confidence[rows, pos].detach().mean())
    return metrics
