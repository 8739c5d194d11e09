"""Classifying new images one-shot from a checkpoint: the Python API against a brute-force nearest
neighbour of the network's own embeddings, its bad input, and the CLI on real Omniglot PNGs."""

import json
import zipfile
from dataclasses import asdict

import numpy as np
import pytest
import torch

from distmem.models.omniglot import OmniglotNet
from distmem.tasks.omniglot import OmniglotRunConfig, OneShotClassifier
from distmem.tasks.omniglot.classify import find_checkpoint
from distmem.tasks.omniglot.data import default_data_dir, load_image
from distmem.tasks.omniglot.evaluation import embed
from jobs import omniglot_classify

CLASSES = 4


@pytest.fixture(scope="module")
def drawings(tmp_path_factory):
    """{character folder: [png paths]} for CLASSES characters of the evaluation zip, 3 drawings each."""
    out = tmp_path_factory.mktemp("png")
    found: dict[str, list] = {}
    with zipfile.ZipFile(default_data_dir() / "images_evaluation.zip") as z:
        for name in sorted(n for n in z.namelist() if n.endswith(".png")):
            char = name.rsplit("/", 1)[0].replace("/", "_")
            if len(found) == CLASSES and char not in found:
                break
            if len(found.setdefault(char, [])) < 3:
                path = out / name.rsplit("/", 1)[1]
                path.write_bytes(z.read(name))
                found[char].append(path)
    return found


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder whose latest checkpoint is a seeded, untrained network (memory of 64 slots)."""
    torch.manual_seed(0)
    cfg = OmniglotRunConfig(memory_size=64, k=8)
    net = OmniglotNet(cfg.model_config())
    run = tmp_path_factory.mktemp("run")
    folder = run / "checkpoints" / "batch-0000001"
    folder.mkdir(parents=True)
    torch.save({"model": net.state_dict(), "config": asdict(cfg), "step": 1, "curve": []}, folder / "model.pt")
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"name": folder.name, "step": 1}))
    return run


def test_predictions_are_the_nearest_remembered_drawing(drawings, run_folder):
    clf = OneShotClassifier.from_checkpoint(run_folder)
    labels = list(drawings)
    support = np.stack([load_image(paths[0]) for paths in drawings.values()])
    clf.remember(support, labels)
    same, sim = clf.predict(support)
    assert same == labels and np.allclose(sim, 1.0, atol=1e-5)  # each drawing finds itself

    queries = np.stack([load_image(p) for paths in drawings.values() for p in paths[1:]])
    predicted, sim = clf.predict(queries)
    q, keys = embed(clf.net, queries), embed(clf.net, support)  # oracle: brute-force cosine
    oracle = (q @ keys.T).argmax(dim=1)
    assert predicted == [labels[i] for i in oracle] and np.allclose(sim, (q @ keys.T).max(dim=1).values, atol=1e-5)


def test_a_second_drawing_of_a_label_merges_or_adds_a_slot(drawings, run_folder):
    clf = OneShotClassifier.from_checkpoint(run_folder)
    paths = list(drawings.values())
    clf.remember(np.stack([load_image(paths[0][0]), load_image(paths[1][0])]), ["a", "b"])
    clf.remember(np.stack([load_image(paths[0][1])]), ["a"])
    assert clf.labels == ["a", "b"]
    assert sorted(clf.memory.values[clf.memory.values >= 0].tolist()) in ([0, 1], [0, 0, 1])  # hit or miss
    assert clf.predict(np.stack([load_image(paths[1][0])]))[0] == ["b"]
    clf.clear()
    with pytest.raises(ValueError, match="memory is empty"):
        clf.predict(np.stack([load_image(paths[1][0])]))


def test_bad_input_is_named_and_changes_nothing(drawings, run_folder, tmp_path):
    clf = OneShotClassifier.from_checkpoint(run_folder)
    image = load_image(next(iter(drawings.values()))[0])
    clf.remember(image[None], ["x"])
    before = clf.memory.state()
    for images, labels, error, match in [
        (image[None], ["x", "y"], ValueError, "labels: expected one label per image"),
        (image, ["x"], ValueError, r"images: expected images \[n, 28, 28\]"),
        ((image[None] * 255).astype(np.uint8), ["x"], TypeError, "images: expected floating"),
        (np.full((1, 28, 28), np.nan, np.float32), ["x"], ValueError, "images: contains NaN"),
    ]:
        with pytest.raises(error, match=match):
            clf.remember(images, labels)
        assert all(torch.equal(before[k], v) for k, v in clf.memory.state().items()) and clf.labels == ["x"]
    with pytest.raises(FileNotFoundError, match="checkpoint: no model.pt"):
        find_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="image: no such file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        load_image(tmp_path / "bad.png")


def test_cli_classifies_a_query_folder_and_reports_accuracy(drawings, run_folder, tmp_path, capsys):
    support, query = tmp_path / "support", tmp_path / "query"
    for i, paths in enumerate(drawings.values()):
        for folder in (support, query):  # query = the support drawings themselves: exact answers
            (folder / f"char{i}").mkdir(parents=True)
            (folder / f"char{i}" / "a.png").write_bytes(paths[0].read_bytes())
    (query / "char0" / "b.png").write_bytes(drawings[next(iter(drawings))][1].read_bytes())
    result = omniglot_classify.main([str(run_folder), "--support", str(support), "--query", str(query),
                                     "--json", str(tmp_path / "out.json")])
    rows = {r["image"]: r["label"] for r in result["predictions"]}
    assert all(rows[str(query / f"char{i}" / "a.png")] == f"char{i}" for i in range(CLASSES))
    assert len(rows) == CLASSES + 1 and json.loads((tmp_path / "out.json").read_text()) == result
    assert "accuracy" in capsys.readouterr().out and result["accuracy"] >= 100 * CLASSES / (CLASSES + 1)
    with pytest.raises(SystemExit) as exit_:  # one line, no traceback
        omniglot_classify.main([str(run_folder), "--support", str(tmp_path / "nope"), "--query", str(query)])
    assert exit_.value.code == 2 and "error: --support: no such folder" in capsys.readouterr().err
