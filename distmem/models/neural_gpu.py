"""The Neural GPU (Kaiser & Sutskever 2016) and the Extended Neural GPU (Kaiser & Bengio 2016)
with the memory of Kaiser et al. (2017), the paper's Figure 3. Spec: shared/docs/neural-gpu.md.

The state is a tape s [B, m, h, n]: m = nmaps channels, h rows, n positions (the padded length).
The input's embedding fills row 0; each of n steps applies `nconvs` convolutional GRUs (CGRU,
shared by every step) to the whole tape.

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
  produces output t + 1 (then p[t + 1] is overwritten by the decided output). Output 0 has no
  memory value, as in the public code. The logits are tied to the target embedding, so a value
  the network copies from p raises its own logit, also for a token never emitted in training.

The model reads the memory only; the caller writes (`memory.write(out.read)`).
Shapes: src [B, n] int64 (0 = padding); tgt [B, T] int64 with T <= n (0 = padding).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    dropout: float = 0.0      # on the tape before every step (training only)
    gate_bias: float = 1.0    # initial bias of the CGRU gates: > 0 starts by keeping the state
    extended: bool = False    # with the decoder tape and the output tape
    use_memory: bool = False  # the memory of Figure 3 (extended only)
    pad: int = 0

    def __post_init__(self) -> None:
        for name in ("in_vocab", "out_vocab", "nmaps", "height", "kernel", "nconvs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel: expected an odd size (the tape keeps its shape), got {self.kernel}")
        if not 1.0 <= self.cutoff:
            raise ValueError(f"cutoff: expected >= 1 (1: the plain sigmoid), got {self.cutoff}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout}")
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


class CGRU(nn.Module):
    """Convolutional GRU: s [B, m, h, n] (and extra [B, e, h, n], the decoder's output tape,
    joined to every convolution's input) -> s' [B, m, h, n]:
    u = σ'(conv_u(s)), r = σ'(conv_r(s)), s' = u * s + (1 - u) * tanh(conv(r * s))."""

    def __init__(self, nmaps: int, kernel: int = 3, cutoff: float = 1.2, extra: int = 0,
                 gate_bias: float = 1.0) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.gates = nn.Conv2d(nmaps + extra, 2 * nmaps, kernel, padding=kernel // 2)  # u, r
        self.candidate = nn.Conv2d(nmaps + extra, nmaps, kernel, padding=kernel // 2)
        nn.init.constant_(self.gates.bias, gate_bias)  # start by keeping the state (the public code: 1.0)
        nn.init.zeros_(self.candidate.bias)

    def forward(self, s: Tensor, extra: Tensor | None = None) -> Tensor:
        u, r = cutoff_sigmoid(self.gates(s if extra is None else torch.cat([s, extra], 1)), self.cutoff).chunk(2, 1)
        c = torch.tanh(self.candidate(r * s if extra is None else torch.cat([r * s, extra], 1)))
        return u * s + (1 - u) * c


@dataclass
class NeuralGPUOutput:
    """logits [B, T, V]; ce: mean cross-entropy over non-padding targets; read: the memory read of
    the positions that had one (None without memory); value [B, T] (-1: none)."""

    logits: Tensor
    ce: Tensor | None
    read: MemoryRead | None
    value: Tensor

    @property
    def loss(self) -> Tensor:
        """Cross-entropy plus the memory loss."""
        return self.ce + self.read.loss if self.read is not None and self.read.loss is not None else self.ce


class NeuralGPU(nn.Module):
    """The Neural GPU, or with `extended=True` the Extended Neural GPU; `memory` is passed in."""

    def __init__(self, cfg: NeuralGPUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        m = cfg.nmaps
        self.embed = nn.Embedding(cfg.in_vocab, m, padding_idx=cfg.pad)
        self.encoder = nn.ModuleList(CGRU(m, cfg.kernel, cfg.cutoff, gate_bias=cfg.gate_bias)
                                     for _ in range(cfg.nconvs))
        if cfg.extended:
            self.target_embed = nn.Embedding(cfg.out_vocab, m, padding_idx=cfg.pad)  # also the output layer
            nn.init.normal_(self.target_embed.weight, std=m ** -0.5)  # logits of order 1 at the start
            self.target_embed.weight.data[cfg.pad] = 0
            self.decoder = nn.ModuleList(CGRU(m, cfg.kernel, cfg.cutoff, extra=m, gate_bias=cfg.gate_bias)
                                         for _ in range(cfg.nconvs))
        else:
            self.output = nn.Linear(m, cfg.out_vocab)
        if cfg.use_memory:
            self.memory_layer = MemoryLayer(m)

    # -- building blocks -------------------------------------------------------------------------
    def _steps(self, cgrus: nn.ModuleList, s: Tensor, extra: Tensor | None = None) -> Tensor:
        s = F.dropout(s, self.cfg.dropout, self.training)
        for cgru in cgrus:
            s = cgru(s, extra)
        return s

    def encode(self, src: Tensor) -> Tensor:
        """src [B, n] -> the final tape [B, m, h, n] after n steps."""
        check_tokens("src", src, self.cfg.in_vocab)
        B, n = src.shape
        s = self.embed(src).transpose(1, 2)[:, :, None]  # (B, m, 1, n): row 0
        s = F.pad(s, (0, 0, 0, self.cfg.height - 1))     # rows 1..h-1: zeros
        for _ in range(n):
            s = self._steps(self.encoder, s)
        return s

    def _logits(self, row: Tensor) -> Tensor:
        """Row-0 cells [..., m] -> logits [..., V] (extended: tied to the target embedding)."""
        return row @ self.target_embed.weight.T if self.cfg.extended else self.output(row)

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
    def forward(self, src: Tensor, tgt: Tensor | None = None, memory: Memory | None = None) -> NeuralGPUOutput:
        """Neural GPU: logits [B, n, V] of every position (tgt [B, n] gives the loss).
        Extended: teacher-forced decoding of tgt [B, T] (T <= n), reading the memory with the
        gold outputs as labels."""
        B, n = src.shape
        if tgt is not None:
            check_tokens("tgt", tgt, self.cfg.out_vocab, rows=B)
            if tgt.shape[1] > n:
                raise ValueError(f"tgt: expected at most {n} positions (the tape's length), got {tgt.shape[1]}")
        s = self.encode(src)
        if not self.cfg.extended:
            logits = self._logits(s[:, :, 0].transpose(1, 2))  # (B, n, V)
            if tgt is not None and tgt.shape[1] < n:
                tgt = F.pad(tgt, (0, n - tgt.shape[1]))
            value = torch.full((B, n), -1, dtype=torch.int64, device=src.device)
            return NeuralGPUOutput(logits, _ce(logits, tgt, self.cfg.pad), None, value)
        if tgt is None:
            raise ValueError("tgt: the Extended Neural GPU's teacher-forced pass needs the targets [B, T]")
        _, logits, value, queries = self._decode(s, tgt.shape[1], memory, forced=tgt)
        read = None
        if queries is not None:  # one read of every query (step-major): the memory loss and the write's plan
            labels = tgt[:, 1:].T  # (T - 1, B)
            keep = labels != self.cfg.pad
            read = memory.read(queries[keep], labels[keep])
        return NeuralGPUOutput(logits, _ce(logits, tgt, self.cfg.pad), read, value)

    @torch.no_grad()
    def teacher_forced_queries(self, src: Tensor, tgt: Tensor, memory: Memory) -> tuple[Tensor, Tensor]:
        """The memory's queries [N, m] and labels [N] of a teacher-forced pass that reads `memory`
        (the queries depend on the values read before them), without a gradient: for writing traffic."""
        out = self(src, tgt, memory)
        if out.read is None:
            raise ValueError("teacher_forced_queries: the model has no memory or the targets are one long")
        return out.read.query, out.read.labels

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
        tokens, logits, _, _ = self._decode(s, T, memory, forced)
        return tokens, logits

    def _decode(self, s: Tensor, T: int, memory: Memory | None,
                forced: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The extended model's T decoder steps from the encoder's tape s: each output onto p is
        forced[:, t] (teacher forcing) or the argmax. Returns tokens [B, T], logits [B, T, V], the
        memory's values [B, T] (-1: none) and its queries [T - 1, B, m] (None without a memory)."""
        B = s.shape[0]
        d, p = s, torch.zeros_like(s)
        use_memory = self.cfg.use_memory and memory is not None
        value = torch.full((B, T), -1, dtype=torch.int64, device=s.device)
        tokens, logits, queries = [], [], []
        for t in range(T):
            if use_memory and t + 1 < T:
                p, value[:, t + 1], q = self._recall_next(d, p, t, memory)
                queries.append(q)
            d = self._steps(self.decoder, d, p)
            logits.append(self._logits(d[:, :, 0, t]))
            tokens.append(logits[-1].argmax(-1) if forced is None else forced[:, t])
            p = self._place(p, t, self.target_embed(tokens[-1]))
        return torch.stack(tokens, 1), torch.stack(logits, 1), value, torch.stack(queries) if queries else None


    def _recall_next(self, d: Tensor, p: Tensor, t: int, memory: Memory) -> tuple[Tensor, Tensor, Tensor]:
        """Before decoder step t: query the memory from d at position t + 1 and put the value's
        embedding onto p there. Returns (p, values [B], queries [B, m])."""
        q = self.queries(d, t + 1)
        got = memory.query(q.detach(), k=1).prediction.to(d.device)  # the value is the nearest slot's: top-1
        return self._place(p, t + 1, self.recalled(got)), got, q

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
        for t in range(T):
            if self.cfg.use_memory and memory is not None and t + 1 < T:
                p = self._recall_next(d, p, t, memory)[0]
            d = self._steps(self.decoder, d, p)
            logp = torch.log_softmax(self._logits(d[:, :, 0, t]), -1)  # (B * beam, V)
            V = logp.shape[-1]
            score, flat = (score[:, :, None] + logp.view(B, beam, V)).view(B, -1).topk(beam, dim=1)
            parent = (flat // V + torch.arange(B, device=src.device)[:, None] * beam).view(-1)
            token = (flat % V).view(-1)
            d, p = d[parent], self._place(p[parent], t, self.target_embed(token))
            tokens = torch.cat([tokens[parent], token[:, None]], 1)
        return tokens.view(B, beam, T)[:, 0], score[:, 0]


def _ce(logits: Tensor, tgt: Tensor | None, pad: int) -> Tensor | None:
    """Mean cross-entropy of logits [B, T, V] over the non-padding targets tgt [B, T]."""
    if tgt is None:
        return None
    return F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=pad)
