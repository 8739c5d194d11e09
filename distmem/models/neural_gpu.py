"""The Neural GPU (Kaiser & Sutskever 2016) and the Extended Neural GPU (Kaiser & Bengio 2016)
with the memory of Kaiser et al. (2017), the paper's Figure 3. Spec: shared/docs/neural-gpu.md.

The state is a tape s [B, m, h, n]: m = nmaps channels, h rows, n positions (the padded length).
The input's embedding fills row 0; each of n steps applies `nconvs` convolutional GRUs (CGRU,
shared by every step) to the whole tape. The cell is Kaiser & Sutskever's CGRU or, with
`cell="dcgru"`, the improved Neural GPU's diagonal CGRU with hard gates (Freivalds & Liepins 2018).

- Neural GPU (`extended=False`): the logits of position i come from row 0 of the final tape;
  the output has the input's length (the algorithmic tasks pad both to n).
- Extended Neural GPU (`extended=True`): a decoder tape starts from the encoder's final tape.
  Decoder step t runs the decoder's CGRUs over it with the output tape p (the embedded outputs
  decided so far: gold under teacher forcing, the model's own when decoding), and row 0 at
  position t gives the logits of output t; then p[t] becomes output t's embedding.
- The memory (Figure 3): "the query is read from the position one below the current output
  logit, and the embedded memory value is put at the same position of the output tape p. The
  network learns to use these values to produce the output in the next step." Before the CGRUs
  of step t the query is row 0 of the decoder tape at position t + 1 (label: output t + 1), and
  the returned value's embedding goes onto p at position t + 1, which step t + 1 reads when it
  produces output t + 1 (then p[t + 1] is overwritten by the decided output). The public code
  gives output 0 no value; distmem also queries position 0 before step 0 (from the encoder's
  final tape): a model that leans on its memory was otherwise wrong at output 0 about 3 times in
  4 (measured). The logits are tied to the target embedding, so a value the network copies from
  p raises its own logit, also for a token never emitted in training.
- distmem's addition (`memory_gain` > 0): the read's confidence times a learned gain is added to
  the value's own logit at that position, a direct path like the seq2seq model's. Without it the
  network has to learn to copy p through its CGRUs, which the rare symbols' few returns never
  taught it; through the tied embedding instead of the logit, a never-seen symbol's bonus shrinks
  with its embedding, which training pushes down (measured: docs/experiments.md).

The model reads the memory only; the caller writes (`memory.write(out.read)`).
Shapes: src [B, n] int64 (0 = padding); tgt [B, T] int64 with T <= n (0 = padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distmem.layer import MemoryLayer
from distmem.memory import Memory
from distmem.merge import MemoryRead
from distmem.models.seq2seq import check_tokens


@dataclass
class NeuralGPUConfig:
    """Sizes and options of the model; saved with every checkpoint."""

    in_vocab: int             # input ids 1..in_vocab - 1 (0: padding)
    out_vocab: int            # output ids 1..out_vocab - 1 (0: padding)
    nmaps: int = 24           # channels m
    height: int = 4           # rows h
    kernel: int = 3           # CGRU kernel (kernel x kernel)
    nconvs: int = 2           # CGRUs per step
    cutoff: float = 1.2       # the gates' cut-off sigmoid: clip(c * sigmoid(x) - (c - 1) / 2, 0, 1)
    dropout: float = 0.0      # on the tape before every step (dcgru: on the candidate; training only)
    gate_bias: float = 1.0    # initial bias of the CGRU gates: > 0 starts by keeping the state
    # the step's cell: "cgru" (Kaiser & Sutskever) or "dcgru", Freivalds & Liepins' diagonal CGRU
    # with hard gates (the improved Neural GPU; see DCGRU)
    cell: Literal["cgru", "dcgru"] = "cgru"
    saturation: float = 0.0   # dcgru: weight of the saturation cost added to the loss (0: none)
    # dcgru, at inference: an update gate within `snap` of 0 or 1 is set to exactly 0 or 1, so a
    # held value no longer leaks over hundreds of steps (0: off; training rounds them only once
    # NeuralGPU.snap_in_training is on)
    snap: float = 0.0
    extended: bool = False    # with the decoder tape and the output tape
    use_memory: bool = False  # the memory of Figure 3 (extended only)
    # the value's direct path: initial gain * confidence added to its logit (learned on a log
    # scale; 0: none, the value reaches the logits only through the output tape p, the paper's wiring)
    memory_gain: float = 20.0
    recall_k: int = 16        # candidates of the decoder's read: the confidence is n1's softmax weight over them
    pad: int = 0

    def __post_init__(self) -> None:
        for name in ("in_vocab", "out_vocab", "nmaps", "height", "kernel", "nconvs", "recall_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel: expected an odd size (the tape keeps its shape), got {self.kernel}")
        if not 1.0 <= self.cutoff:
            raise ValueError(f"cutoff: expected >= 1 (1: the plain sigmoid), got {self.cutoff}")
        if self.cell not in ("cgru", "dcgru"):
            raise ValueError(f"cell: expected 'cgru' or 'dcgru', got {self.cell!r}")
        if self.cell == "dcgru" and self.nmaps < 3:
            raise ValueError(f"nmaps: the dcgru shifts thirds of the channels: expected >= 3, got {self.nmaps}")
        if not (self.saturation >= 0 and math.isfinite(self.saturation)):
            raise ValueError(f"saturation: expected a finite weight >= 0, got {self.saturation}")
        if not 0.0 <= self.snap < 0.5:
            raise ValueError(f"snap: expected a value in [0, 0.5) (0: off), got {self.snap}")
        if self.snap > 0 and self.cell != "dcgru":
            raise ValueError("snap: the snapped update gate is the dcgru's (cell='dcgru')")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout}")
        if not (self.memory_gain >= 0 and math.isfinite(self.memory_gain)):
            raise ValueError(f"memory_gain: expected a finite value >= 0 (0: no direct path), got {self.memory_gain}")
        if self.use_memory and not self.extended:
            raise ValueError("use_memory: the memory needs the Extended Neural GPU (extended=True)")


NEURAL_GPU_PRESETS: dict[str, dict] = {
    "tiny": dict(nmaps=24, height=4),     # CPU
    "small": dict(nmaps=64, height=4),    # the public code's default
    "paper": dict(nmaps=128, height=4),   # Kaiser & Sutskever's larger runs (GPU)
}


def cutoff_sigmoid(x: Tensor, cutoff: float = 1.2) -> Tensor:
    """clip(cutoff * sigmoid(x) - (cutoff - 1) / 2, 0, 1): reaches exactly 0 and 1 (gates that
    fully keep or fully replace a cell), which the plain sigmoid never does."""
    return torch.clamp(cutoff * torch.sigmoid(x) - (cutoff - 1.0) / 2.0, 0.0, 1.0)


def hard_sigmoid(x: Tensor) -> Tensor:
    """clip(x / 2 + 1/2, 0, 1): the improved Neural GPU's gate (torch's hardsigmoid, clip(y / 6 + 1/2,
    0, 1), of y = 3x: two ops a use instead of three)."""
    return F.hardsigmoid(3.0 * x)


def snap_gate(u: Tensor, snap: float) -> Tensor:
    """u with every value below `snap` set to 0 and above 1 - `snap` set to 1 (any shape)."""
    return torch.where(u < snap, 0.0, torch.where(u > 1.0 - snap, 1.0, u))


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """F.dropout's function (in training, each value zeroed with probability p, the rest scaled by
    1 / (1 - p)), its mask drawn as 24-bit integers: torch's CPU bernoulli draws about 4x slower
    (measured), and a step of the Neural GPU draws one mask per cell use."""
    if not training or p == 0:
        return x
    draws = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_(0, 1 << 24)
    keep = (draws >= round(p * (1 << 24))).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * keep


def saturation_cost(pre: Tensor, limit: float = 0.9) -> Tensor:
    """Freivalds & Liepins' cost of a hard non-linearity's inputs pre [B, c, h, n]: relu(|pre| - limit)
    summed over the channels, averaged over the cells. It keeps the inputs near the range where
    the hard gates still pass a gradient. The sum of the costs of several such tensors of one
    shape but their channels is the cost of their concatenation along the channels."""
    return torch.relu(pre.abs() - limit).sum(1).mean()


def _kernel(kernel: int, height: int) -> tuple[int, int]:
    """A tape one row high needs no vertical kernel: (kh, kw)."""
    return (kernel if height > 1 else 1, kernel)


class CGRU(nn.Module):
    """Convolutional GRU: s [B, m, h, n] (and extra [B, e, h, n], the decoder's output tape,
    joined to every convolution's input) -> (s' [B, m, h, n], the pre-activations the saturation
    cost charges: none here): u = σ'(conv_u(s)), r = σ'(conv_r(s)), s' = u * s + (1 - u) * tanh(conv(r * s))."""

    def __init__(self, nmaps: int, kernel: int = 3, cutoff: float = 1.2, extra: int = 0,
                 gate_bias: float = 1.0, height: int = 4) -> None:
        super().__init__()
        self.cutoff = cutoff
        k = _kernel(kernel, height)
        self.gates = nn.Conv2d(nmaps + extra, 2 * nmaps, k, padding=(k[0] // 2, k[1] // 2))  # u, r
        self.candidate = nn.Conv2d(nmaps + extra, nmaps, k, padding=(k[0] // 2, k[1] // 2))
        nn.init.constant_(self.gates.bias, gate_bias)  # start by keeping the state (the public code: 1.0)
        nn.init.zeros_(self.candidate.bias)

    def forward(self, s: Tensor, extra: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        u, r = cutoff_sigmoid(self.gates(s if extra is None else torch.cat([s, extra], 1)), self.cutoff).chunk(2, 1)
        c = torch.tanh(self.candidate(r * s if extra is None else torch.cat([r * s, extra], 1)))
        return torch.lerp(c, s, u), ()  # u * s + (1 - u) * c


class DCGRU(CGRU):
    """The diagonal CGRU of the improved Neural GPU (Freivalds & Liepins 2018):
    u = hσ(conv_u(s)), r = hσ(conv_r(s)), c = htanh(conv(r * s)), s' = u * shift(s) + (1 - u) * c,
    with hσ the hard sigmoid, htanh the hard tanh, and shift(s) moving the second third of the
    channels one position right and the last third one position left (zeros enter at the ends):
    a gate that keeps the state also carries it along the tape, one position a step. Dropout
    (training) applies to c; `snap` (inference, and training once `snap_training` is set) rounds u
    within it of 0 or 1; training passes the gradient straight through the rounding. Returns (s', the
    pre-activations the saturation cost charges: those of the gates [B, 2m, h, n] and of the
    candidate [B, m, h, n]); the model charges a whole pass's at once (`saturation_cost`)."""

    def __init__(self, nmaps: int, kernel: int = 3, extra: int = 0, height: int = 1, dropout: float = 0.0,
                 snap: float = 0.0) -> None:
        super().__init__(nmaps, kernel, extra=extra, height=height)
        self.third = nmaps // 3
        self.dropout = dropout
        self.snap = snap
        self.snap_training = False  # training rounds u too (NeuralGPU.snap_in_training)
        self._moves: dict[tuple[int, torch.device], Tensor] = {}  # shift's source index per tape length
        with torch.no_grad():  # the public code's starting biases: u = 0.85, r = 0.75
            self.gates.bias[:nmaps] = 0.7
            self.gates.bias[nmaps:] = 0.5

    def shift(self, s: Tensor) -> Tensor:
        """s [B, m, h, n] with channels m - 2t..m - t - 1 moved one position right, m - t..m - 1 one left
        (one gather from the tape padded with a zero at either end: fewer ops than slices and a cat)."""
        B, m, h, n = s.shape
        index = self._moves.get((n, s.device))
        if index is None:
            offset = torch.ones(m, dtype=torch.int64, device=s.device)  # padded[j + 1] = s[j]: kept
            offset[m - 2 * self.third:m - self.third] = 0  # s[j - 1]: moved right
            offset[m - self.third:] = 2  # s[j + 1]: moved left
            index = self._moves[(n, s.device)] = (torch.arange(n, device=s.device) + offset[:, None])[None, :, None]
        return F.pad(s, (1, 1)).gather(-1, index.expand(B, m, h, n))

    def forward(self, s: Tensor, extra: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        gates = self.gates(s if extra is None else torch.cat([s, extra], 1))
        u, r = hard_sigmoid(gates).chunk(2, 1)
        if self.snap > 0 and not self.training:
            u = snap_gate(u, self.snap)
        elif self.snap > 0 and self.snap_training:  # the rounded gate forward, the gradient as if unrounded
            u = u + (snap_gate(u, self.snap) - u).detach()
        pre = self.candidate(r * s if extra is None else torch.cat([r * s, extra], 1))
        c = dropout(torch.clamp(pre, -1.0, 1.0), self.dropout, self.training)
        return torch.lerp(c, self.shift(s), u), (gates, pre)  # u * shift(s) + (1 - u) * c


@dataclass
class NeuralGPUOutput:
    """logits [B, T, V]; ce: mean cross-entropy over non-padding targets; read: the memory read of
    the positions that had one (None without memory); value [B, T] (-1: none) and confidence
    [B, T] of the decoder's reads; saturation: the dcgru's weighted saturation cost (a mean over
    the cell applications; 0 without)."""

    logits: Tensor
    ce: Tensor | None
    read: MemoryRead | None
    value: Tensor
    confidence: Tensor
    saturation: Tensor

    @property
    def loss(self) -> Tensor:
        """Cross-entropy plus the saturation cost plus the memory loss."""
        loss = self.ce + self.saturation
        return loss + self.read.loss if self.read is not None and self.read.loss is not None else loss


class NeuralGPU(nn.Module):
    """The Neural GPU, or with `extended=True` the Extended Neural GPU; `memory` is passed in."""

    def __init__(self, cfg: NeuralGPUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        m = cfg.nmaps
        self.embed = nn.Embedding(cfg.in_vocab, m, padding_idx=cfg.pad)
        if cfg.cell == "dcgru":  # inside the hard tanh's linear range (the public code's Glorot init)
            nn.init.uniform_(self.embed.weight, -0.3, 0.3)
            self.embed.weight.data[cfg.pad] = 0
        self.encoder = nn.ModuleList(self._cell(0) for _ in range(cfg.nconvs))
        if cfg.extended:
            self.target_embed = nn.Embedding(cfg.out_vocab, m, padding_idx=cfg.pad)  # also the output layer
            nn.init.normal_(self.target_embed.weight, std=m ** -0.5)  # logits of order 1 at the start
            self.target_embed.weight.data[cfg.pad] = 0
            self.decoder = nn.ModuleList(self._cell(m) for _ in range(cfg.nconvs))
        else:
            self.output = nn.Linear(m, cfg.out_vocab)
        if cfg.use_memory:
            self.memory_layer = MemoryLayer(m)
            if cfg.memory_gain > 0:  # log scale: the gain has to grow several-fold (the seq2seq model's ~20)
                self.memory_log_gain = nn.Parameter(torch.tensor(math.log(cfg.memory_gain)))

    def snap_in_training(self, on: bool) -> None:
        """Round the dcgru's update gates in training as at inference (cfg.snap; the gradient passes
        straight through), so that training fits the function inference runs."""
        for cell in self.modules():
            if isinstance(cell, DCGRU):
                cell.snap_training = on

    # -- building blocks -------------------------------------------------------------------------
    def _cell(self, extra: int) -> CGRU:
        c = self.cfg
        if c.cell == "dcgru":
            return DCGRU(c.nmaps, c.kernel, extra=extra, height=c.height, dropout=c.dropout, snap=c.snap)
        return CGRU(c.nmaps, c.kernel, c.cutoff, extra=extra, gate_bias=c.gate_bias, height=c.height)

    def _steps(self, cells: nn.ModuleList, s: Tensor, extra: Tensor | None = None,
               charged: list[Tensor] | None = None) -> Tensor:
        """One step: every cell once over the tape; their charged pre-activations go to `charged`
        (None: nowhere, as at inference and without a saturation cost)."""
        if self.cfg.cell == "cgru":  # the dcgru drops out its candidate instead
            s = dropout(s, self.cfg.dropout, self.training)
        for cell in cells:
            s, pre = cell(s, extra)
            if charged is not None:
                charged.extend(pre)
        return s

    def _charged(self) -> list[Tensor] | None:
        """A list to collect a pass's charged pre-activations in; None when the loss has no saturation cost."""
        return [] if self.cfg.saturation > 0 else None

    def _saturation(self, charged: list[Tensor] | None, cost: Tensor, uses: int) -> Tensor:
        """The weighted saturation cost: (cost + the cost of every charged pre-activation) / uses, in
        one concatenation rather than one cost per cell use (ops a step: docs/experiments.md)."""
        if not charged:
            return cost.new_zeros(())
        return self.cfg.saturation * (cost + saturation_cost(torch.cat(charged, 1))) / uses

    def encode(self, src: Tensor) -> Tensor:
        """src [B, n] -> the final tape [B, m, h, n] after n steps."""
        return self._encode(src)[0]

    def _encode(self, src: Tensor, charged: list[Tensor] | None = None,
                steps: int | None = None) -> tuple[Tensor, Tensor]:
        """(the final tape [B, m, h, n] after `steps` steps (None: n), the saturation cost of the
        embedded input; the cells' charged pre-activations of their steps * nconvs uses go to `charged`)."""
        check_tokens("src", src, self.cfg.in_vocab)
        B, n = src.shape
        steps = n if steps is None else steps
        s = self.embed(src).transpose(1, 2)[:, :, None]  # (B, m, 1, n): row 0
        cost = s.new_zeros(())
        if self.cfg.cell == "dcgru":  # hard non-linearities throughout
            if charged is not None:
                cost = saturation_cost(s)
            s = torch.clamp(s, -1.0, 1.0)
        s = F.pad(s, (0, 0, 0, self.cfg.height - 1))     # rows 1..h-1: zeros
        for _ in range(steps):
            s = self._steps(self.encoder, s, charged=charged)
        return s, cost

    def _logits(self, row: Tensor, value: Tensor | None = None, confidence: Tensor | None = None) -> Tensor:
        """Row-0 cells [..., m] -> logits [..., V] (extended: tied to the target embedding); with the
        memory's value [...] (-1: none) and confidence [...], the value's direct path added."""
        if not self.cfg.extended:
            return self.output(row)
        logits = row @ self.target_embed.weight.T
        if value is not None and hasattr(self, "memory_log_gain"):  # + gain * confidence at the value's logit
            bonus = self.memory_log_gain.exp() * confidence * (value >= 0)
            logits = logits.scatter_add(-1, value.clamp(min=0)[..., None], bonus[..., None])
        return logits

    def _place(self, p: Tensor, position: int, cells: Tensor) -> Tensor:
        """p [B, m, h, n] with every row of `position` set to cells [B, m] (out of place: p is kept
        for the backward pass of the CGRUs that read it)."""
        at = torch.zeros(p.shape[-1], dtype=torch.bool, device=p.device)
        at[position] = True
        return torch.where(at, cells[:, :, None, None], p)

    def queries(self, d: Tensor, position: int) -> Tensor:
        """The memory queries [B, m] of the decoder tape d [B, m, h, n] at `position` (row 0)."""
        return self.memory_layer.query(d[:, :, 0, position])

    def recalled(self, value: Tensor) -> Tensor:
        """Memory values [B] (-1: empty) -> their target embeddings [B, m] (0 where empty)."""
        return self.target_embed(value.clamp(min=0)) * (value >= 0)[:, None]

    # -- training ----------------------------------------------------------------------------------
    def forward(self, src: Tensor, tgt: Tensor | None = None, memory: Memory | None = None,
                extra_steps: int = 0) -> NeuralGPUOutput:
        """Neural GPU: logits [B, n, V] of every position (tgt [B, n] gives the loss).
        Extended: teacher-forced decoding of tgt [B, T] (T <= n), reading the memory with the
        gold outputs as labels. `extra_steps`: the encoder runs n + extra_steps steps (a training
        option: the answer must then hold on the tape after it is computed)."""
        B, n = src.shape
        if tgt is not None:
            self._check_targets(src, tgt)
        if extra_steps < 0:
            raise ValueError(f"extra_steps: expected >= 0, got {extra_steps}")
        charged = self._charged()
        s, cost = self._encode(src, charged, n + extra_steps)
        uses = (n + extra_steps) * self.cfg.nconvs  # cell applications, for the saturation cost's mean
        if not self.cfg.extended:
            logits = self._logits(s[:, :, 0].transpose(1, 2))  # (B, n, V)
            if tgt is not None and tgt.shape[1] < n:
                tgt = F.pad(tgt, (0, n - tgt.shape[1]))
            value = torch.full((B, n), -1, dtype=torch.int64, device=src.device)
            return NeuralGPUOutput(logits, _ce(logits, tgt, self.cfg.pad), None, value,
                                   torch.zeros(B, n, device=src.device), self._saturation(charged, cost, uses))
        if tgt is None:
            raise ValueError("tgt: the Extended Neural GPU's teacher-forced pass needs the targets [B, T]")
        _, logits, value, confidence, queries = self._decode(s, tgt.shape[1], memory, forced=tgt, charged=charged)
        uses += tgt.shape[1] * self.cfg.nconvs
        read = None
        if queries is not None:  # one read of every query: the memory loss and the write's plan
            read = memory.read(*self._labelled(queries, tgt))
        return NeuralGPUOutput(logits, _ce(logits, tgt, self.cfg.pad), read, value, confidence,
                               self._saturation(charged, cost, uses))

    @torch.no_grad()
    def teacher_forced_queries(self, src: Tensor, tgt: Tensor, memory: Memory) -> tuple[Tensor, Tensor]:
        """The memory's queries [N, m] and labels [N] of a teacher-forced pass that reads `memory`
        (the queries depend on the values read before them), without a gradient: for writing traffic."""
        if not self.cfg.extended or not self.cfg.use_memory or memory is None:
            raise ValueError("teacher_forced_queries: the model has no memory (or none was passed)")
        self._check_targets(src, tgt)
        return self._labelled(self._decode(self.encode(src), tgt.shape[1], memory, forced=tgt)[4], tgt)

    def _check_targets(self, src: Tensor, tgt: Tensor) -> None:
        check_tokens("tgt", tgt, self.cfg.out_vocab, rows=src.shape[0])
        if tgt.shape[1] > src.shape[1]:
            raise ValueError(f"tgt: expected at most {src.shape[1]} positions (the tape's length), got {tgt.shape[1]}")

    def _labelled(self, queries: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
        """The decoder's queries [T, B, m] (position-major) and their gold labels, padding left out:
        (queries [N, m], labels [N])."""
        labels = tgt.T
        keep = labels != self.cfg.pad
        return queries[keep], labels[keep]

    # -- decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def greedy(self, src: Tensor, length: int | None = None, memory: Memory | None = None,
               forced: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Greedy decoding: src [B, n] -> (tokens [B, T], logits [B, T, V]) for T = length (<= n;
        default n). The Neural GPU decodes every position at once; the extended one step by step,
        its own outputs onto p (forced [B, T]: those tokens instead, for tests), reading the memory."""
        B, n = src.shape
        T = n if length is None else length
        if not 0 < T <= n:
            raise ValueError(f"length: expected 1..{n} (the tape's length), got {T}")
        s = self.encode(src)
        if not self.cfg.extended:
            logits = self._logits(s[:, :, 0, :T].transpose(1, 2))
            return logits.argmax(-1), logits
        tokens, logits, *_ = self._decode(s, T, memory, forced)
        return tokens, logits

    def _decode(self, s: Tensor, T: int, memory: Memory | None, forced: Tensor | None,
                charged: list[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """The extended model's T decoder steps from the encoder's tape s: each output onto p is
        forced[:, t] (teacher forcing) or the argmax. Returns tokens [B, T], logits [B, T, V], the
        memory's values [B, T] (-1: none) and confidences [B, T], its queries [T, B, m] (None
        without a memory); the cells' charged pre-activations go to `charged`."""
        B = s.shape[0]
        d, p = s, torch.zeros_like(s)
        use_memory = self.cfg.use_memory and memory is not None
        # output t's memory value and confidence (lists: the logits keep each step's for backward)
        none = torch.full((B,), -1, dtype=torch.int64, device=s.device), torch.zeros(B, device=s.device)
        value, confidence, tokens, logits, queries = [], [], [], [], []
        for t in range(T):
            for position in ((0, 1) if t == 0 else (t + 1,)):  # before step t: position t + 1 (step 0: also 0)
                if position >= T:
                    continue
                if use_memory:
                    p, v, c, q = self._recall(d, p, position, memory)
                    queries.append(q)
                else:
                    v, c = none
                value.append(v)
                confidence.append(c)
            d = self._steps(self.decoder, d, p, charged)
            logits.append(self._logits(d[:, :, 0, t], value[t], confidence[t]))
            tokens.append(logits[-1].argmax(-1) if forced is None else forced[:, t])
            p = self._place(p, t, self.target_embed(tokens[-1]))
        return (torch.stack(tokens, 1), torch.stack(logits, 1), torch.stack(value, 1), torch.stack(confidence, 1),
                torch.stack(queries) if queries else None)


    def _recall(self, d: Tensor, p: Tensor, position: int,
                memory: Memory) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Query the memory from the decoder tape d at `position` and put the value's embedding
        onto p there. Returns (p, values [B], confidences [B], queries [B, m])."""
        q = self.queries(d, position)
        got = memory.query(q.detach(), k=min(self.cfg.recall_k, memory.config.k))  # the value: the nearest slot's
        value, confidence = got.prediction.to(d.device), got.confidence.to(d.device)
        return self._place(p, position, self.recalled(value)), value, confidence, q

    @torch.no_grad()
    def beam_search(self, src: Tensor, length: int | None = None, memory: Memory | None = None,
                    beam: int = 4) -> tuple[Tensor, Tensor]:
        """Extended model: beam search over T = length (<= n; default n) outputs, each hypothesis
        with its own decoder and output tapes (and memory reads). src [B, n] -> (tokens [B, T] of
        the best hypothesis, its log-probability [B]). beam=1 is greedy decoding."""
        if not self.cfg.extended:
            raise ValueError("beam_search: the Neural GPU decodes every position at once; use greedy")
        B, n = src.shape
        T = n if length is None else length
        if not 0 < T <= n or beam < 1:
            raise ValueError(f"length, beam: expected 1..{n} and >= 1, got {T} and {beam}")
        rows = torch.arange(B, device=src.device).repeat_interleave(beam)
        d = self.encode(src)[rows]
        p = torch.zeros_like(d)
        score = torch.full((B, beam), float("-inf"), device=src.device)
        score[:, 0] = 0.0  # one live hypothesis at the start
        tokens = torch.zeros(B * beam, 0, dtype=torch.int64, device=src.device)
        use_memory = self.cfg.use_memory and memory is not None
        value = torch.full((B * beam,), -1, dtype=torch.int64, device=src.device)  # output t's memory value
        confidence = torch.zeros(B * beam, device=src.device)
        if use_memory:  # output 0's value, from the encoder's tape
            p, value, confidence, _ = self._recall(d, p, 0, memory)
        for t in range(T):
            value_t, confidence_t = value, confidence
            if use_memory and t + 1 < T:
                p, value, confidence, _ = self._recall(d, p, t + 1, memory)
            d = self._steps(self.decoder, d, p)
            logp = torch.log_softmax(self._logits(d[:, :, 0, t], value_t, confidence_t), -1)  # (B * beam, V)
            V = logp.shape[-1]
            score, flat = (score[:, :, None] + logp.view(B, beam, V)).view(B, -1).topk(beam, dim=1)
            parent = (flat // V + torch.arange(B, device=src.device)[:, None] * beam).view(-1)
            token = (flat % V).view(-1)
            d, p = d[parent], self._place(p[parent], t, self.target_embed(token))
            value, confidence = value[parent], confidence[parent]
            tokens = torch.cat([tokens[parent], token[:, None]], 1)
        return tokens.view(B, beam, T)[:, 0], score[:, 0]


def _ce(logits: Tensor, tgt: Tensor | None, pad: int) -> Tensor | None:
    """Mean cross-entropy of logits [B, T, V] over the non-padding targets tgt [B, T]."""
    if tgt is None:
        return None
    return F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=pad)
