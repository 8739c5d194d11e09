"""Memory files, checkpoints and write logs, all Arrow.

A memory file holds the slots [lo, lo + rows) of a memory: columns keys (fixed_size_list<float>[d]),
values (int64), ages (int64); schema metadata "distmem" (JSON) holds the config, lo, the step and
the recent slots of that range. Arrow IPC, or Parquet for a `.parquet` path. Keys are stored as
float32 whatever the key dtype, so round trips are exact.

A checkpoint folder holds one memory file per shard plus `manifest.json` (written last) listing
the parts; `read_range` reads any slot range from a file or a folder, so a checkpoint loads into a
memory with any number of shards.
"""

from __future__ import annotations

import json
import os
from os import PathLike
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from distmem.config import MemoryConfig
from distmem.rules import RecentSlots, ShardWrite

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_RECENT = ("recent_labels", "recent_slots", "recent_seqs")


def _keys_array(keys: Tensor) -> pa.Array:
    flat = keys.detach().float().cpu().contiguous().numpy()
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


def _keys_tensor(column: pa.ChunkedArray, rows: int) -> Tensor:
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return torch.from_numpy(np.array(flat, dtype=np.float32).reshape(rows, column.type.list_size))


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path), then rename onto `path`: a failed write leaves the old file intact."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_table(path: Path, table: pa.Table) -> None:
    def write(tmp: Path) -> None:
        if path.suffix == ".parquet":
            pq.write_table(table, tmp)
        else:
            with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
    _atomic_write(path, write)


def _read_table(path: Path) -> pa.Table:
    if not path.is_file():
        raise FileNotFoundError(f"path: {path} does not exist")
    try:
        if path.suffix == ".parquet":
            return pq.read_table(path)
        with pa.memory_map(str(path)) as source:
            return ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as err:  # truncated or not Arrow at all
        raise ValueError(f"path: {path} is not a readable Arrow / Parquet file ({err})") from None


def _check_columns(path: str | PathLike, table: pa.Table, key_dim: int) -> None:
    """The memory file's columns have the types and sizes it promises (a damaged or foreign file
    is refused before anything is loaded)."""
    keys = table.schema.field("keys").type
    if not (pa.types.is_fixed_size_list(keys) and pa.types.is_floating(keys.value_type) and keys.list_size == key_dim):
        raise ValueError(f"path: {path}: column 'keys' must be fixed_size_list<float>[{key_dim}], got {keys}")
    for name in ("values", "ages"):
        if not pa.types.is_integer(table.schema.field(name).type):
            raise ValueError(f"path: {path}: column {name!r} must be integers, got {table.schema.field(name).type}")
    if table.column("keys").null_count or table.column("values").null_count or table.column("ages").null_count:
        raise ValueError(f"path: {path}: memory columns hold nulls")


def write_memory_file(path: str | PathLike, config: MemoryConfig, state: dict[str, Tensor], lo: int = 0) -> None:
    """Write the state of slots [lo, lo + n) (as `LocalMemory.state()` / `MemoryShard.state()`)."""
    meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "lo": lo,
            "step": int(state.get("step", 0))}
    for name in _RECENT:
        if name in state:
            meta[name] = state[name].tolist()
    table = pa.table({"keys": _keys_array(state["keys"]), "values": pa.array(state["values"].cpu().numpy()),
                      "ages": pa.array(state["ages"].cpu().numpy())})
    _write_table(Path(path), table.replace_schema_metadata({"distmem": json.dumps(meta)}))


def read_memory_file(path: str | PathLike) -> tuple[MemoryConfig, dict[str, Tensor], int]:
    """(config, state of the file's slots, lo) from a file written by `write_memory_file`."""
    table = _read_table(Path(path))
    raw = (table.schema.metadata or {}).get(b"distmem")
    if raw is None or not {"keys", "values", "ages"} <= set(table.column_names):
        raise ValueError(f"path: {path} is not a distmem memory file (no 'distmem' metadata or missing columns)")
    try:
        meta = json.loads(raw)
        config = MemoryConfig.from_dict(meta["config"])
        step, lo = int(meta["step"]), int(meta.get("lo", 0))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"path: {path}: damaged 'distmem' metadata ({err})") from None
    _check_columns(path, table, config.key_dim)
    if not 0 <= lo <= lo + table.num_rows <= config.size:
        raise ValueError(f"path: {path}: slots [{lo}, {lo + table.num_rows}) lie outside the memory's "
                         f"{config.size} slots")
    state = {"keys": _keys_tensor(table.column("keys"), table.num_rows),
             "values": torch.from_numpy(table.column("values").to_numpy().astype(np.int64)),
             "ages": torch.from_numpy(table.column("ages").to_numpy().astype(np.int64)),
             "step": torch.tensor(step)}
    for name in _RECENT:
        if name in meta:
            try:
                state[name] = torch.tensor(meta[name], dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"path: {path}: damaged {name!r} metadata ({err})") from None
    return config, state, lo


def write_manifest(folder: str | PathLike, config: MemoryConfig, step: int, parts: list[tuple[str, int, int]]) -> None:
    """Finish a checkpoint folder: the manifest names the part files (file, lo, hi)."""
    body = json.dumps({"format_version": FORMAT_VERSION, "config": config.to_dict(), "step": step,
                       "parts": [{"file": f, "lo": lo, "hi": hi} for f, lo, hi in parts]}, indent=1)
    _atomic_write(Path(folder) / MANIFEST, lambda tmp: tmp.write_text(body))


def read_manifest(folder: str | PathLike) -> tuple[MemoryConfig, list[tuple[Path, int, int]]]:
    """(config, parts as (file, lo, hi)) of a checkpoint folder. Every part must be a plain file
    name inside the folder: a manifest naming "../x", an absolute path or a URI is refused."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"path: {folder} has no {MANIFEST}; not a finished distmem checkpoint")
    try:
        body = json.loads(manifest.read_text())
        config = MemoryConfig.from_dict(body["config"])
        parts = [(str(p["file"]), int(p["lo"]), int(p["hi"])) for p in body["parts"]]
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"path: {manifest} is damaged ({err})") from None
    for name, lo, hi in parts:
        if name in ("", ".", "..") or "/" in name or "\\" in name or ":" in name:
            raise ValueError(f"path: {manifest} names the part {name!r}, which is not a file inside {folder}; "
                             "refused")
        if not 0 <= lo < hi <= config.size:
            raise ValueError(f"path: {manifest}: part {name!r} has slots [{lo}, {hi}) outside [0, {config.size})")
    return config, [(folder / name, lo, hi) for name, lo, hi in parts]


def read_config(path: str | PathLike) -> MemoryConfig:
    """The config stored in a memory file or checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        return read_manifest(path)[0]
    return read_memory_file(path)[0]


def read_config_for(path: str | PathLike, config: MemoryConfig) -> MemoryConfig:
    """The config stored in `path`, which must hold a memory of `config`'s size and key size."""
    stored = read_config(path)
    if (stored.size, stored.key_dim) != (config.size, config.key_dim):
        raise ValueError(f"path: {path} holds a memory of size={stored.size}, key_dim={stored.key_dim}; "
                         f"this one has size={config.size}, key_dim={config.key_dim}")
    return stored


def slice_state(state: dict[str, Tensor], rows: slice, lo: int, hi: int) -> dict[str, Tensor]:
    """keys / values / ages [rows], and the recent entries whose slot lies in [lo, hi)."""
    piece = {name: state[name][rows] for name in ("keys", "values", "ages")}
    if "recent_slots" in state:
        inside = (state["recent_slots"] >= lo) & (state["recent_slots"] < hi)
        piece.update({name: state[name][inside] for name in _RECENT if name in state})
    return piece


def read_range(path: str | PathLike, lo: int, hi: int) -> tuple[MemoryConfig, dict[str, Tensor]]:
    """State of slots [lo, hi) from a memory file or a checkpoint folder (recent slots: those of
    the range, global ids)."""
    path = Path(path)
    if path.is_dir():
        config, parts = read_manifest(path)
    elif path.is_file():
        config, state, file_lo = read_memory_file(path)
        parts = [(path, file_lo, file_lo + len(state["values"]))]
    else:
        raise FileNotFoundError(f"path: memory file or checkpoint folder {path} does not exist")
    pieces, steps, covered = [], set(), lo
    for file, p_lo, p_hi in sorted(parts, key=lambda p: p[1]):
        if p_hi <= lo or p_lo >= hi:
            continue
        part_config, part, part_lo = read_memory_file(file)
        if part_lo != p_lo or len(part["values"]) != p_hi - p_lo or part_config.key_dim != config.key_dim:
            raise ValueError(f"path: {file} holds slots [{part_lo}, {part_lo + len(part['values'])}) of key size "
                             f"{part_config.key_dim}; the manifest promises [{p_lo}, {p_hi}) of {config.key_dim}")
        a, b = max(lo, p_lo) - p_lo, min(hi, p_hi) - p_lo
        if p_lo + a != covered:
            break
        covered = p_lo + b
        steps.add(int(part["step"]))
        pieces.append(slice_state(part, slice(a, b), lo, hi))
    if covered != hi:
        raise ValueError(f"path: {path} does not hold slots [{lo}, {hi}) (it covers up to {covered})")
    if len(steps) != 1:
        raise ValueError(f"path: {path} mixes parts from different steps {sorted(steps)}")
    state = {name: torch.cat([p[name] for p in pieces]) for name in pieces[0]}
    if len(pieces) > 1:  # a label may have a recent slot in several parts: R keeps its newest
        recent = RecentSlots()
        recent.update(*(state[name] for name in _RECENT))
        state.update(recent.state())
    state["step"] = torch.tensor(steps.pop())
    return config, state


def write_log_entry(path: str | PathLike, step: int, write: ShardWrite) -> None:
    """One update of one shard, durable before the shard applies it."""
    recent = pa.table({name: pa.array(getattr(write, name).cpu().numpy()) for name in _RECENT})
    table = pa.table({"slots": pa.array(write.slots.cpu().numpy()), "keys": _keys_array(write.keys),
                      "values": pa.array(write.values.cpu().numpy())})
    meta = {"step": step, "recent": {name: recent.column(name).to_pylist() for name in _RECENT}}
    _write_table(Path(path), table.replace_schema_metadata({"distmem_log": json.dumps(meta)}))


def read_log_entry(path: str | PathLike) -> tuple[int, ShardWrite]:
    table = _read_table(Path(path))
    meta = json.loads(table.schema.metadata[b"distmem_log"])
    recent = {name: torch.tensor(meta["recent"][name], dtype=torch.int64) for name in _RECENT}
    write = ShardWrite(slots=torch.from_numpy(table.column("slots").to_numpy().astype(np.int64)),
                       keys=_keys_tensor(table.column("keys"), table.num_rows),
                       values=torch.from_numpy(table.column("values").to_numpy().astype(np.int64)), **recent)
    return int(meta["step"]), write
