"""Omniglot: the loader on the real zips, the episode sampler, the one-shot protocol, the command
line, and (slow tier) a smoke run of the main job (quick preset, 2 workers, 2 memory shards).
The training loop itself is tested in test_training.py."""

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from distmem import LocalMemory, MemoryConfig, checkpoints
from distmem.cli import from_dict
from distmem.models.omniglot import OmniglotNet
from distmem.runs import RunStore
from distmem.stats import shots_seen
from distmem.tasks.omniglot import OmniglotRunConfig, OmniglotTask
from distmem.tasks.omniglot.data import ZIPS, Split, default_data_dir, load_omniglot, make_split
from distmem.tasks.omniglot.evaluation import embed, evaluate, one_shot_predictions
from distmem.tasks.omniglot.training import sample_episodes

from conftest import run_job, unit


@pytest.fixture(scope="module")
def raw():
    return load_omniglot()


def test_loader_counts(raw):
    for name, chars in (("background", 964), ("evaluation", 659)):
        images, labels = raw[name]
        assert images.shape == (chars * 20, 28, 28) and images.dtype == np.uint8
        assert np.array_equal(np.bincount(labels), np.full(chars, 20))
        assert 5 < images.mean() < 60  # ink is bright on a dark background
    train, test = make_split(raw, "released")
    assert (train.num_classes, len(train.images), test.num_classes, len(test.images)) == (3856, 77120, 659, 13180)
    assert np.array_equal(train.images[19280 + 5], np.rot90(train.images[5]))  # rotation = a new class
    train, test = make_split(raw, "vinyals")
    assert (train.num_classes, test.num_classes, len(test.images)) == (4800, 423, 423 * 20)


def test_loader_reads_the_zips_through_a_uri(raw, tmp_path):
    same = load_omniglot(f"file://{default_data_dir().resolve()}")  # the same zips: the same cache entry
    assert all(np.array_equal(same[name][0], raw[name][0]) for name in raw)
    bucket = tmp_path / "bucket"  # a zip not cached yet is downloaded into the cache and decoded
    bucket.mkdir()
    for zip_name in ZIPS:
        with zipfile.ZipFile(bucket / zip_name, "w") as z:
            for char, drawer in [(1, 1), (1, 2), (2, 1)]:
                ink = Image.new("1", (105, 105), 1)
                ink.paste(0, (10 * char, 10, 10 * char + 40, 90))  # a dark bar on white
                png = io.BytesIO()
                ink.save(png, format="PNG")
                z.writestr(f"{zip_name[:-4]}/Alpha/character0{char}/0{char}_0{drawer}.png", png.getvalue())
    out = load_omniglot(f"file://{bucket}", tmp_path / "cache")
    images, labels = out["background"]
    assert images.shape == (3, 28, 28) and labels.tolist() == [0, 0, 1] and images.max() > 200
    assert sorted(p.suffix for p in (tmp_path / "cache" / "omniglot").iterdir()) == [".npz", ".npz"]  # no zip left
    with pytest.raises(FileNotFoundError, match="missing file://.*/nowhere/images_background.zip"):
        load_omniglot(f"file://{tmp_path}/nowhere", tmp_path / "cache2")


def test_missing_zip_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_background.zip"):
        load_omniglot(tmp_path, tmp_path)


def test_episode_sampler_invariants():
    split = Split(np.zeros((30 * 20, 28, 28), np.float32), np.repeat(np.arange(30), 20), 30)
    rng = np.random.default_rng(0)
    for global_labels in (False, True):
        b = sample_episodes(split, rng, parallel=6, width=5, per_class=4, global_labels=global_labels)
        assert b.indices.shape == (20, 6)
        for e in range(6):
            classes, counts = np.unique(b.classes[:, e], return_counts=True)
            assert len(classes) == 5 and (counts == 4).all()
            assert len(set(b.indices[:, e])) == 20  # distinct drawings
            assert (split.labels[b.indices[:, e]] == b.classes[:, e]).all()
            if global_labels:
                assert (b.labels[:, e] == b.classes[:, e]).all()
            else:  # episode-local labels, disjoint between the parallel episodes
                assert set(b.labels[:, e]) == set(range(5 * e, 5 * e + 5))


def test_one_shot_protocol_hand_made_case():
    # keys along axes; the second "a" is close to the first, "b" is orthogonal, the third "a" differs
    e = torch.eye(3)
    q = torch.stack([e[0], e[1], torch.nn.functional.normalize(e[0] + 0.1 * e[2], dim=0), e[2]]).unsqueeze(0)
    labels = torch.tensor([[7, 8, 7, 9]])
    preds = one_shot_predictions(q, labels)
    assert preds.tolist() == [[-1, 7, 7, 7]]  # empty memory, then nearest neighbours
    assert shots_seen(labels.numpy()).tolist() == [[0, 0, 1, 0]]


def test_vectorised_protocol_equals_local_memory_one_example_at_a_time():
    E, T, d = 3, 12, 6
    q = unit(E, T, d, seed=4)
    labels = torch.randint(0, 3, (E, T), generator=torch.Generator().manual_seed(0))
    preds = one_shot_predictions(q, labels)
    for e in range(E):
        mem = LocalMemory(MemoryConfig(size=T, key_dim=d, k=2, age_noise=0.0), device="cpu")
        for t in range(T):
            read = mem.read(q[e, t:t + 1])  # read without labels, then write with the label
            assert read.prediction.item() == preds[e, t].item()
            mem.write(read, labels[e, t:t + 1])


def test_evaluation_reports_intervals():
    split = Split(np.zeros((40 * 20, 28, 28), np.float32), np.repeat(np.arange(40), 20), 40)
    queries = torch.nn.functional.normalize(torch.eye(40)[split.labels] + 1.2 * unit(800, 40, seed=1), dim=1)
    acc = evaluate(queries, split, ways=5, episodes=50)
    assert set(acc) == {"1", "2", "3", "4", "5"}
    assert 40 < acc["1"]["accuracy"] < 100 and 0 < acc["1"]["ci95"] < 15  # chance is 20%
    assert acc["5"]["accuracy"] > acc["1"]["accuracy"]
    with pytest.raises(ValueError, match="max_shot"):
        evaluate(queries, split, ways=5, episodes=5, per_class=5, max_shot=5)
    with pytest.raises(ValueError, match="ways"):
        evaluate(queries, split, ways=41, episodes=5)


@pytest.mark.slow  # about 4 minutes on 2 cores
def test_quick_preset_smoke_run_with_two_workers_and_two_shards(tmp_path):
    out = run_job("jobs.omniglot", "--preset", "quick", "--mode", "lifelong", "--workers", "2", "--shards", "2",
                  "--runs", str(tmp_path), timeout=600)
    run = next(tmp_path.iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["mode"] == "lifelong" and metrics["workers"] == 2 and metrics["batches"] == 4
    assert set(metrics["accuracy"]) == {"5", "20"}
    # training did something: the trained network beats its own untrained start on the same episodes
    cfg = from_dict(OmniglotRunConfig, json.loads((run / "config.json").read_text()))
    _, test = make_split(load_omniglot(), cfg.split)
    untrained, _ = OmniglotTask(cfg).build()
    trained = OmniglotNet(cfg.model_config())
    trained.load_state_dict(checkpoints.load(RunStore(run), checkpoints.latest(RunStore(run)))["model"])
    before, after = (evaluate(embed(net, test.images), test, 5, 400, max_shot=1, seed=7)["1"]
                     for net in (untrained, trained))
    assert after["accuracy"] > before["accuracy"] + before["ci95"] + after["ci95"], (before, after)
    assert (run / "accuracy.png").stat().st_size > 1000
    assert (run / "checkpoints" / "latest.json").is_file()
    assert "5-way" in out.stdout and str(run.resolve()) in out.stdout
    assert metrics["memory"]["step"] == 4 * 50 and metrics["memory"]["shard_nodes"] == 1

    # resumed for 2 more batches: the model, the optimizer and the life-long memory continue from batch 4
    run_job("jobs.omniglot", "--resume", str(run), "--batches", "6", timeout=600)
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["batches"] == 6 and resumed["memory"]["step"] == 6 * 50  # not 2 * 50: the memory was restored
    assert [c["step"] for c in resumed["curve"]] == [2, 4, 6] and resumed["curve"][:2] == metrics["curve"]
    assert json.loads((run / "config.json").read_text())["batches"] == 6
