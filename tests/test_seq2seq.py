"""The GNMT-style model with memory: shapes, padding, where the memory loss's gradient goes, beam
search against an exhaustive search, and decoding that recalls a written token."""

import itertools
import math

import pytest
import torch

from distmem import LocalMemory, MemoryConfig
from distmem.models.seq2seq import Seq2Seq, Seq2SeqConfig
from distmem.tasks.rare_symbols.data import RareSymbolTask, TrainingStream
from distmem.tasks.rare_symbols.training import to_tensors, train_step

SRC, TGT, BOS, EOS = 30, 33, 31, 32  # source ids 1..29, target ids 1..30, BOS, EOS; 0 is padding


def model(seed=0, **kw) -> Seq2Seq:
    torch.manual_seed(seed)
    return Seq2Seq(Seq2SeqConfig(src_vocab=SRC, tgt_vocab=TGT, bos=BOS, eos=EOS, hidden=16, **kw))


def batch(b=3, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(1, SRC, (b, length), generator=g)
    y = torch.randint(1, 31, (b, length), generator=g)
    tgt_out = torch.cat([y, torch.full((b, 1), EOS)], 1)
    tgt_in = torch.cat([torch.full((b, 1), BOS), y], 1)
    return src, tgt_in, tgt_out


def memory(size=64, k=4) -> LocalMemory:
    return LocalMemory(MemoryConfig(size=size, key_dim=16, k=k, age_noise=0.0), device="cpu")


def test_shapes_and_padding():
    net = model(encoder_layers=3, decoder_layers=3)
    src, tgt_in, tgt_out = batch()
    out = net(src, tgt_in, tgt_out, memory())
    assert out.logits.shape == (int(out.mask.sum()), TGT) and out.value.shape == out.confidence.shape == (3, 6)
    assert out.read.query.shape == (18, 16) and torch.isfinite(out.loss)
    padded = torch.cat([src[:1], torch.zeros(1, 3, dtype=torch.int64)], 1)  # the same sequence, 3 pads after it
    assert torch.allclose(net.encoder(padded)[:, :5], net.encoder(src[:1]), atol=1e-6)
    with pytest.raises(ValueError, match="hidden must be even"):
        Seq2SeqConfig(src_vocab=SRC, tgt_vocab=TGT, bos=BOS, eos=EOS, hidden=15)


def test_the_memory_loss_reaches_the_attention_and_the_encoder_never_the_keys():
    net = model()
    mem = memory()
    src, tgt_in, tgt_out = batch()
    mem.write(net(src, tgt_in, tgt_out, mem).read)  # a memory holding this batch's own labels
    keys_before = mem.keys.clone()
    out = net(src, tgt_in, tgt_out, mem)
    net.zero_grad()
    out.read.loss.backward()  # the memory loss alone
    grads = {name: p.grad for name, p in net.named_parameters()}
    for name in ("memory_layer.query_proj.weight", "attention.query.weight", "attention.key.weight",
                 "bottom.weight_ih_l0", "encoder.bottom.weight_ih_l0"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    used = grads["encoder.embed.weight"].abs().sum(1) > 0  # the source tokens of the batch, and only they
    assert set(torch.nonzero(used).flatten().tolist()) == set(src.flatten().tolist())
    for name in ("context_out.weight", "memory_log_gain"):  # the output side is not in the memory loss
        assert grads[name] is None or grads[name].abs().sum() == 0, name
    assert torch.equal(mem.keys, keys_before) and not mem.keys.requires_grad
    net.zero_grad()
    out = net(src, tgt_in, tgt_out, mem)
    out.ce.backward()  # the recalled value's embedding: the gain learns from the cross-entropy
    assert out.confidence.min() > 0 and net.memory_log_gain.grad.abs() > 0


@pytest.mark.parametrize("bad, message", [
    (lambda src, ti, to: (src.float(), ti, to), "src must be an int64"),
    (lambda src, ti, to: (src, ti[:2], to), "tgt_in must have 3 rows"),
    (lambda src, ti, to: (src, ti, to[:, :-1]), "tgt_out must have the shape"),
    (lambda src, ti, to: (src + SRC, ti, to), r"src ids must be in \[0, 30\)"),
    (lambda src, ti, to: (src, ti, to - 40), r"tgt_out ids must be in \[0, 33\)"),
])
def test_bad_tokens_are_refused_by_name_and_the_memory_is_untouched(bad, message):
    net, mem = model(), memory()
    mem.step(torch.nn.functional.normalize(torch.randn(8, 16), dim=-1), torch.randint(1, 31, (8,)))
    before = mem.state()
    with pytest.raises((TypeError, ValueError), match=message):
        net(*bad(*batch()), mem)
    assert all(torch.equal(v, before[k]) for k, v in mem.state().items())
    with pytest.raises(TypeError, match="src must be an int64"):
        net.greedy(batch()[0].float(), mem)


def test_a_model_without_memory_has_no_memory_parameters_and_reads_none():
    net = model(use_memory=False)
    assert not any("memory" in name for name, _ in net.named_parameters())
    src, tgt_in, tgt_out = batch()
    out = net(src, tgt_in, tgt_out, memory())
    assert out.read is None and (out.value == -1).all() and torch.equal(out.loss, out.ce)


def test_the_objective_is_pytorchs_label_smoothed_cross_entropy_over_the_non_padding_positions():
    net = model(use_memory=False)
    src, tgt_in, tgt_out = batch()
    tgt_in[0, 4:], tgt_out[0, 4:] = 0, 0  # a shorter first target
    out = net(src, tgt_in, tgt_out, label_smoothing=0.1)
    plain = net(src, tgt_in, tgt_out)
    assert out.logits.shape == (16, TGT) and torch.equal(out.mask, tgt_out != 0)
    full = out.padded(out.logits)  # the oracle: PyTorch's loss over [B, T, V] with padding ignored
    expected = torch.nn.functional.cross_entropy(full.transpose(1, 2), tgt_out, ignore_index=0, label_smoothing=0.1)
    torch.testing.assert_close(out.objective, expected)
    torch.testing.assert_close(out.ce, torch.nn.functional.cross_entropy(full.transpose(1, 2), tgt_out, ignore_index=0))
    assert torch.equal(plain.loss, plain.ce) and not torch.allclose(out.loss, out.ce)
    with pytest.raises(ValueError, match="label_smoothing"):
        net(src, tgt_in, tgt_out, label_smoothing=1.0)


def test_step_by_step_decoding_equals_the_teacher_forced_pass():
    """The incremental decoder (LSTM states, the relative-position bias at each step's offset, the
    memory read) computes what the teacher-forced pass does over the whole sequence."""
    net = model(alignment_window=2, alignment_prior=2.0)
    with torch.no_grad():
        net.attention.relative.normal_()  # every offset its own bias
    src, tgt_in, tgt_out = batch(length=6)
    mem = memory()
    mem.step(torch.nn.functional.normalize(torch.randn(40, 16), dim=-1), torch.randint(1, 31, (40,)))
    out = net(src, tgt_in, None, mem)
    full = out.padded(torch.log_softmax(out.logits, -1))
    state = net.encode(src)
    for t in range(tgt_in.shape[1]):
        logp, _, state = net._step(tgt_in[:, t], state, mem)
        torch.testing.assert_close(logp, full[:, t], rtol=1e-4, atol=1e-4)


def test_greedy_decodes_each_row_as_it_would_alone():
    """The protocol decodes the probes of a model without memory together, in large batches: a
    row's tokens do not depend on the rows beside it, nor on when those end."""
    net = model(seed=1, use_memory=False).eval()
    with torch.no_grad():
        net.embed.weight[EOS] *= 10  # a large EOS logit, either sign: some rows end early, some never
    src = batch(b=12, length=5, seed=4)[0]
    together = net.greedy(src, max_len=8)
    ends = (together == EOS).any(1)
    assert ends.any() and not ends.all()
    for r in range(len(src)):
        alone = net.greedy(src[r:r + 1], max_len=8)[0]
        assert torch.equal(together[r, :len(alone)], alone) and (together[r, len(alone):] == 0).all()


def test_beam_search_finds_the_exhaustive_best_and_beam_one_is_greedy():
    V, bos, eos = 6, 4, 5  # targets 1..3, BOS, EOS: few enough to score every hypothesis
    torch.manual_seed(2)
    net = Seq2Seq(Seq2SeqConfig(src_vocab=SRC, tgt_vocab=V, bos=bos, eos=eos, hidden=16, use_memory=False))
    src = torch.randint(1, SRC, (2, 2), generator=torch.Generator().manual_seed(1))
    assert torch.equal(net.beam_search(src, beam=1, max_len=3), net.greedy(src, max_len=3))
    best = net.beam_search(src, beam=64, max_len=3)  # wider than the hypotheses: nothing is pruned
    tokens = [t for t in range(1, V) if t != eos]
    hypotheses = [(*prefix, eos) for n in range(3) for prefix in itertools.product(tokens, repeat=n)]
    hypotheses += [(*prefix, t) for prefix in itertools.product(tokens, repeat=2) for t in tokens]  # cut at max_len
    for row in range(2):
        def score(seq, row=row):
            out = torch.tensor([seq])
            tgt_in = torch.cat([torch.tensor([[bos]]), out[:, :-1]], 1)
            res = net(src[row:row + 1], tgt_in)
            logp = res.padded(torch.log_softmax(res.logits, -1))
            return float(logp[0, torch.arange(len(seq)), out[0]].sum().detach())
        assert tuple(t for t in best[row].tolist() if t != 0) == max(hypotheses, key=score)


@pytest.fixture(scope="module")
def aligned():
    """A small model trained (without memory) on a small rare-symbol task until its attention aligns,
    and that task. Its memory gain is then set high: the recalled value decides where it is confident."""
    task = RareSymbolTask(vocab=SRC - 1, frequent=20, rare_train_end=25, length=6)
    torch.manual_seed(0)
    net = Seq2Seq(Seq2SeqConfig(src_vocab=task.vocab + 1, tgt_vocab=task.target_vocab, bos=task.bos, eos=task.eos,
                                hidden=32))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    stream = TrainingStream(task, 16)
    for _ in range(300):
        metrics = train_step(net, None, task, next(stream), optimizer)
    assert metrics["accuracy"] > 0.7  # frequent symbols mapped; the rare ones cannot be
    with torch.no_grad():
        net.memory_log_gain.fill_(math.log(30.0))
    return net.eval(), task


def test_decoding_recalls_a_written_token_it_never_produced(aligned):
    net, task = aligned
    symbol = int(task.rare_test[0])  # never in training, nor its target f(symbol)
    src = torch.randint(1, task.frequent + 1, (2, task.length), generator=torch.Generator().manual_seed(3))
    src[:, 2] = symbol
    mem = LocalMemory(MemoryConfig(size=64, key_dim=32, k=4, age_noise=0.0), device="cpu")
    plain = net.greedy(src, mem)  # an empty memory changes nothing
    assert torch.equal(plain, net.greedy(src, None))
    target = int(task.mapping()[symbol])
    assert not (plain[:, 2] == target).any()
    # the context: the sequence read and written with its gold labels, as in the test protocol
    context = to_tensors(task, src.numpy())
    net.write_decoded(mem, net.teacher_forced_queries(context.src, context.tgt_in), context.tgt_out)
    assert (net.greedy(src, mem)[:, 2] == target).all()  # the remembered token, never emitted in training
    assert (net.beam_search(src, mem, beam=3)[:, 2] == target).all()
    before = mem.state()
    net.greedy(src, mem)  # decoding reads, never writes, unless asked
    assert all(torch.equal(v, before[k]) for k, v in mem.state().items())
    net.greedy(src, mem, write=True)
    assert mem.step_count == before["step"] + 1
