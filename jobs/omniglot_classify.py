"""Classify new drawings one-shot with a trained Omniglot checkpoint.

    python -m jobs.omniglot_classify runs/omniglot-default-... --support support/ --query query/

--support: a folder with one sub-folder per label (its name), holding a few drawings each (PNG or
any format PIL reads; dark ink on a light background, any size). They are written into a fresh
memory. --query: image files or folders of them; each gets the label of its nearest remembered
drawing. When the query images sit in sub-folders named after labels, the accuracy is printed too.
The Python API is `distmem.tasks.omniglot.OneShotClassifier`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from distmem.cli import user_errors
from distmem.tasks.omniglot import OneShotClassifier
from distmem.tasks.omniglot.data import load_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_support(folder: Path) -> tuple[list[Path], list[str]]:
    """(image files, labels) of a folder of label sub-folders."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--support: no such folder {folder}")
    files, labels = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in _images_in(sub):
            files.append(f)
            labels.append(sub.name)
    if not files:
        raise ValueError(f"--support: {folder} holds no label sub-folders with images")
    return files, labels


def read_queries(paths: list[Path]) -> list[Path]:
    files = []
    for p in paths:
        if p.is_dir():
            files += _images_in(p)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--query: no such file or folder {p}")
    if not files:
        raise ValueError("--query: no images found")
    return files


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run folder (its latest checkpoint), a checkpoint folder or a model.pt")
    p.add_argument("--support", required=True, type=Path, help="folder of label sub-folders with a few drawings each")
    p.add_argument("--query", required=True, nargs="+", type=Path, help="image files or folders to classify")
    p.add_argument("--json", type=Path, default=None, help="also write the predictions to this JSON file")
    args = p.parse_args(argv)
    with user_errors(ValueError):  # here every ValueError is about the given images or folders
        return classify(args)


def classify(args: argparse.Namespace) -> dict:
    support_files, support_labels = read_support(args.support)
    query_files = read_queries(args.query)
    clf = OneShotClassifier.from_checkpoint(args.checkpoint)
    clf.remember(np.stack([load_image(f) for f in support_files]), support_labels)
    predicted, similarity = clf.predict(np.stack([load_image(f) for f in query_files]))

    rows = [{"image": str(f), "label": label, "similarity": float(s)}
            for f, label, s in zip(query_files, predicted, similarity)]
    width = max(len(r["image"]) for r in rows)
    print(f"{len(support_files)} drawings of {len(clf.labels)} labels remembered; {len(rows)} queries")
    print(f"{'image':{width}}  {'label':>12}  similarity")
    for r in rows:
        print(f"{r['image']:{width}}  {r['label']:>12}  {r['similarity']:.3f}")
    result: dict = {"predictions": rows}
    truth = [f.parent.name for f in query_files]
    if all(t in clf.labels for t in truth):
        result["accuracy"] = float(np.mean([r["label"] == t for r, t in zip(rows, truth)]) * 100)
        print(f"accuracy (query sub-folder = true label): {result['accuracy']:.1f}%")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
