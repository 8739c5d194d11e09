"""The test protocol of `shared/docs/rare-symbol-task.md` for the seq2seq model or the Extended Neural GPU.

`run_protocol`: the `ProbeStream` is played through the memory. At each step the probe sequences
of that step are first decoded greedily (the memory read, not written); then the whole step
(contexts, probes and traffic) is written with its gold labels, without a gradient step, as in
the one-shot evaluation protocol (a read without labels: no recent-slot candidate; it needs only
each query's nearest slot, hence a top-1 read). A probe counts as a 1-shot hit when the token
decoded at its rare symbol's position is f(symbol). A model without memory has no state, so only
its probes are decoded (all at once after the stream, in large batches: the same answers, in
seconds instead of minutes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from distmem.memory import Memory
from distmem.models.neural_gpu import NeuralGPU
from distmem.models.seq2seq import Seq2Seq
from distmem.stats import wilson_interval
from distmem.tasks.rare_symbols.data import ProbeStream, RareSymbolTask, StreamBatch
from distmem.tasks.rare_symbols.training import to_tensors


@dataclass
class ProbeResult:
    """Per probe: its gap, whether the rare position was decoded right, the frequent positions
    right / in all, and whether the whole sequence was right."""

    gap: int
    rare_hit: bool
    frequent_right: int
    frequent_total: int
    exact: bool


def _score_probes(task: RareSymbolTask, model: Seq2Seq | NeuralGPU, memory, batch: StreamBatch, rows: np.ndarray,
                  gaps: dict[int, int], device) -> list[ProbeResult]:
    t = to_tensors(task, batch.inputs[rows], device)
    L = task.length
    if isinstance(model, NeuralGPU):
        decoded = model.greedy(t.src, L, memory)[0]
    else:
        decoded = model.greedy(t.src, memory, max_len=L + 1)
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
def run_protocol(model: Seq2Seq | NeuralGPU, memory: Memory | None, task: RareSymbolTask, stream: ProbeStream,
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
            if isinstance(model, NeuralGPU):
                queries, labels = model.teacher_forced_queries(t.src, t.tgt_out[:, :-1], memory)
            else:
                queries, labels = model.teacher_forced_queries(t.src, t.tgt_in).flatten(0, 1), t.tgt_out.flatten()
            memory.write(memory.query(queries, k=1), labels)  # the update needs the nearest slot only
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


def summarize(results: list[ProbeResult], gaps: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Per gap: 1-shot accuracy on the rare test symbols (with a Wilson 95% interval),
    accuracy on the frequent positions of the probes, and the share of fully right probes."""
    out = {}
    for gap in gaps:
        mine = [r for r in results if r.gap == gap]
        n = len(mine)
        hits = sum(r.rare_hit for r in mine)
        p = hits / n if n else float("nan")
        frequent = sum(r.frequent_right for r in mine) / max(1, sum(r.frequent_total for r in mine))
        out[str(gap)] = {"rare_accuracy": 100 * p,
                         "rare_ci95": wilson_interval(hits, n),
                         "frequent_accuracy": 100 * frequent,
                         "exact_sequences": 100 * sum(r.exact for r in mine) / n if n else float("nan"),
                         "probes": n}
    return out
