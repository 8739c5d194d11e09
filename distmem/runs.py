"""Run folders that outlive a cluster: a local path or any URI `pyarrow.fs` understands.

    store = RunStore("s3://bucket/runs/omniglot-1")   # or "gs://...", "file:///...", "runs/x"
    store.write_text("progress.json", "...")
    store.upload(local_checkpoint_dir, "checkpoints/batch-0000100")
    store.download("checkpoints/batch-0000100", scratch_dir)

Trainers write their checkpoints to a local scratch folder and upload them; the driver downloads
what it evaluates. Small files are written whole (a reader never sees half a file on object
stores; on a local disk through a temporary name and a rename).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs


class RunStore:
    """One run folder. `uri`: a local path (relative or absolute) or a pyarrow.fs URI."""

    def __init__(self, uri: str | os.PathLike) -> None:
        text = str(uri)
        if "://" in text:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(text)
            except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
                raise ValueError(f"storage: cannot open {text!r} ({err}); expected a local path or a URI "
                                 f"such as s3://bucket/prefix, gs://bucket/prefix or file:///abs/path") from None
            self.uri = text.rstrip("/")
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(text).resolve())
            self.uri = self.root
        self.local = isinstance(self.fs, pafs.LocalFileSystem)  # folders are made by the first write

    def path(self, rel: str) -> str:
        """The filesystem path of `rel` inside the run folder."""
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def location(self, rel: str) -> str:
        """`rel` as a local path or a URI that another `RunStore` or pyarrow.fs opens."""
        return self.path(rel) if self.local else f"{self.uri}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if not self.local:  # object stores publish a whole object on close
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        os.replace(tmp, target)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes:
        if not self.exists(rel):
            raise FileNotFoundError(f"{self.uri}: no {rel}")
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def upload(self, local: str | os.PathLike, rel: str) -> None:
        """Copy a local file or folder (recursively) to `rel`."""
        local = Path(local)
        target = self.path(rel)
        self.fs.create_dir(target if local.is_dir() else target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(Path(local).resolve()), self.path(rel), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def download(self, rel: str, local: str | os.PathLike) -> Path:
        """Copy `rel` (a file or folder) to the local path `local`; returns it."""
        if not self.exists(rel):
            raise FileNotFoundError(f"{self.uri}: no {rel}")
        is_dir = self.fs.get_file_info(self.path(rel)).type == pafs.FileType.Directory
        (Path(local) if is_dir else Path(local).parent).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(rel), str(Path(local).resolve()), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return Path(local)

    def __repr__(self) -> str:
        return f"RunStore({self.uri!r})"
