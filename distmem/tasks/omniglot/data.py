"""Omniglot from the two official zips, decoded once to 28x28 and cached as .npz.

Layout inside each zip: images_<set>/<Alphabet>/characterNN/<id>_<drawer>.png, 105x105, 1-bit.
Characters are numbered by (set, alphabet, character) in sorted order: background 0..963,
evaluation 964..1622. Images are resized to 28x28 (Lanczos) with ink = 1.0.

Splits (`make_split`):
- "released" (Kaiser et al.'s code): train = background characters x 4 rotations as extra classes
  (3,856 classes), test = evaluation characters (659 classes).
- "vinyals" (Vinyals et al. 2016): all 1,623 characters in the order above; the first 1,200 x 4
  rotations for training (4,800 classes), the other 423 for test.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ZIPS = ("images_background.zip", "images_evaluation.zip")
IMAGE_SIZE = 28
DRAWINGS = 20


def default_data_dir() -> Path:
    """$DISTMEM_DATA/omniglot, else ../shared/data/omniglot beside the working directory or the
    source checkout."""
    if os.environ.get("DISTMEM_DATA"):
        return Path(os.environ["DISTMEM_DATA"]) / "omniglot"
    candidates = [Path.cwd().parent / "shared/data/omniglot",
                  Path(__file__).resolve().parents[4] / "shared/data/omniglot"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTMEM_CACHE", Path.home() / ".cache" / "distmem"))


@dataclass
class Split:
    """images [n, 28, 28] float32 in [0, 1]; labels [n] int64 class ids 0..num_classes-1."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    _by_class: list[np.ndarray] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"images ({len(self.images)}) and labels ({len(self.labels)}) differ in length")

    def by_class(self) -> list[np.ndarray]:
        """Image indices of each class, 0..num_classes-1 (computed once)."""
        if self._by_class is None:
            order = np.argsort(self.labels, kind="stable")
            bounds = np.searchsorted(self.labels[order], np.arange(self.num_classes + 1))
            self._by_class = [order[bounds[c]:bounds[c + 1]] for c in range(self.num_classes)]
        return self._by_class


def _to_small(img) -> np.ndarray:
    """A PIL image -> uint8 [28, 28], ink bright (the zips' drawings are dark ink on white)."""
    from PIL import Image  # noqa: PLC0415 - decoding runs once, before the cache exists

    return 255 - np.asarray(img.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS))


def load_image(path: str | os.PathLike) -> np.ndarray:
    """One drawing (any size; dark ink on a light background, as in Omniglot) -> float32 [28, 28] in
    [0, 1], preprocessed exactly as the training images."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image: no such file {path}")
    try:
        with Image.open(path) as img:
            return _to_small(img).astype(np.float32) / 255.0
    except UnidentifiedImageError as e:
        raise ValueError(f"image: {path} is not an image file PIL can read") from e


def _decode_zip(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image  # noqa: PLC0415 - decoding runs once, before the cache exists

    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))
        chars = sorted({n.rsplit("/", 1)[0] for n in names})
        index = {c: i for i, c in enumerate(chars)}
        images = np.empty((len(names), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        labels = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names):
            with Image.open(io.BytesIO(z.read(name))) as img:
                images[i] = _to_small(img)
            labels[i] = index[name.rsplit("/", 1)[0]]
    return images, labels, chars


def load_omniglot(data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                  progress: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"background": (images uint8 [19280, 28, 28], char ids [19280]), "evaluation": (...[13180])}.

    data_dir: a local folder with the two zips, or a URI that pyarrow.fs opens (s3://bucket/omniglot,
    gs://..., file:///...). Decodes the zips on first use (about ten seconds) and caches the arrays
    in `cache_dir` (a remote zip is downloaded into the cache first).
    """
    remote = data_dir is not None and "://" in str(data_dir)
    if data_dir is None:
        data_dir = default_data_dir()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = {}
    for zip_name in ZIPS:
        size = _zip_size(data_dir, zip_name, remote)
        key = f"{zip_name.removesuffix('.zip')}-{size}-{IMAGE_SIZE}.npz"
        cached = cache_dir / "omniglot" / key
        if cached.is_file():
            with np.load(cached) as f:
                images, labels = f["images"], f["labels"]
        else:
            path = Path(data_dir) / zip_name
            if progress:
                print(f"decoding {data_dir}/{zip_name} once into {cached} ...", flush=True)
            cached.parent.mkdir(parents=True, exist_ok=True)
            if remote:
                from distmem.runs import RunStore  # noqa: PLC0415 - only for remote data
                path = RunStore(data_dir).download(zip_name, cached.with_name(f"{zip_name}.tmp-{os.getpid()}"))
            images, labels, _ = _decode_zip(path)
            if remote:
                path.unlink()
            tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}.npz")
            np.savez(tmp, images=images, labels=labels)
            os.replace(tmp, cached)
        out[zip_name.removeprefix("images_").removesuffix(".zip")] = (images, labels)
    return out


def _zip_size(data_dir: str | os.PathLike, zip_name: str, remote: bool) -> int:
    """The zip's size in bytes (it keys the cache); a clear error when it is missing."""
    size = None
    if remote:
        from distmem.runs import RunStore  # noqa: PLC0415
        store = RunStore(data_dir)
        if store.exists(zip_name):
            size = store.fs.get_file_info(store.path(zip_name)).size
    elif (Path(data_dir) / zip_name).is_file():
        size = (Path(data_dir) / zip_name).stat().st_size
    if size is None:
        raise FileNotFoundError(f"data_dir: missing {str(data_dir).rstrip('/')}/{zip_name}; expected the Omniglot "
                                f"zips {ZIPS} (see shared/data/README.md), or pass --data DIR (a folder or a URI)")
    return size


def _with_rotations(images: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Each rotation by r * 90 degrees (r = 0..3) is a class of its own: id + r * num_classes."""
    imgs = [np.rot90(images, r, axes=(1, 2)) for r in range(4)]
    return np.concatenate(imgs), np.concatenate([labels + r * num_classes for r in range(4)])


def make_split(raw: dict[str, tuple[np.ndarray, np.ndarray]], kind: str = "released") -> tuple[Split, Split]:
    """(train, test) for kind "released" or "vinyals" (see the module docstring)."""
    bg_images, bg_labels = raw["background"]
    ev_images, ev_labels = raw["evaluation"]
    n_bg = int(bg_labels.max()) + 1
    if kind == "released":
        train_images, train_labels, n_train = bg_images, bg_labels, n_bg
        test_images, test_labels = ev_images, ev_labels
    elif kind == "vinyals":
        images = np.concatenate([bg_images, ev_images])
        labels = np.concatenate([bg_labels, ev_labels + n_bg])
        n_train = 1200
        train = labels < n_train
        train_images, train_labels = images[train], labels[train]
        test_images, test_labels = images[~train], labels[~train] - n_train
    else:
        raise ValueError(f"split must be 'released' or 'vinyals', got {kind!r}")
    train_images, train_labels = _with_rotations(train_images, train_labels, n_train)
    to_float = lambda x: (x.astype(np.float32) / 255.0)  # noqa: E731
    return (Split(to_float(train_images), train_labels, 4 * n_train),
            Split(to_float(test_images), test_labels.astype(np.int64), int(test_labels.max()) + 1))
