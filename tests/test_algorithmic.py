"""The Neural GPU's algorithmic tasks: seeded generators whose answers Python's own arithmetic
and sorting confirm, the plain text form both ways, the curriculum, and a short resumed run that
equals an uninterrupted one."""

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import assert_resume_equals_uninterrupted

from distmem.models.neural_gpu import DCGRU
from distmem.tasks.algorithmic import AlgorithmicRunConfig, AlgorithmicTask
from distmem.tasks.algorithmic.data import (
    BLANK,
    TASKS,
    Curriculum,
    batch,
    decode,
    encode,
    instance_ids,
    random_instance,
    solve,
    vocabulary,
)
from distmem.tasks.algorithmic.task import (
    answer,
    averaged_model,
    averaged_state,
    averaged_steps,
    clip_relative,
    extra_steps,
    learning_rate,
    load_trained,
    nothing_validated,
    saturation_scale,
    select_checkpoint,
    sequence_accuracy,
    sequence_right,
    validate_shorter,
    validation_ladder,
)

from conftest import run_job

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("task", ["badd", "bmul"])
def test_binary_instances_are_right_by_python_arithmetic(task):
    vocab = vocabulary(task)
    rng = np.random.default_rng(0)
    for length in (3, 4, 9, 20, 41):
        src, tgt = batch(task, length, 20, rng)
        assert src.shape == tgt.shape == (20, length)
        k = (length - 1) // 2
        for row_in, row_out in zip(src.tolist(), tgt.tolist()):
            digits = [vocab.inputs[i - 1] for i in row_in if i]
            op = digits[k]
            a = int("".join(digits[:k])[::-1], 2)       # least significant bit first on the tape
            b = int("".join(digits[k + 1:])[::-1], 2)
            want = a + b if task == "badd" else a * b
            assert op == ("+" if task == "badd" else "*")
            got = sum(2 ** i * (v - 2) for i, v in enumerate(row_out) if v >= 2)
            assert got == want
            n_bits = sum(1 for v in row_out if v >= 2)
            assert row_out[n_bits:] == [BLANK] * (length - n_bits) and n_bits == len(format(want, "b"))
    again = [batch(task, 9, 5, np.random.default_rng(3))[0] for _ in range(2)]
    assert np.array_equal(*again)


@pytest.mark.parametrize("task", ["rev", "copy", "sort"])
def test_symbol_instances_are_right(task):
    rng = np.random.default_rng(1)
    vocab = vocabulary(task, symbols=5)
    src, tgt = batch(task, 12, 10, rng, symbols=5)
    for row_in, row_out in zip(src.tolist(), tgt.tolist()):
        x = [vocab.inputs[i - 1] for i in row_in]
        y = [vocab.outputs[i - 2] for i in row_out]
        assert y == {"rev": x[::-1], "copy": x, "sort": sorted(x)}[task]
        assert set(x) <= set("abcde")


def test_the_plain_form_both_ways():
    assert solve("badd", "1011+110") == "10001" and solve("bmul", "1011*110") == format(11 * 6, "b")
    assert solve("badd", "0+0") == "0" and solve("rev", "abc") == "cba" and solve("sort", "cab") == "abc"
    vocab = vocabulary("badd")
    inp, out = instance_ids("badd", "1011+110", 9, vocab)
    assert [vocab.inputs[i - 1] for i in inp if i] == list("1101+0110")  # both 4 bits, LSB first
    assert decode("badd", out, vocab) == "10001"
    assert decode("badd", [BLANK] * 4, vocab) == "0"
    for task in TASKS:
        text = random_instance(task, 11, np.random.default_rng(2))
        v = vocabulary(task)
        _, out = instance_ids(task, text, 11, v)
        assert decode(task, out, v) == solve(task, text)
    for bad in ("1011-110", "10a+1", "+1", "1011+"):
        with pytest.raises(ValueError, match="badd: expected two binary numbers"):
            encode("badd", bad, vocab)
    with pytest.raises(ValueError, match="symbols"):
        encode("rev", "abz", vocabulary("rev", 4))
    with pytest.raises(ValueError, match="task: expected one of"):
        vocabulary("mul")


def test_the_curriculum_grows_to_its_longest_and_draws_within_bounds():
    c = Curriculum(start=3, longest=20, every=100)
    assert [c.longest_at(s) for s in (0, 99, 100, 1700, 5000)] == [3, 3, 4, 20, 20]
    rng = np.random.default_rng(0)
    drawn = [c.length_at(1000, rng) for _ in range(500)]
    assert min(drawn) == 3 and max(drawn) == 13
    with pytest.raises(ValueError, match="curriculum"):
        Curriculum(start=30, longest=20)


def test_shared_length_gives_every_trainer_the_steps_length_and_its_own_instances():
    def lengths_and_batches(shared: bool, rank: int):
        cfg = AlgorithmicRunConfig(task="badd", nmaps=8, batch_size=4, max_length=20, curriculum_start=20,
                                   shared_length=shared)
        it = AlgorithmicTask(cfg).batches(rank, 2, 100)
        return [next(it) for _ in range(30)]
    for shared in (False, True):
        ranks = [lengths_and_batches(shared, rank) for rank in (0, 1)]
        lengths = [[src.shape[1] for src, _ in batches] for batches in ranks]
        assert (lengths[0] == lengths[1]) == shared  # 30 independent draws of 3..20 never all agree
        assert not any(torch.equal(a[0], b[0]) for a, b in zip(*ranks) if a[0].shape == b[0].shape)
    # the shared length comes from (seed, step); rank 0's instances stay those of (seed, 0, step)
    full = Curriculum(start=20, longest=20)
    assert lengths[0] == [full.length_at(s, np.random.default_rng([0, s])) for s in range(100, 130)]
    src = batch("badd", lengths[0][0], 4, np.random.default_rng([0, 0, 100]))[0]
    assert torch.equal(ranks[0][0][0], torch.from_numpy(src))


def test_extra_steps_are_drawn_per_step_within_f_times_the_length_and_off_by_default():
    cfg = AlgorithmicRunConfig(task="badd", extra_steps=0.5)
    drawn = [extra_steps(cfg, step, 20) for step in range(400)]
    assert min(drawn) == 0 and max(drawn) == 10 and len(set(drawn)) == 11
    assert drawn == [extra_steps(cfg, step, 20) for step in range(400)]  # a function of (seed, step)
    assert drawn != [extra_steps(dataclasses.replace(cfg, seed=1), step, 20) for step in range(400)]
    assert {extra_steps(cfg, step, 3) for step in range(100)} == {0, 1}
    assert not any(extra_steps(AlgorithmicRunConfig(task="badd"), step, 20) for step in range(100))
    with pytest.raises(ValueError, match="--extra-steps: expected >= 0"):
        AlgorithmicRunConfig(extra_steps=-1)
    # the training step runs them: its loss is that of the pass with the step's draw, not without
    task = AlgorithmicTask(dataclasses.replace(cfg, nmaps=6, cell="dcgru", extra_steps=2.0, max_length=7,
                                               curriculum_start=7))
    net, optimizer = task.build()
    step = next(s for s in range(100) if extra_steps(task.config, s, 7) > 3)
    src, tgt = next(task.batches(0, 1, step))
    before = copy.deepcopy(net).train()
    torch.manual_seed(5)
    want = before(src, tgt, extra_steps=extra_steps(task.config, step, 7)).ce.item()
    torch.manual_seed(5)
    without = before(src, tgt).ce.item()
    torch.manual_seed(5)
    got = task.train_step(net, None, (src, tgt), optimizer, step)["ce"]
    assert got == pytest.approx(float(want)) and got != pytest.approx(float(without))


def test_bins_give_every_step_a_batch_of_each_bin_capped_by_the_curriculum():
    c = Curriculum(start=3, longest=20, every=100)
    bins = (8, 12, 16, 20)
    assert [c.bins_at(s, bins) for s in (0, 500, 1000, 1700)] == [
        [(3, 3)], [(3, 8)], [(3, 8), (9, 12), (13, 13)], [(3, 8), (9, 12), (13, 16), (17, 20)]]
    cfg = AlgorithmicRunConfig(task="badd", batch_size=4, curriculum_every=100, bins=bins)
    step = 1000
    parts = next(AlgorithmicTask(cfg).batches(1, 2, step))
    assert [(src.shape, tgt.shape) for src, tgt in parts] == [((4, n), (4, n)) for n in (8, 12, 13)]
    rng = np.random.default_rng([0, 1, step])  # (seed, rank, step), drawn bin after bin
    for (src, tgt), (shortest, n) in zip(parts, [(3, 8), (9, 12), (13, 13)], strict=True):
        want = batch("badd", n, 4, rng, shortest=shortest)
        assert torch.equal(src, torch.from_numpy(want[0])) and torch.equal(tgt, torch.from_numpy(want[1]))
    for bad in ((12, 8), (8, 8), (2, 8), (8, 21)):
        with pytest.raises(ValueError, match="--bins: expected increasing lengths in 3..20"):
            AlgorithmicRunConfig(task="badd", bins=bad)


@pytest.mark.parametrize("task", ["badd", "rev"])
def test_a_bin_holds_every_length_of_its_range_padded_with_right_answers(task):
    vocab = vocabulary(task)
    src, tgt = batch(task, 12, 400, np.random.default_rng(3), shortest=9)
    assert src.shape == tgt.shape == (400, 12)
    widths = set()
    for inp, out in zip(src.tolist(), tgt.tolist(), strict=True):
        used = [i for i in inp if i]
        assert inp == used + [0] * (12 - len(used))  # the instance, then padding
        text = "".join(vocab.inputs[i - 1] for i in used)
        if task == "badd":  # on the tape least significant bit first
            a, b = text.split("+")
            text = f"{a[::-1]}+{b[::-1]}"
            widths.add(len(a))
        else:
            widths.add(len(text))
        answer = solve(task, text)
        assert decode(task, out, vocab) == answer
        assert out[len(answer):] == [BLANK] * (12 - len(answer))
    assert widths == ({4, 5} if task == "badd" else {9, 10, 11, 12})  # k = (n - 1) // 2 bits for n in 9..12


@pytest.mark.parametrize("ddp", [False, True])
def test_a_bins_step_descends_the_mean_of_the_bins_losses(ddp):
    """The oracle: a copy of the model, each bin's pass on its own, the gradient of their mean loss.
    Also through DistributedDataParallel (one gloo rank), whose all-reduce waits for the last bin."""
    cfg = AlgorithmicRunConfig(task="badd", nmaps=6, cell="dcgru", saturation=1e-3, batch_size=3, max_length=9,
                               curriculum_start=9, bins=(4, 6, 9), clip_norm=1e9)
    task = AlgorithmicTask(cfg)
    net, optimizer = task.build()
    parts = next(task.batches(0, 1, 7))
    assert [src.shape[1] for src, _ in parts] == [4, 6, 9]
    twin = copy.deepcopy(net).train()
    outs = [twin(src, tgt) for src, tgt in parts]
    sum(out.loss for out in outs).div(3).backward()
    if ddp:
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
        try:
            metrics = task.train_step(torch.nn.parallel.DistributedDataParallel(net), None, parts, optimizer, 7)
        finally:
            torch.distributed.destroy_process_group()
    else:
        metrics = task.train_step(net, None, parts, optimizer, 7)
    assert metrics["ce"] == pytest.approx(sum(out.ce.item() for out in outs) / 3)
    assert metrics["length"] == 9
    for (name, p), q in zip(net.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert any(float(p.grad.abs().sum()) > 0 for p in net.parameters())


@pytest.mark.parametrize("cell", ["cgru", "dcgru"])
def test_the_task_resumed_equals_uninterrupted(tmp_path, cell):
    """Also with the dcgru's saturation cost, the annealed learning rate, the validation length (from
    step 4) and the weights' moving average (from step 1, saved in the optimizer's state)."""
    extra = dict(cell="dcgru", saturation=1e-3, saturation_share=0.01, lr_end=1e-4, validation_length=9,
                 validation_from=4, ema_from=1, ema_decay=0.5) if cell == "dcgru" else {}
    cfg = AlgorithmicRunConfig(task="badd", nmaps=8, workers=1, steps=4, batch_size=4, curriculum_every=1,
                               max_length=7, eval_every=2, eval_instances=8, log_every=1, checkpoint_every=2,
                               grad_noise=0.01, **extra)
    saved = assert_resume_equals_uninterrupted(lambda: AlgorithmicTask(cfg), tmp_path)
    assert [e["step"] for e in saved["evals"]] == [2, 4]
    assert [("validation_accuracy" in e, "ema_validation_accuracy" in e) for e in saved["evals"]] == (
        [(False, False), (True, True)] if cell == "dcgru" else [(False, False)] * 2)
    assert all(("ema_sequence_accuracy" in e) == (cell == "dcgru") for e in saved["evals"])
    assert [c["length"] for c in saved["curve"]] == [  # the curriculum's draws, replayed from the seeds
        Curriculum(3, 7, 1).length_at(s, np.random.default_rng([0, 0, s])) for s in range(4)]


def test_the_learning_rate_anneals_from_lr_to_lr_end_on_a_cosine():
    cfg = AlgorithmicRunConfig(steps=101, lr=1e-2, lr_end=1e-4)
    assert learning_rate(cfg, 0) == pytest.approx(1e-2) and learning_rate(cfg, 100) == pytest.approx(1e-4)
    assert learning_rate(cfg, 50) == pytest.approx((1e-2 + 1e-4) / 2)
    assert learning_rate(cfg, 25) == pytest.approx(1e-4 + (1e-2 - 1e-4) * (1 + 2 ** -0.5) / 2)
    rates = [learning_rate(cfg, s) for s in range(101)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert learning_rate(AlgorithmicRunConfig(steps=101, lr=1e-2), 70) == 1e-2  # lr_end 0: constant
    dropped = AlgorithmicRunConfig(steps=101, lr=1e-2, lr_drop_at=60, lr_drop=0.1)
    assert [learning_rate(dropped, s) for s in (0, 59, 60, 100)] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3])
    assert learning_rate(dataclasses.replace(cfg, lr_drop_at=60, lr_drop=0.5), 75) == pytest.approx(
        0.5 * learning_rate(cfg, 75))  # the drop multiplies the cosine
    task = AlgorithmicTask(AlgorithmicRunConfig(task="badd", nmaps=6, cell="dcgru", steps=101, lr=1e-2, lr_end=1e-4))
    model, optimizer = task.build()
    task.train_step(model, None, next(task.batches(0, 1, 0)), optimizer, 50)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate(task.config, 50))
    constant = AlgorithmicTask(dataclasses.replace(task.config, lr=3e-4, lr_end=0.0))  # a resume that set --lr
    constant.train_step(model, None, next(constant.batches(0, 1, 51)), optimizer, 51)
    assert optimizer.param_groups[0]["lr"] == 3e-4  # not the checkpointed optimizer's rate


def test_the_saturation_share_caps_the_cost_at_a_share_of_the_cross_entropy():
    """Hand-computed factors, then a step's gradient: that of ce + factor x the weighted cost."""
    cfg = AlgorithmicRunConfig(saturation=1e-3, saturation_share=0.01, saturation_share_at=10)
    assert saturation_scale(cfg, ce=0.5, saturation=0.01, step=10) == pytest.approx(0.5)  # 0.01 x 0.5 / 0.01
    assert saturation_scale(cfg, ce=0.5, saturation=0.01, step=9) == 1.0  # before saturation_share_at
    assert saturation_scale(cfg, ce=2.0, saturation=0.01, step=10) == 1.0  # within the share: the fixed weight
    assert saturation_scale(cfg, ce=0.5, saturation=0.0, step=10) == 1.0
    assert saturation_scale(AlgorithmicRunConfig(saturation=1e-3), ce=1e-6, saturation=0.01, step=10) == 1.0
    with pytest.raises(ValueError, match="--saturation-share"):
        AlgorithmicRunConfig(saturation_share=-0.1)
    task = AlgorithmicTask(AlgorithmicRunConfig(task="badd", nmaps=6, cell="dcgru", saturation=0.05,
                                                saturation_share=0.02, clip_norm=1e9))
    model, optimizer = task.build()
    with torch.no_grad():  # pre-activations beyond the hard gates' range, so that the cost is not 0
        for p in model.parameters():
            p.mul_(4)
    twin = AlgorithmicTask(task.config).build()[0]
    twin.load_state_dict(model.state_dict())
    src, tgt = next(task.batches(0, 1, 0))
    task.train_step(model, None, (src, tgt), optimizer, 0)
    out = twin(src, tgt)
    scale = 0.02 * float(out.ce.detach()) / float(out.saturation.detach())
    assert 0 < scale < 1  # the case the share changes
    (out.ce + scale * out.saturation).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_training_rounds_the_gates_from_snap_from_on():
    """--snap-from S: steps before S train the unrounded cell, steps from S the rounded one (the
    step's loss then equals the rounded model's); it needs --snap."""
    task = AlgorithmicTask(AlgorithmicRunConfig(task="badd", nmaps=6, cell="dcgru", snap=0.3, snap_from=5,
                                                dropout=0.0, saturation=0.0))
    model, optimizer = task.build()
    cells = [m for m in model.modules() if isinstance(m, DCGRU)]
    src, tgt = next(task.batches(0, 1, 0))
    twin = AlgorithmicTask(task.config).build()[0]
    for step, rounded in ((4, False), (5, True), (6, True)):
        twin.load_state_dict(model.state_dict())
        twin.snap_in_training(rounded)
        expected = float(twin.train()(src, tgt).ce.detach())
        logged = task.train_step(model, None, (src, tgt), optimizer, step)
        assert all(c.snap_training == rounded for c in cells)
        assert logged["ce"] == pytest.approx(expected, rel=1e-6)
    twin.snap_in_training(False)
    assert float(twin.train()(src, tgt).ce.detach()) != pytest.approx(logged["ce"], rel=1e-6)  # the rounding mattered
    with pytest.raises(ValueError, match="--snap-from"):
        AlgorithmicRunConfig(cell="dcgru", snap_from=10)


def test_relative_clipping_bounds_each_gradient_element_by_its_running_root_mean_square():
    """Hand case: exp_avg_sq (4, 1e-6) with factor 2 bounds (4, 0.002); a parameter Adam has no state
    for yet is left as it is. In training it applies from --clip-relative-from on: a step before it
    equals a step without it, a step from it clips (0.05 x the roots of the mean squares Adam holds
    after one step, a thousandth of the first gradients' squares, is below the next gradients)."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([a, b])
    optimizer.state[a]["exp_avg_sq"] = torch.tensor([4.0, 1e-6])
    a.grad, b.grad = torch.tensor([10.0, -5.0]), torch.tensor([7.0])
    clip_relative(optimizer, 2.0)
    torch.testing.assert_close(a.grad, torch.tensor([4.0, -0.002]))
    assert b.grad.tolist() == [7.0]
    cfg = AlgorithmicRunConfig(task="badd", nmaps=6, cell="dcgru", clip_relative=0.05, clip_relative_from=1)
    runs = {}
    for name, config in (("plain", dataclasses.replace(cfg, clip_relative=0.0)), ("clipped", cfg)):
        task = AlgorithmicTask(config)
        model, optimizer = task.build()
        batches = task.batches(0, 1, 0)
        task.train_step(model, None, next(batches), optimizer, 0)
        after_first = [p.detach().clone() for p in model.parameters()]
        task.train_step(model, None, next(batches), optimizer, 1)
        runs[name] = after_first, [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(runs["plain"][0], runs["clipped"][0]))
    assert not all(torch.equal(p, q) for p, q in zip(runs["plain"][1], runs["clipped"][1]))


def test_the_test_takes_the_checkpoint_best_at_the_validation_length():
    evals = [{"step": 2, "validation_accuracy": 10.0}, {"step": 4, "validation_accuracy": 90.0},
             {"step": 6, "validation_accuracy": 40.0}, {"step": 8, "validation_accuracy": 90.0},
             {"step": 9, "validation_accuracy": 95.0}]
    assert select_checkpoint(evals, {2, 4, 6, 8, 9}, 50) == (9, False, 0.0)
    assert select_checkpoint(evals, {2, 4, 6, 8}, 50) == (8, False, 0.0)  # a tie: the later; step 9 has no checkpoint
    assert select_checkpoint(evals, {2, 4, 6}, 50) == (4, False, 0.0)
    assert select_checkpoint(evals, set(), 50) is None
    assert select_checkpoint([{"step": 2, "sequence_accuracy": 50.0}], {2}, 50) is None  # no validation length
    resumed = [{**e, "validation_length": 50.0} for e in evals[:3]] + [  # a resume moved it to 100
        {"step": 8, "validation_accuracy": 20.0, "validation_length": 100.0}]
    assert select_checkpoint(resumed, {2, 4, 6, 8}, 100) == (8, False, 0.0)
    assert select_checkpoint(resumed, {2, 4, 6, 8}, 50) == (4, False, 0.0)
    # with the weights' average: it competes with the weights; on a tie the later step, then the average
    averaged = [{"step": 2, "validation_accuracy": 60.0, "ema_validation_accuracy": 70.0},
                {"step": 4, "validation_accuracy": 50.0, "ema_validation_accuracy": 40.0},
                {"step": 6, "validation_accuracy": 70.0, "ema_validation_accuracy": 70.0}]
    assert select_checkpoint(averaged, {2, 4, 6}, 50) == (6, True, 0.0)
    assert select_checkpoint(averaged, {2, 4}, 50) == (2, True, 0.0)
    assert select_checkpoint(averaged[1:2], {4}, 50) == (4, False, 0.0)
    # averages scored with other roundings (snap_grid) compete too; a tie keeps the run's own rounding
    assert averaged_steps(averaged, {2, 4}, 50) == [2, 4]
    assert averaged_steps([{**averaged[0], "validation_length": 50.0}], {2}, 100) == []  # scored at another length
    assert select_checkpoint(averaged, {2, 4, 6}, 50, {(2, 0.2): 85.0, (4, 0.25): 80.0}, 0.1) == (2, True, 0.2)
    assert select_checkpoint(averaged, {2, 4, 6}, 50, {(4, 0.2): 70.0, (6, 0.2): 70.0}, 0.1) == (6, True, 0.1)
    assert select_checkpoint(averaged, {2, 4, 6}, 50, {(6, 0.25): 90.0, (6, 0.15): 90.0}, 0.1) == (6, True, 0.15)
    assert select_checkpoint(averaged, {2, 4}, 50, {(6, 0.25): 99.0}, 0.1) == (2, True, 0.1)  # 6: no checkpoint


def test_where_nothing_validates_the_choice_falls_to_the_longest_shorter_length_where_something_does():
    assert validation_ladder(200, 20) == [100, 50, 25]
    assert validation_ladder(100, 20) == [50, 25]
    assert validation_ladder(12, 8) == []
    zero = [{"step": 2, "validation_accuracy": 0.0, "validation_length": 200.0},
            {"step": 4, "validation_accuracy": 0.0, "ema_validation_accuracy": 0.0, "validation_length": 200.0},
            {"step": 6, "validation_accuracy": 0.0, "ema_validation_accuracy": 0.0, "validation_length": 200.0},
            {"step": 8, "sequence_accuracy": 100.0}]  # no validation: not a candidate
    assert nothing_validated(zero, {2, 4, 6}, 200)
    assert not nothing_validated(zero, {2, 4, 6}, 200, {(6, 0.2): 0.4})  # one rounding scored
    assert nothing_validated(zero, {2, 4, 6}, 200, {(10, 0.2): 50.0})  # 10 has no checkpoint
    assert not nothing_validated([{**zero[0], "validation_accuracy": 1.0}], {2}, 200)
    cfg = AlgorithmicRunConfig(validation_length=200, max_length=20)
    # a run whose weights at 4 run to length 50 and whose averages do not: nothing at 100, then 50
    truth = {(100, 2, False): 0.0, (100, 4, False): 0.0, (100, 4, True): 0.0, (100, 6, False): 0.0,
             (100, 6, True): 0.0, (50, 2, False): 10.0, (50, 4, False): 70.0, (50, 4, True): 40.0,
             (50, 6, False): 0.0, (50, 6, True): 70.0}
    asked = []

    def score(length, items):
        asked.append((length, items))
        return [truth[length, step, averaged] for step, averaged in items]

    shorter = validate_shorter(zero, {2, 4, 6}, cfg, score)
    assert [length for length, _ in asked] == [100, 50]
    assert asked[0][1] == [(2, False), (4, False), (6, False), (4, True), (6, True)]
    assert shorter == [{"step": 2, "validation_length": 50.0, "validation_accuracy": 10.0},
                       {"step": 4, "validation_length": 50.0, "validation_accuracy": 70.0,
                        "ema_validation_accuracy": 40.0},
                       {"step": 6, "validation_length": 50.0, "validation_accuracy": 0.0,
                        "ema_validation_accuracy": 70.0}]
    assert select_checkpoint(shorter, {2, 4, 6}, 50, None, 0.1) == (6, True, 0.1)  # the tie: the later, the average
    assert select_checkpoint(shorter, {2, 4}, 50, None, 0.1) == (4, False, 0.1)
    asked.clear()
    assert validate_shorter(zero, {4}, cfg, lambda length, items: [0.0] * len(items)) is None
    assert validate_shorter(zero, set(), cfg, score) is None and not asked  # no candidate: nothing scored


class EvenSumReverser(torch.nn.Module):
    """A stand-in for a trained rev model: right on exactly the instances whose input ids sum to an
    even number, all BLANK on the others."""

    def greedy(self, src: torch.Tensor, length: int) -> tuple[torch.Tensor, None]:
        right = src.flip(1) + 1  # rev: input id i (letter i - 1) answers output id i + 1
        return torch.where((src.sum(1, keepdim=True) % 2) == 0, right, torch.full_like(src, BLANK)), None


def test_the_test_split_in_parts_counts_what_the_whole_counts():
    """The generalisation test runs each length in parts (one per trainer's CPU); the parts draw
    the same instances, so their counts sum to the whole's, which an independent count of the
    even-sum instances in the same draws gives."""
    cfg = AlgorithmicRunConfig(task="rev", symbols=4)
    rng = np.random.default_rng([7, 9])
    want = sum(int((batch("rev", 9, min(64, 300 - s), rng, 4)[0].sum(1) % 2 == 0).sum()) for s in range(0, 300, 64))
    assert 100 < want < 200  # the stand-in gets some right and some wrong
    model = EvenSumReverser()
    assert sequence_right(model, cfg, 9, 300, seed=7) == want
    assert sequence_accuracy(model, cfg, 9, 300, seed=7) == 100.0 * want / 300
    for parts in (2, 3, 5, 7):  # 300 instances are 5 batches: with 7 parts, two of them are empty
        counts = [sequence_right(model, cfg, 9, 300, seed=7, part=p, parts=parts) for p in range(parts)]
        assert sum(counts) == want and (parts < 5 or counts.count(0) >= parts - 5), counts
    with pytest.raises(ValueError, match="part"):
        sequence_right(model, cfg, 9, 300, seed=7, part=2, parts=2)


def test_the_weights_average_is_the_hand_computed_moving_average(tmp_path):
    """From step ema_from on, avg = decay x avg + (1 - decay) x weights after each step; the
    weights themselves the first time; the model trains on the weights, not the average."""
    cfg = AlgorithmicRunConfig(task="badd", nmaps=6, cell="dcgru", steps=10, ema_from=2, ema_decay=0.75)
    task = AlgorithmicTask(cfg)
    model, optimizer = task.build()
    weights = []
    for step in range(5):
        task.train_step(model, None, next(task.batches(0, 1, step)), optimizer, step)
        weights.append({name: p.detach().clone() for name, p in model.named_parameters()})
        if step < 2:
            assert averaged_model(model, optimizer) is None and averaged_state(model, optimizer.state_dict()) is None
    averaged = averaged_model(model, optimizer)
    for name, p in averaged.named_parameters():
        want = weights[2][name]
        for step in (3, 4):
            want = 0.75 * want + 0.25 * weights[step][name]
        torch.testing.assert_close(p, want)
        assert not torch.equal(p, dict(model.named_parameters())[name])  # the model keeps its own weights
    saved = averaged_state(model, optimizer.state_dict())  # as a checkpoint holds it
    assert all(torch.equal(saved[k], v) for k, v in averaged.state_dict().items())
    scores = task.evaluate(model)
    assert {"sequence_accuracy", "ema_sequence_accuracy"} <= set(scores) and "validation_accuracy" not in scores
    from distmem.runs import RunStore
    from distmem.training import fit_local
    fit_local(AlgorithmicTask(dataclasses.replace(cfg, steps=1, ema_from=0, eval_every=0)), RunStore(tmp_path))
    with pytest.raises(ValueError, match="no moving average"):
        load_trained(str(tmp_path), "checkpoints/step-0000001", averaged=True)
    with pytest.raises(ValueError, match="--ema-decay"):
        AlgorithmicRunConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="--ema-from"):
        AlgorithmicRunConfig(ema_from=-1)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder as jobs.neural_gpu leaves it (a few steps of a small model, no Ray)."""
    from distmem.runs import RunStore
    from distmem.training import fit_local
    run = tmp_path_factory.mktemp("ngpu")
    cfg = AlgorithmicRunConfig(task="badd", nmaps=8, workers=1, steps=3, batch_size=4, max_length=7,
                               eval_every=0, checkpoint_every=3, ema_from=1, ema_decay=0.5)
    fit_local(AlgorithmicTask(cfg), RunStore(run))
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    return run


def test_the_answer_job_writes_one_binary_answer_per_instance(trained_run, tmp_path):
    (tmp_path / "in.txt").write_text("1011+110\n1+1\n\n111111111111111111111111111111+1\n")
    out = subprocess.run([sys.executable, "-m", "jobs.neural_gpu_answer", str(trained_run), "--input",
                          str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.txt")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    answers = (tmp_path / "out.txt").read_text().splitlines()
    assert len(answers) == 3 and all(set(a) <= {"0", "1"} and (a == "0" or a[0] == "1") for a in answers)
    model, cfg = load_trained(str(trained_run))
    assert answers == answer(model, cfg, ["1011+110", "1+1", "111111111111111111111111111111+1"])
    averaged, _ = load_trained(str(trained_run), "checkpoints/step-0000003", averaged=True)  # its weights' average
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), averaged.parameters()))
    (trained_run / "metrics.json").write_text(json.dumps({"checkpoint": "checkpoints/step-0000003",
                                                          "averaged": True}))  # as the job records its test's
    tested, _ = load_trained(str(trained_run))
    assert all(torch.equal(p, q) for p, q in zip(averaged.parameters(), tested.parameters()))
    (trained_run / "metrics.json").unlink()
    (tmp_path / "bad.txt").write_text("1011+110\n10x1+1\n")
    out = subprocess.run([sys.executable, "-m", "jobs.neural_gpu_answer", str(trained_run), "--input",
                          str(tmp_path / "bad.txt")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "line 2" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "jobs.neural_gpu_answer", str(tmp_path), "--input",
                          str(tmp_path / "in.txt")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a jobs.neural_gpu run folder" in out.stderr


def test_a_trained_run_loads_with_the_gates_snapped_as_asked(tmp_path):
    """snap is an inference setting: load_trained(run, snap=...) rounds the dcgru's gates of a run
    trained without it, with the same weights; None takes the one the test chose (metrics.json) for
    the tested model, else the run's config.json (which --resume RUN --snap rewrites), else the
    checkpoint's."""
    from distmem.runs import RunStore
    from distmem.training import fit_local
    cfg = AlgorithmicRunConfig(task="badd", nmaps=6, cell="dcgru", workers=1, steps=2, batch_size=4, max_length=7,
                               eval_every=0, checkpoint_every=2)
    fit_local(AlgorithmicTask(cfg), RunStore(tmp_path))
    plain, plain_cfg = load_trained(str(tmp_path))
    snapped, snapped_cfg = load_trained(str(tmp_path), snap=0.1)
    cells = [m for m in snapped.modules() if isinstance(m, DCGRU)]
    assert len(cells) == 2 and all(c.snap == 0.1 for c in cells) and snapped_cfg.snap == 0.1
    assert plain_cfg.snap == 0 and all(m.snap == 0 for m in plain.modules() if isinstance(m, DCGRU))
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), snapped.parameters()))
    with pytest.raises(ValueError, match="snap"):
        load_trained(str(tmp_path), snap=0.5)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(dataclasses.replace(cfg, snap=0.2))))
    assert load_trained(str(tmp_path))[1].snap == 0.2 and load_trained(str(tmp_path), snap=0.0)[1].snap == 0
    # the rounding the test chose (metrics.json) goes with the tested checkpoint; an explicit one wins
    (tmp_path / "metrics.json").write_text(json.dumps({"checkpoint": "checkpoints/step-0000002", "averaged": False,
                                                       "snap": 0.15}))
    assert load_trained(str(tmp_path))[1].snap == 0.15 and load_trained(str(tmp_path), snap=0.05)[1].snap == 0.05
    assert load_trained(str(tmp_path), "checkpoints/step-0000002")[1].snap == 0.2  # not the tested model: config.json


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path):
    """Ray Train (2 trainers), the generalisation test, metrics.json and the plot."""
    out = run_job("jobs.neural_gpu", "--preset", "quick", "--storage", str(tmp_path))
    run = next(tmp_path.iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert sorted(map(int, metrics["sequence_accuracy"])) == [8, 16]
    assert all(0 <= a <= 100 for a in metrics["sequence_accuracy"].values())
    assert [e["step"] for e in metrics["evals"]] == [10, 20] and metrics["curve"][-1]["step"] == 20
    assert all("ema_validation_accuracy" in e for e in metrics["evals"][1:])  # the weights' average from step 5
    # the averages at steps 10 and 20 with the grid's roundings, on the evals' validation instances
    grid = metrics["snap_validation"]
    assert sorted((v["step"], v["snap"]) for v in grid) == [(10, 0.05), (10, 0.2), (20, 0.05), (20, 0.2)]
    for v in grid:
        model, cfg = load_trained(str(run), f"checkpoints/step-{v['step']:07d}", True, v["snap"])
        assert sequence_accuracy(model, cfg, 12, 16, seed=cfg.seed + 1) == v["validation_accuracy"]
    own = metrics["config"]["snap"]
    _, step, averaged, _, snap = max(
        [(e[f"{p}validation_accuracy"], e["step"], p == "ema_", True, -own)
         for e in metrics["evals"] for p in ("", "ema_") if f"{p}validation_accuracy" in e]
        + [(v["validation_accuracy"], v["step"], True, False, -v["snap"]) for v in grid])
    # the test's model: the best at length 12, of the weights and their average, with any of the roundings
    assert (metrics["checkpoint"], metrics["averaged"], metrics["snap"]) == (f"checkpoints/step-{step:07d}",
                                                                             averaged, -snap)
    default_model = load_trained(str(run))[0]
    assert load_trained(str(run))[1].snap == metrics["snap"]
    default, chosen = (m.state_dict() for m in (default_model, load_trained(str(run), metrics["checkpoint"],
                                                                            metrics["averaged"])[0]))
    assert all(torch.equal(default[k], chosen[k]) for k in chosen)  # the answer job loads the tested model
    assert (run / "generalisation.png").stat().st_size > 0 and "length    16" in out.stdout
    cfg = load_trained(str(run))[1]  # the test ran in parts as Ray tasks: the same as one pass here
    assert {int(n): a for n, a in metrics["sequence_accuracy"].items()} == {
        n: sequence_accuracy(default_model, cfg, n, 32, seed=cfg.seed + 2) for n in (8, 16)}
    # a --resume that trains further reports the training time of the whole run, not only its part
    run_job("jobs.neural_gpu", "--resume", str(run), "--steps", "30")
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["resumed"] and not metrics["resumed"] and resumed["curve"][-1]["step"] == 30
    assert resumed["train_seconds"] > metrics["train_seconds"] > 0
