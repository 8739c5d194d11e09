"""The rare-symbol task with a sequence-to-sequence model: training steps on the life-long stream
and the test protocol of `shared/docs/rare-symbol-task.md`.

Training step: the batch is read from the memory with the gold next tokens as labels (all
decoding positions at once, teacher forcing), the loss is cross-entropy + memory loss, and after
the optimizer step the batch is written (the memory is never emptied).

Test protocol (`run_protocol`): the `ProbeStream` is played through the memory. At each step the
probe sequences of that step are first decoded greedily (the memory read, not written); then the
whole step (contexts, probes and traffic) is written with its gold labels, without a gradient
step, as in the one-shot evaluation protocol (a read without labels: no recent-slot candidate;
it needs only each query's nearest slot, hence a top-1 read). A probe counts as a 1-shot hit when the token decoded at its rare symbol's
position is f(symbol). A model without memory has no state, so only its probes are decoded (all
at once after the stream, in large batches: the same answers, in seconds instead of minutes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from distmem.config import MemoryConfig
from distmem.data.rare_symbols import RareSymbolTask, StreamBatch, ProbeStream
from distmem.models.seq2seq import MODEL_PRESETS, Seq2Seq, Seq2SeqConfig


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


def train_step(model: Seq2Seq, memory, task: RareSymbolTask, batch: StreamBatch, optimizer: torch.optim.Optimizer,
               clip_norm: float = 5.0) -> dict[str, float]:
    """One update on a stream batch; writes the batch into `memory` (None: a model without one).

    Returns the cross-entropy, the memory loss, the token accuracy, and the accuracy on the rare
    symbols that come back (kind 2: seen before, so only the memory can know them early on): the
    model's, and (with a memory) the memory's own value there.
    """
    model.train()
    device = next(model.parameters()).device
    t = to_tensors(task, batch.inputs, device)
    out = model(t.src, t.tgt_in, t.tgt_out, memory)
    optimizer.zero_grad()
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    if out.read is not None:
        memory.write(out.read)
    pred = out.logits.argmax(-1)
    metrics = {"ce": float(out.ce.detach()), "memory_loss": float(out.read.loss.detach()) if out.read is not None else 0.0,
               "accuracy": float((pred == t.tgt_out)[out.mask].float().mean())}
    returns = np.nonzero(batch.kind == 2)[0]
    if len(returns):
        rows, pos = torch.from_numpy(returns), torch.from_numpy(batch.rare_pos[returns])
        gold = t.tgt_out[rows, pos]
        metrics["return_accuracy"] = float((pred[rows, pos] == gold).float().mean())
        if out.read is not None:  # what the memory itself returned there
            metrics["return_memory_accuracy"] = float((out.value[rows, pos] == gold).float().mean())
            metrics["return_confidence"] = float(out.confidence[rows, pos].detach().mean())
    return metrics


@dataclass
class ProbeResult:
    """Per probe: its gap, whether the rare position was decoded right, the frequent positions
    right / in all, and whether the whole sequence was right."""

    gap: int
    rare_hit: bool
    frequent_right: int
    frequent_total: int
    exact: bool


def _score_probes(task: RareSymbolTask, model: Seq2Seq, memory, batch: StreamBatch, rows: np.ndarray,
                  gaps: dict[int, int], device) -> list[ProbeResult]:
    t = to_tensors(task, batch.inputs[rows], device)
    decoded = model.greedy(t.src, memory, max_len=task.length + 1)
    L = task.length
    decoded = torch.nn.functional.pad(decoded, (0, max(0, L - decoded.shape[1])))[:, :L].cpu().numpy()
    gold = t.tgt_out[:, :L].cpu().numpy()
    right = decoded == gold
    out = []
    for i, row in enumerate(rows):
        pos = batch.rare_pos[row]
        frequent = np.ones(L, dtype=bool)
        frequent[pos] = False
        out.append(ProbeResult(gaps[int(batch.rare[row])], bool(right[i, pos]), int(right[i][frequent].sum()),
                               int(frequent.sum()), bool(right[i].all())))
    return out


@torch.no_grad()
def run_protocol(model: Seq2Seq, memory, task: RareSymbolTask, stream: ProbeStream,
                 progress: Callable[[int], None] | None = None, probe_batch: int = 256) -> dict[str, dict[str, float]]:
    """The test protocol on `stream` for a model with `memory` (written as it goes) or without
    (memory None: its probes only, decoded probe_batch at a time after the stream). Returns per
    gap {"rare_accuracy", "frequent_accuracy", "exact_sequences", "probes", "rare_ci95" (Wilson
    interval [low, high])} in percent."""
    model.eval()
    device = next(model.parameters()).device
    gaps = {item.symbol: item.gap for item in stream.items}
    results: list[ProbeResult] = []
    use_memory = memory is not None and model.cfg.use_memory
    stateless: list[StreamBatch] = []  # without memory: the probes, decoded together at the end
    for step, batch in enumerate(stream):
        probes = np.nonzero(batch.kind == 2)[0]
        if len(probes) and use_memory:
            results += _score_probes(task, model, memory, batch, probes, gaps, device)
        elif len(probes):
            stateless.append(StreamBatch(*(a[probes] for a in (batch.inputs, batch.rare_pos, batch.rare, batch.kind))))
        if use_memory:  # the whole step is written with its labels (no gradient step, no recent slots)
            t = to_tensors(task, batch.inputs, device)
            queries = model.teacher_forced_queries(t.src, t.tgt_in).flatten(0, 1)
            memory.write(memory.query(queries, k=1), t.tgt_out.flatten())  # the update needs the nearest slot only
        if progress is not None:
            progress(step + 1)
    if stateless:  # a model without state decodes a probe the same at any step: in large batches
        probes = StreamBatch(*(np.concatenate(parts) for parts in zip(*(
            (b.inputs, b.rare_pos, b.rare, b.kind) for b in stateless))))
        n = len(probes.rare)
        for start in range(0, n, probe_batch):
            rows = np.arange(start, min(start + probe_batch, n))
            results += _score_probes(task, model, None, probes, rows, gaps, device)
    return summarize(results, stream.gaps)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score 95% interval of a proportion, in percent (unlike the normal approximation
    it does not shrink to a point at 0% or 100%)."""
    if n == 0:
        return [float("nan"), float("nan")]
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [100 * max(0.0, centre - half), 100 * min(1.0, centre + half)]


def summarize(results: list[ProbeResult], gaps: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Per gap: 1-shot accuracy on the rare test symbols (with a Wilson 95% interval),
    accuracy on the frequent positions of the probes, and the share of fully right probes."""
    out = {}
    for gap in gaps:
        mine = [r for r in results if r.gap == gap]
        n = len(mine)
        hits = sum(r.rare_hit for r in mine)
        p = hits / n if n else float("nan")
        out[str(gap)] = {"rare_accuracy": 100 * p,
                         "rare_ci95": wilson_interval(hits, n),
                         "frequent_accuracy": 100 * sum(r.frequent_right for r in mine) / max(1, sum(r.frequent_total for r in mine)),
                         "exact_sequences": 100 * sum(r.exact for r in mine) / n if n else float("nan"),
                         "probes": n}
    return out


@dataclass
class RareSymbolRunConfig:
    """Everything a rare-symbol run needs; saved with every checkpoint (config.json in the run folder)."""

    preset: str = "default"
    model: str = "tiny"             # a key of distmem.models.seq2seq.MODEL_PRESETS
    workers: int = 2                # data-parallel trainers (Ray Train)
    cpus_per_worker: int = 0        # CPUs each trainer reserves (0: the cluster's CPUs / workers)
    threads: int = 0                # torch threads per trainer (0: its CPUs)
    shards: int = 2                 # memory shards
    steps: int = 2000               # training steps (one batch per trainer each)
    batch_size: int = 16            # sequences per trainer per step
    lr: float = 3e-3
    clip_norm: float = 5.0
    memory_size: int = 65536
    k: int = 256
    age_noise: float = 8.0
    backend: str = "torch"
    gaps: str = "1,100,1000,5000"   # test gaps, in steps
    symbols_per_gap: int = 0        # rare test symbols per gap (0: all 2,048 split evenly)
    log_every: int = 100            # steps between points of the training curve
    checkpoint_every: int = 500
    seed: int = 0

    def gap_list(self) -> tuple[int, ...]:
        try:
            gaps = tuple(int(g) for g in str(self.gaps).split(","))
        except ValueError:
            raise ValueError(f"gaps: expected comma-separated steps such as '1,100,1000', got {self.gaps!r}") from None
        if not gaps or min(gaps) < 1:
            raise ValueError(f"gaps: expected steps >= 1, got {self.gaps!r}")
        return gaps

    def task(self) -> RareSymbolTask:
        return RareSymbolTask(seed=self.seed)

    def model_config(self, use_memory: bool) -> Seq2SeqConfig:
        """The network (the same for the runs with and without memory, but the memory's parts)."""
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"model must be one of {sorted(MODEL_PRESETS)}, got {self.model!r}")
        task = self.task()
        return Seq2SeqConfig(src_vocab=task.vocab + 1, tgt_vocab=task.target_vocab, bos=task.bos, eos=task.eos,
                             use_memory=use_memory, **MODEL_PRESETS[self.model])

    def memory_config(self) -> MemoryConfig:
        """The life-long memory: key size = the model's hidden size."""
        return MemoryConfig(size=self.memory_size, key_dim=MODEL_PRESETS[self.model]["hidden"], k=self.k,
                            age_noise=self.age_noise, seed=self.seed)


PRESETS: dict[str, dict] = {
    # CI smoke run: a few steps and short gaps, a few test symbols
    "quick": dict(steps=20, memory_size=4096, k=64, gaps="1,10", symbols_per_gap=16, log_every=10, checkpoint_every=10),
    # the measured run: at most 45 minutes on 2 CPU cores, both models and the whole protocol
    # (700 steps: on a 2-core AVX2 machine 1,000 steps took 51 minutes in all, 2,000 would take 75)
    "default": dict(steps=700),
    # GNMT sizes (a GPU job)
    "gnmt": dict(model="gnmt", steps=50000, batch_size=128, memory_size=1_048_576, lr=2e-4, checkpoint_every=2000),
}
