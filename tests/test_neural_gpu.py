"""The (Extended) Neural GPU: the CGRU against a hand-computed case, the cut-off sigmoid, shapes,
incremental decoding against the teacher-forced pass, and where the memory is queried and where
its value lands on the output tape (with 1x1 kernels positions do not mix, so a shift by one
shows)."""

import math

import pytest
import torch

from distmem import LocalMemory, MemoryConfig
from distmem.models.neural_gpu import (
    CGRU,
    DCGRU,
    NeuralGPU,
    NeuralGPUConfig,
    cutoff_sigmoid,
    hard_sigmoid,
    saturation_cost,
)

IN, OUT = 6, 7


def model(seed=0, **kw) -> NeuralGPU:
    torch.manual_seed(seed)
    return NeuralGPU(NeuralGPUConfig(in_vocab=IN, out_vocab=OUT, nmaps=8, height=2, **kw)).eval()


def tokens(b, n, vocab, seed=0):
    return torch.randint(1, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


def test_the_cutoff_sigmoid_reaches_0_and_1_and_is_1_2_sigmoid_minus_0_1_between():
    x = torch.tensor([-10.0, -1.0, 0.0, 1.0, 10.0])
    y = cutoff_sigmoid(x)
    assert y[0] == 0.0 and y[-1] == 1.0 and y[2] == 0.5
    torch.testing.assert_close(y[1:4], 1.2 * torch.sigmoid(x[1:4]) - 0.1)
    torch.testing.assert_close(cutoff_sigmoid(x, 1.0), torch.sigmoid(x))


def test_a_cgru_cell_by_hand():
    """One channel, 1x1 kernels: u = σ'(a s + b), r = σ'(c s + d), s' = u s + (1 - u) tanh(e r s + f)."""
    cell = CGRU(1, kernel=1)
    a, b, c, d, e, f = 0.5, 0.2, -1.0, 0.3, 2.0, -0.1
    with torch.no_grad():
        cell.gates.weight.copy_(torch.tensor([a, c]).view(2, 1, 1, 1))
        cell.gates.bias.copy_(torch.tensor([b, d]))
        cell.candidate.weight.fill_(e)
        cell.candidate.bias.fill_(f)
    s = torch.tensor([0.7, -0.4, 1.5]).view(1, 1, 1, 3)
    out, charged = cell(s)
    out = out.flatten().tolist()
    assert charged == ()  # no saturation cost
    for x, y in zip(s.flatten().tolist(), out):
        u = min(1.0, max(0.0, 1.2 / (1 + math.exp(-(a * x + b))) - 0.1))
        r = min(1.0, max(0.0, 1.2 / (1 + math.exp(-(c * x + d))) - 0.1))
        assert y == pytest.approx(u * x + (1 - u) * math.tanh(e * r * x + f), abs=1e-6)
    tape = torch.randn(2, 8, 3, 5)
    assert CGRU(8)(tape)[0].shape == tape.shape
    assert CGRU(8, extra=8)(tape, torch.randn(2, 8, 3, 5))[0].shape == tape.shape


def test_a_diagonal_cgru_cell_by_hand():
    """Three channels (one kept, one shifted right, one shifted left), 1x1 kernels, one row:
    u = hσ(W_u s + b_u), r = hσ(W_r s + b_r), c = htanh(W_c (r s) + b_c), s'_i = u_i shift(s)_i + (1 - u_i) c_i,
    and the saturation cost of its charged pre-activations sums relu(|pre| - 0.9) of the three
    pre-activations over channels, mean over cells."""
    torch.manual_seed(0)
    cell = DCGRU(3, kernel=1, height=1)
    s = torch.tensor([[0.5, -0.2, 0.9, 0.1], [0.3, 0.8, -0.6, 0.4], [-0.7, 0.2, 0.6, -0.1]]).view(1, 3, 1, 4)

    def cost(charged):
        return saturation_cost(torch.cat(charged, 1))

    out, charged = cell(s)
    Wg, bg = cell.gates.weight[:, :, 0, 0], cell.gates.bias
    Wc, bc = cell.candidate.weight[:, :, 0, 0], cell.candidate.bias
    x = s[0, :, 0]  # (3, 4): channel, position
    shifted = torch.stack([x[0], torch.cat([torch.zeros(1), x[1, :-1]]), torch.cat([x[2, 1:], torch.zeros(1)])])
    g = Wg @ x + bg[:, None]
    u, r = g[:3].mul(0.5).add(0.5).clamp(0, 1), g[3:].mul(0.5).add(0.5).clamp(0, 1)
    pre = Wc @ (r * x) + bc[:, None]
    want = u * shifted + (1 - u) * pre.clamp(-1, 1)
    torch.testing.assert_close(out[0, :, 0], want)
    sat = ((g.abs() - 0.9).clamp(min=0).sum(0).mean() + (pre.abs() - 0.9).clamp(min=0).sum(0).mean())
    torch.testing.assert_close(cost(charged), sat)
    torch.testing.assert_close(cost(charged), saturation_cost(charged[0]) + saturation_cost(charged[1]))
    # biases start at u = 0.85, r = 0.75; a state within the linear range costs nothing
    torch.testing.assert_close(hard_sigmoid(bg), torch.tensor([0.85] * 3 + [0.75] * 3))
    with torch.no_grad():
        cell.gates.weight.zero_()
        cell.candidate.weight.zero_()
    assert cost(cell(s)[1]) == 0
    # a kept gate (u = 1) moves the shifted channels along the tape, one position a step
    with torch.no_grad():
        cell.gates.bias.fill_(5.0)
    moved, _ = cell(s)
    torch.testing.assert_close(moved[0, :, 0], shifted)
    assert cost(cell(s)[1]) > 0  # a bias of 5 is saturated


def test_snap_rounds_update_gates_near_0_or_1_at_inference_only():
    """With snap 0.05 and constant gates u = (0.97, 0.02, 0.75), r = 0.75: in eval mode the first
    channel keeps its state exactly (u -> 1), the second takes the candidate (u -> 0), the third
    mixes as before; in training, and with snap 0, nothing is rounded."""
    torch.manual_seed(0)
    cell = DCGRU(3, kernel=1, height=1, snap=0.05)
    s = torch.tensor([[0.5, -0.2, 0.9, 0.1], [0.3, 0.8, -0.6, 0.4], [-0.7, 0.2, 0.6, -0.1]]).view(1, 3, 1, 4)
    with torch.no_grad():
        cell.gates.weight.zero_()
        cell.gates.bias.copy_(torch.tensor([0.94, -0.96, 0.5, 0.5, 0.5, 0.5]))
    x = s[0, :, 0]
    shifted = torch.stack([x[0], torch.cat([torch.zeros(1), x[1, :-1]]), torch.cat([x[2, 1:], torch.zeros(1)])])
    c = (cell.candidate.weight[:, :, 0, 0] @ (0.75 * x) + cell.candidate.bias[:, None]).clamp(-1, 1)

    def mixed(u):
        return torch.tensor(u)[:, None] * shifted + (1 - torch.tensor(u)[:, None]) * c

    torch.testing.assert_close(cell.eval()(s)[0][0, :, 0], mixed([1.0, 0.0, 0.75]))
    torch.testing.assert_close(cell.train()(s)[0][0, :, 0], mixed([0.97, 0.02, 0.75]))
    cell.snap = 0.0
    torch.testing.assert_close(cell.eval()(s)[0][0, :, 0], mixed([0.97, 0.02, 0.75]))


def test_snap_in_training_rounds_forward_and_passes_the_gradient_straight_through():
    """With snap_training set, training rounds u = (0.97, 0.02, 0.75) as inference does, and the
    gradient reaches the gates' bias as if unrounded: d out / d u_i = shift(s)_i - c_i, times the
    hard sigmoid's slope 3 / 6 = 1/2 inside its range (the rounded channels would get 0 from a plain
    torch.where). NeuralGPU.snap_in_training sets it on every cell."""
    cell = DCGRU(3, kernel=1, height=1, snap=0.05)
    s = torch.tensor([[0.5, -0.2, 0.9, 0.1], [0.3, 0.8, -0.6, 0.4], [-0.7, 0.2, 0.6, -0.1]]).view(1, 3, 1, 4)
    with torch.no_grad():
        cell.gates.weight.zero_()
        cell.gates.bias.copy_(torch.tensor([0.94, -0.96, 0.5, 0.5, 0.5, 0.5]))
    cell.snap_training = True
    out = cell.train()(s)[0]
    torch.testing.assert_close(out, cell.eval()(s)[0])
    out.sum().backward()
    x = s[0, :, 0]
    shifted = torch.stack([x[0], torch.cat([torch.zeros(1), x[1, :-1]]), torch.cat([x[2, 1:], torch.zeros(1)])])
    c = (cell.candidate.weight[:, :, 0, 0] @ (0.75 * x) + cell.candidate.bias[:, None]).clamp(-1, 1)
    torch.testing.assert_close(cell.gates.bias.grad[:3], 0.5 * (shifted - c).sum(1).detach())
    model = NeuralGPU(NeuralGPUConfig(in_vocab=IN, out_vocab=OUT, cell="dcgru", nmaps=6, height=1, snap=0.1))
    model.snap_in_training(True)
    assert all(m.snap_training for m in model.modules() if isinstance(m, DCGRU))


def test_a_one_row_tape_gets_one_row_kernels():
    assert CGRU(4, kernel=3, height=1).gates.weight.shape[-2:] == (1, 3)
    assert CGRU(4, kernel=3, height=4).gates.weight.shape[-2:] == (3, 3)
    assert DCGRU(6, kernel=3, height=1).candidate.weight.shape[-2:] == (1, 3)


def test_shapes_and_errors():
    src, tgt = tokens(3, 5, IN), tokens(3, 5, OUT, seed=1)
    plain = model()
    out = plain(src, tgt)
    assert out.logits.shape == (3, 5, OUT) and torch.isfinite(out.ce) and out.read is None
    assert torch.equal(plain.greedy(src)[0], out.logits.argmax(-1))
    ext = model(extended=True)
    assert ext(src, tgt[:, :4]).logits.shape == (3, 4, OUT)
    with pytest.raises(ValueError, match="at most 5 positions"):
        ext(src, tokens(3, 6, OUT))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 6\)"):
        ext(src + 1, tgt)
    with pytest.raises(TypeError, match="int64"):
        ext(src.float(), tgt)
    with pytest.raises(ValueError, match="extended"):
        NeuralGPUConfig(in_vocab=IN, out_vocab=OUT, use_memory=True)
    with pytest.raises(ValueError, match="kernel"):
        NeuralGPUConfig(in_vocab=IN, out_vocab=OUT, kernel=2)
    with pytest.raises(ValueError, match="cell: expected 'cgru' or 'dcgru'"):
        NeuralGPUConfig(in_vocab=IN, out_vocab=OUT, cell="lstm")
    with pytest.raises(ValueError, match="saturation"):
        NeuralGPUConfig(in_vocab=IN, out_vocab=OUT, saturation=-1.0)
    with pytest.raises(ValueError, match=r"snap: expected a value in \[0, 0.5\)"):
        NeuralGPUConfig(in_vocab=IN, out_vocab=OUT, cell="dcgru", snap=0.5)
    with pytest.raises(ValueError, match="snap: the snapped update gate is the dcgru's"):
        NeuralGPUConfig(in_vocab=IN, out_vocab=OUT, snap=0.05)


def test_the_saturation_cost_joins_the_loss_with_its_weight():
    src, tgt = tokens(3, 5, IN), tokens(3, 5, OUT, seed=1)
    for extended in (False, True):
        plain = model(extended=extended, cell="dcgru")
        weighted = model(extended=extended, cell="dcgru", saturation=0.5)
        with torch.no_grad():  # larger weights: pre-activations past the hard gates' linear range
            for p in [*plain.parameters(), *weighted.parameters()]:
                p.mul_(4)
        a, b = plain(src, tgt), weighted(src, tgt)
        torch.testing.assert_close(a.logits, b.logits)  # same seed, same weights: the weight changes only the loss
        assert a.saturation == 0 and b.saturation > 0
        torch.testing.assert_close(b.loss, b.ce + b.saturation)
        assert model(extended=extended).forward(src, tgt).saturation == 0  # the cgru has none


@pytest.mark.parametrize("extra", [0, 3])
def test_the_saturation_cost_of_a_pass_is_the_mean_of_every_cell_use_s_cost(extra):
    """The model charges a whole pass's pre-activations at once; the oracle sums each cell use's
    own cost (recorded by hooks) and the embedded input's, over the (n + extra) * nconvs
    (+ T * nconvs) uses."""
    src, tgt = tokens(3, 5, IN), tokens(3, 4, OUT, seed=1)
    for extended in (False, True):
        net = model(extended=extended, cell="dcgru", saturation=0.5)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(4)
        uses = []
        hooks = [cell.register_forward_hook(lambda _m, _i, out, uses=uses: uses.append(out[1]))
                 for cell in net.modules() if isinstance(cell, DCGRU)]
        out = net(src, tgt, extra_steps=extra)
        for hook in hooks:
            hook.remove()
        assert len(uses) == 2 * (5 + extra + (4 if extended else 0))
        embedded = net.embed(src).transpose(1, 2)[:, :, None]  # row 0 of the tape, before its clip
        want = saturation_cost(embedded) + sum(saturation_cost(pre) for gates_pre in uses for pre in gates_pre)
        torch.testing.assert_close(out.saturation, 0.5 * want / len(uses))
        assert out.saturation > 0


def test_extra_steps_run_the_encoder_beyond_the_length():
    """Oracle: the tape after n + r explicit steps (their saturation cost: the test above)."""
    src, tgt = tokens(3, 5, IN), tokens(3, 5, OUT, seed=1)
    net = model(cell="dcgru", saturation=0.5)
    torch.testing.assert_close(net(src, tgt, extra_steps=0).logits, net(src, tgt).logits)
    s = net.embed(src).transpose(1, 2)[:, :, None].clamp(-1, 1)
    s = torch.nn.functional.pad(s, (0, 0, 0, 1))
    for _ in range(5 + 3):
        s = net._steps(net.encoder, s)
    out = net(src, tgt, extra_steps=3)
    torch.testing.assert_close(out.logits, net.output(s[:, :, 0].transpose(1, 2)))
    assert not torch.allclose(out.logits, net(src, tgt).logits)
    with pytest.raises(ValueError, match="extra_steps: expected >= 0"):
        net(src, tgt, extra_steps=-1)


def _memory(size=64, k=4) -> LocalMemory:
    return LocalMemory(MemoryConfig(size=size, key_dim=8, k=k, age_noise=0.0), device="cpu")


@pytest.mark.parametrize("cell", ["cgru", "dcgru"])
def test_step_by_step_decoding_equals_the_teacher_forced_pass(cell):
    net = model(extended=True, use_memory=True, cell=cell, saturation=1e-3)
    src, tgt = tokens(4, 6, IN, seed=2), tokens(4, 6, OUT, seed=3)
    mem = _memory()
    mem.step(torch.nn.functional.normalize(torch.randn(30, 8), dim=-1), torch.randint(1, OUT, (30,)))
    teacher = net(src, tgt, mem)
    _, logits = net.greedy(src, length=6, memory=mem, forced=tgt)
    torch.testing.assert_close(logits, teacher.logits, rtol=1e-5, atol=1e-5)
    assert (teacher.value >= 0).all()  # every output has a memory value (output 0: from the encoder's tape)
    free, _ = net.greedy(src, length=6, memory=mem)
    assert torch.equal(free[:, 0], teacher.logits[:, 0].argmax(-1))  # the first step depends on nothing decided


def test_beam_search_scores_its_hypothesis_and_beam_1_is_greedy():
    net = model(extended=True, use_memory=True)
    src = tokens(5, 7, IN, seed=4)
    mem = _memory()
    mem.step(torch.nn.functional.normalize(torch.randn(30, 8), dim=-1), torch.randint(1, OUT, (30,)))

    def log_prob(out):  # the teacher-forced pass over a hypothesis: the oracle of its score
        logp = torch.log_softmax(net(src, out, mem).logits, -1)
        return logp.gather(2, out[:, :, None])[:, :, 0].sum(1)

    greedy, _ = net.greedy(src, length=6, memory=mem)
    one, one_score = net.beam_search(src, length=6, memory=mem, beam=1)
    assert torch.equal(one, greedy)
    best, score = net.beam_search(src, length=6, memory=mem, beam=4)
    assert best.shape == (5, 6)
    torch.testing.assert_close(score, log_prob(best), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one_score, log_prob(greedy), rtol=1e-4, atol=1e-4)
    assert (score >= one_score - 1e-5).all()
    with pytest.raises(ValueError, match="decodes every position at once"):
        model().beam_search(src)


class RecordingMemory(LocalMemory):
    """A LocalMemory that keeps every query it answers."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.asked: list[torch.Tensor] = []

    def query(self, q, k=None):
        self.asked.append(q.detach().clone())
        return super().query(q, k)


@pytest.mark.parametrize("gain", [0.0, 20.0])  # the value through p only (the paper's wiring), and also direct
def test_the_memory_is_queried_at_the_next_position_and_its_value_lands_there(gain):
    """With 1x1 kernels a tape position never sees its neighbours, so (1) the query of decoder
    step t depends on the input at position t + 1 only (step 0 also asks for position 0), and (2) a
    memory value that only the query of position j finds changes the logits of output j only."""
    net = model(extended=True, use_memory=True, kernel=1, memory_gain=gain)
    src, tgt = tokens(1, 6, IN, seed=4), tokens(1, 6, OUT, seed=5)
    mem = RecordingMemory(MemoryConfig(size=64, key_dim=8, k=1, age_noise=0.0), device="cpu")
    net(src, tgt, mem)
    asked = torch.cat(mem.asked)  # (6, 8): step 0 asks for positions 0 and 1, steps 1..4 for 2..5
    assert asked.shape == (6, 8)
    for j in range(6):
        changed = src.clone()
        changed[0, j] = changed[0, j] % (IN - 1) + 1
        mem.asked.clear()
        net(changed, tgt, mem)
        moved = (torch.cat(mem.asked) - asked).abs().sum(1) > 1e-6
        assert moved.tolist() == [i == j for i in range(6)], j
    def with_labels(labels):  # a memory holding each asked query with its own label
        mem = _memory(k=1)
        mem.step(asked, torch.tensor(labels))
        return net(src, tgt, mem)

    base = with_labels([1] * 6)
    assert (base.value[0] == 1).all()
    for j in range(6):
        out = with_labels([OUT - 1 if i == j else 1 for i in range(6)])  # position j's value only differs
        assert out.value[0].tolist() == [OUT - 1 if i == j else 1 for i in range(6)]
        differs = (out.logits - base.logits).abs().amax(-1)[0] > 1e-6
        assert differs.tolist() == [i == j for i in range(6)], j


def test_the_value_s_direct_path_adds_gain_times_confidence_to_its_logit():
    """Doubling the gain adds gain * confidence to the logit of every output's value, and nothing
    to any other logit."""
    net = model(extended=True, use_memory=True)
    src, tgt = tokens(3, 6, IN, seed=6), tokens(3, 6, OUT, seed=7)
    mem = _memory()
    mem.step(torch.nn.functional.normalize(torch.randn(30, 8), dim=-1), torch.randint(1, OUT, (30,)))
    base = net(src, tgt, mem)
    assert ((base.confidence > 0) & (base.confidence <= 1)).all()
    gain = float(net.memory_log_gain.detach().exp())
    with torch.no_grad():
        net.memory_log_gain += math.log(2.0)
    doubled = net(src, tgt, mem)
    assert torch.equal(doubled.value, base.value)
    expected = torch.zeros_like(base.logits)
    for b in range(3):  # one logit per output, by hand
        for t in range(6):
            expected[b, t, base.value[b, t]] = gain * base.confidence[b, t]
    torch.testing.assert_close(doubled.logits - base.logits, expected, rtol=1e-4, atol=1e-4)
    doubled.loss.backward()  # training reaches the gain (and backward survives the decoder's reads)
    assert net.memory_log_gain.grad is not None and net.memory_log_gain.grad != 0
    with pytest.raises(ValueError, match="memory_gain"):
        NeuralGPUConfig(in_vocab=IN, out_vocab=OUT, extended=True, use_memory=True, memory_gain=-1.0)


def test_teacher_forced_queries_are_the_training_pass_s_reads():
    net = model(extended=True, use_memory=True)
    src, tgt = tokens(3, 6, IN, seed=8), tokens(3, 5, OUT, seed=9)
    tgt[0, 3:] = 0  # padding is not written
    mem = _memory()
    mem.step(torch.nn.functional.normalize(torch.randn(30, 8), dim=-1), torch.randint(1, OUT, (30,)))
    out = net(src, tgt, mem)
    queries, labels = net.teacher_forced_queries(src, tgt, mem)
    torch.testing.assert_close(queries, out.read.query)
    assert torch.equal(labels, out.read.labels) and len(labels) == 3 * 5 - 2
    with pytest.raises(ValueError, match="no memory"):
        model(extended=True).teacher_forced_queries(src, tgt, mem)
