"""Prepare parallel corpora for training: read, clean, one joint sentencepiece model, Parquet
shards and a manifest (spec: shared/docs/translation-task.md, "Data pipeline").

    prepare([("train.en.gz", "train.de.gz")], "data/multi30k", PrepareSettings(vocab=8000))

- Inputs: pairs of files, plain UTF-8, `.gz` or WMT `.sgm`, local paths or `pyarrow.fs` URIs.
- Streaming: corpora are read line by line twice (once to hash them and write the tokeniser's
  text to a temporary file, from which sentencepiece keeps a reservoir sample of at most
  `sample_sentences`; once to encode), so memory does not grow with the corpus; encoding runs on
  every core (sentencepiece's own threads).
- Cleaning: whitespace stripped; a pair is dropped when a side is empty, has more than
  `max_pieces` pieces, or (when the longer side has more than `ratio_min_pieces`) the length
  ratio is above `max_ratio`. Every kind of drop is counted in the manifest.
- Output: `shard-NNNNN.parquet` files of at most `shard_pairs` pairs (src, tgt: list<int32>
  token ids without bos/eos; src_len, tgt_len: int32; corpus: int16; line: int64, 1-based),
  shuffled (seeded) within each chunk of 20,000 pairs, so consecutive rows make random batches;
  `spm.model`, and `manifest.json`. Written to a temporary folder renamed when complete, so a
  failed run leaves nothing; a folder prepared from the same inputs and settings is reused.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
SPM_MODEL = "spm.model"
FORMAT_VERSION = 1
PAD, UNK, BOS, EOS = 0, 1, 2, 3
_SEG = re.compile(r"<seg[^>]*>(.*)</seg>")
SCHEMA = pa.schema([("src", pa.list_(pa.int32())), ("tgt", pa.list_(pa.int32())), ("src_len", pa.int32()),
                    ("tgt_len", pa.int32()), ("corpus", pa.int16()), ("line", pa.int64())])


@dataclass(frozen=True)
class PrepareSettings:
    """vocab: joint sentencepiece vocabulary (32,000 for WMT14, 8,000 for Multi30k).
    sample_sentences: the tokeniser trains on a shuffled sample of at most this many sentences.
    shard_pairs: pairs per Parquet file. threads: encoding threads (0: every core)."""

    vocab: int = 32000
    max_pieces: int = 250
    max_ratio: float = 1.5
    ratio_min_pieces: int = 10
    sample_sentences: int = 10_000_000
    character_coverage: float = 1.0
    model_type: str = "unigram"
    shard_pairs: int = 100_000
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab", "max_pieces", "sample_sentences", "shard_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.vocab < 8:
            raise ValueError(f"vocab: expected >= 8 (4 ids are reserved), got {self.vocab}")
        if not self.max_ratio >= 1:
            raise ValueError(f"max_ratio: expected >= 1, got {self.max_ratio}")

    def key(self) -> dict[str, Any]:
        """The settings that decide the prepared data (threads do not)."""
        return {k: v for k, v in asdict(self).items() if k != "threads"}


@dataclass(frozen=True)
class Prepared:
    """A prepared data set: its folder, Parquet files, tokeniser and manifest."""

    root: Path
    manifest: dict[str, Any]
    reused: bool = False
    seconds: dict[str, float] = field(default_factory=dict)  # per phase: inputs (hashing), tokeniser, encode

    @property
    def files(self) -> list[Path]:
        return [self.root / f["file"] for f in self.manifest["files"]]

    @property
    def spm_model(self) -> Path:
        return self.root / SPM_MODEL

    @property
    def counts(self) -> dict[str, int]:
        return self.manifest["counts"]


class DataError(ValueError):
    """A corpus that cannot be prepared (the message names the file and, where known, the line)."""


# -- reading -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _open_binary(path: str) -> Iterator[IO[bytes]]:
    """A local path or a pyarrow.fs URI, as a binary stream (gunzipped for .gz)."""
    if "://" in path:
        import pyarrow.fs as pafs  # noqa: PLC0415
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
            raw: IO[bytes] = fs.open_input_stream(inner, compression=None)  # gunzipped below, as local files
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"{path}: cannot open ({err})") from None
    else:
        if not Path(path).is_file():
            raise DataError(f"{path}: no such file")
        raw = open(path, "rb")  # noqa: SIM115 - closed below
    try:
        stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
        yield io.BufferedReader(stream) if not isinstance(stream, io.BufferedReader) else stream
    finally:
        raw.close()


def read_lines(path: str, digest: Any = None) -> Iterator[str]:
    """The segments of a corpus file, stripped: every line, or for `.sgm` every `<seg>` (tags
    removed, whitespace collapsed, as sacreBLEU reads them). `digest` (a hashlib object) is fed
    the raw bytes. Invalid UTF-8 is a `DataError` naming the file and the line."""
    sgm = path.endswith((".sgm", ".sgm.gz"))
    with _open_binary(path) as stream:
        try:
            for number, raw in enumerate(stream, 1):
                if digest is not None:
                    digest.update(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}: line {number} is not valid UTF-8 ({err.reason} at byte "
                                    f"{err.start})") from None
                if sgm:
                    if not line.lstrip().startswith("<seg"):
                        continue
                    match = _SEG.search(line)
                    line = " ".join(match.group(1).split()) if match else ""
                yield line.strip()
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise DataError(f"{path}: cannot be read ({err})") from None


def read_pairs(src: str, tgt: str, digests: tuple[Any, Any] | None = None) -> Iterator[tuple[int, str, str]]:
    """(line number, source, target) of a parallel corpus; different line counts are a
    `DataError` naming both files."""
    left = read_lines(src, digests[0] if digests else None)
    right = read_lines(tgt, digests[1] if digests else None)
    for number, (s, t) in enumerate(itertools.zip_longest(left, right), 1):
        if s is None or t is None:  # one side ended: count the other's remaining lines for the message
            n_src = number - 1 + (s is not None) + sum(1 for _ in left)
            n_tgt = number - 1 + (t is not None) + sum(1 for _ in right)
            raise DataError(f"{src} has {n_src} lines but {tgt} has {n_tgt}; "
                            "the two sides of a corpus must have one line per pair")
        yield number, s, t


# -- preparing -----------------------------------------------------------------------------------
def _read_inputs(corpora: list[tuple[str, str]], settings: PrepareSettings,
                 text: Path | None) -> tuple[str, list[dict[str, Any]], int]:
    """One pass over the corpora: their sha256 and line counts, and (unless `text` is None) every
    non-empty sentence of both sides written to `text` (the tokeniser's input; sentencepiece
    samples it). Returns the data set's cache key (inputs' sha256 and settings), the inputs'
    descriptions and the number of sentences written."""
    inputs, sentences = [], 0
    with open(text if text is not None else os.devnull, "w", encoding="utf-8") as out:
        for src, tgt in corpora:
            digests = (hashlib.sha256(), hashlib.sha256())
            lines = 0
            for _, s, t in read_pairs(src, tgt, digests):
                lines += 1
                for side in (s, t):
                    if side:
                        out.write(side + "\n")
                        sentences += 1
            inputs.append({"src": src, "tgt": tgt, "lines": lines,
                           "src_sha256": digests[0].hexdigest(), "tgt_sha256": digests[1].hexdigest()})
    key = json.dumps({"inputs": [[i["src_sha256"], i["tgt_sha256"]] for i in inputs],
                      "settings": settings.key(), "format_version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest(), inputs, sentences


def _train_tokeniser(text: Path, sentences: int, settings: PrepareSettings, folder: Path, threads: int) -> None:
    """The joint sentencepiece model from the sentences in `text` (a shuffled sample of at most
    `settings.sample_sentences` of them: sentencepiece's reservoir sample, seeded)."""
    import sentencepiece as spm  # noqa: PLC0415

    if sentences == 0:
        raise DataError("the corpora hold no non-empty sentence: nothing to prepare")
    spm.set_random_generator_seed(settings.seed)  # its sampling of input_sentence_size sentences
    try:
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(folder / "spm"), vocab_size=settings.vocab,
            model_type=settings.model_type, character_coverage=settings.character_coverage,
            input_sentence_size=settings.sample_sentences, shuffle_input_sentence=True,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, num_threads=threads, minloglevel=2)
    except RuntimeError as err:
        if "Vocabulary size" in str(err):
            reason = str(err)[str(err).find("Vocabulary size"):].strip().splitlines()[0]
            fits = "more than this text allows" if "too high" in reason else "fewer than this text needs"
            raise DataError(f"vocab: {settings.vocab} pieces is {fits} (sentencepiece: {reason})") from None
        raise
    (folder / "spm.vocab").unlink(missing_ok=True)


def _encode_and_write(corpora: list[tuple[str, str]], settings: PrepareSettings, folder: Path, threads: int,
                      progress: Callable[[int], None] | None, chunk: int = 20_000) -> tuple[Counter, list[dict]]:
    """Encode every pair, clean it, write Parquet shards. Returns (counts, files)."""
    import sentencepiece as spm  # noqa: PLC0415

    sp = spm.SentencePieceProcessor(model_file=str(folder / SPM_MODEL))
    counts: Counter = Counter()
    files: list[dict[str, Any]] = []
    writer: pq.ParquetWriter | None = None
    in_shard = 0

    def flush(rows: dict[str, list]) -> None:
        nonlocal writer, in_shard
        start = 0
        while start < len(rows["line"]):
            if writer is None:
                files.append({"file": f"shard-{len(files):05d}.parquet", "pairs": 0})
                writer = pq.ParquetWriter(folder / files[-1]["file"], SCHEMA)
                in_shard = 0
            take = min(settings.shard_pairs - in_shard, len(rows["line"]) - start)
            part = pa.table({name: values[start:start + take] for name, values in rows.items()}, schema=SCHEMA)
            writer.write_table(part)
            files[-1]["pairs"] += take
            in_shard += take
            start += take
            if in_shard == settings.shard_pairs:
                writer.close()
                writer = None

    def chunks() -> Iterator[list[tuple[int, int, str, str]]]:
        """(corpus, line, source, target) of the non-empty pairs, `chunk` at a time."""
        batch = []
        for corpus, (src, tgt) in enumerate(corpora):
            for line, s, t in read_pairs(src, tgt):
                counts["read"] += 1
                if not s or not t:
                    counts["dropped_empty"] += 1
                    continue
                batch.append((corpus, line, s, t))
                if len(batch) == chunk:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def process(index: int, batch: list[tuple[int, int, str, str]]) -> None:
        src_ids = sp.encode([b[2] for b in batch], num_threads=threads)
        tgt_ids = sp.encode([b[3] for b in batch], num_threads=threads)
        rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        for (corpus, line, _, _), s, t in zip(batch, src_ids, tgt_ids):
            longer, shorter = max(len(s), len(t)), min(len(s), len(t))
            if longer > settings.max_pieces:
                counts["dropped_too_long"] += 1
            elif longer > settings.ratio_min_pieces and longer > settings.max_ratio * shorter:
                counts["dropped_ratio"] += 1
            else:
                for name, value in zip(SCHEMA.names, (s, t, len(s), len(t), corpus, line)):
                    rows[name].append(value)
        counts["kept"] += len(rows["line"])
        order = np.random.default_rng([settings.seed, index]).permutation(len(rows["line"]))
        flush({name: [values[i] for i in order] for name, values in rows.items()})
        if progress is not None:
            progress(len(batch))

    try:
        for index, batch in enumerate(chunks()):
            process(index, batch)
    finally:
        if writer is not None:
            writer.close()
    if counts["kept"] == 0:
        raise DataError(f"no pair is left after cleaning ({dict(counts)}): nothing to train on")
    return counts, files


def prepare(corpora: list[tuple[str, str]], out: str | os.PathLike, settings: PrepareSettings | None = None,
            progress: Callable[[int], None] | None = None) -> Prepared:
    """Prepare the parallel `corpora` [(source file, target file), ...] into the folder `out`
    (reused when it already holds the same inputs prepared with the same settings)."""
    settings = settings or PrepareSettings()
    if not corpora:
        raise DataError("corpora: expected at least one (source, target) pair of files")
    corpora = [(str(s), str(t)) for s, t in corpora]
    out = Path(out)
    if (out / MANIFEST).exists():  # reused if prepared from the same inputs and settings
        key = _read_inputs(corpora, settings, None)[0]
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("key") != key:
            raise DataError(f"out: {out} holds a data set prepared from other inputs or settings; "
                            "choose another folder or delete it")
        return Prepared(out, manifest, reused=True)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"out: {out} exists and is not a prepared data set; choose an empty or new folder")
    threads = settings.threads or os.cpu_count() or 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # a normal folder once renamed (mkdtemp makes it private)
    clock = [time.perf_counter()]
    try:
        key, inputs, sentences = _read_inputs(corpora, settings, tmp / "spm-input.txt")
        clock.append(time.perf_counter())
        _train_tokeniser(tmp / "spm-input.txt", sentences, settings, tmp, threads)
        (tmp / "spm-input.txt").unlink()
        clock.append(time.perf_counter())
        counts, files = _encode_and_write(corpora, settings, tmp, threads, progress)
        clock.append(time.perf_counter())
        manifest = {"format_version": FORMAT_VERSION, "key": key, "inputs": inputs, "settings": settings.key(),
                    "special_ids": {"pad": PAD, "unk": UNK, "bos": BOS, "eos": EOS},
                    "counts": {name: counts[name] for name in
                               ("read", "kept", "dropped_empty", "dropped_too_long", "dropped_ratio")},
                    "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Prepared(out, manifest, seconds=dict(zip(("inputs", "tokeniser", "encode"), np.diff(clock).tolist())))


def load_prepared(root: str | os.PathLike) -> Prepared:
    """A prepared data set (its manifest checked, its files present)."""
    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise DataError(f"{root}: no {MANIFEST}; prepare it with `python -m jobs.prepare_translation`")
    manifest = json.loads((root / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{root / MANIFEST}: format_version {manifest.get('format_version')!r}, expected "
                        f"{FORMAT_VERSION}")
    prepared = Prepared(root, manifest)
    for file in [*prepared.files, prepared.spm_model]:
        if not file.resolve().is_relative_to(root.resolve()) or not file.is_file():
            raise DataError(f"{root}: the manifest names {file.name}, which is not a file inside the folder")
    return prepared
