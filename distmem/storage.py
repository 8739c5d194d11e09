"""Memory files: one Arrow table (Arrow IPC, or Parquet for a `.parquet` path).

Columns: keys (fixed_size_list<float>[d]), values (int64), ages (int64); schema metadata
"distmem" holds the config, the step and the recent label -> slot table as JSON. Keys are
stored as float32 whatever the key dtype, so the round trip is exact.
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

FORMAT_VERSION = 1


def state_to_table(config: MemoryConfig, state: dict[str, Tensor]) -> pa.Table:
    keys = state["keys"].float().cpu().numpy()
    n, d = keys.shape
    meta = {
        "format_version": FORMAT_VERSION, "config": config.to_dict(), "step": int(state.get("step", 0)),
        "recent_labels": state.get("recent_labels", torch.empty(0, dtype=torch.int64)).tolist(),
        "recent_slots": state.get("recent_slots", torch.empty(0, dtype=torch.int64)).tolist(),
    }
    table = pa.table({
        "keys": pa.FixedSizeListArray.from_arrays(pa.array(keys.reshape(-1)), d),
        "values": pa.array(state["values"].cpu().numpy()),
        "ages": pa.array(state["ages"].cpu().numpy()),
    })
    return table.replace_schema_metadata({"distmem": json.dumps(meta)})


def table_to_state(table: pa.Table, source: str = "table") -> tuple[MemoryConfig, dict[str, Tensor]]:
    raw = (table.schema.metadata or {}).get(b"distmem")
    if raw is None or not {"keys", "values", "ages"} <= set(table.column_names):
        raise ValueError(f"{source}: not a distmem memory file (no 'distmem' metadata or missing columns)")
    meta = json.loads(raw)
    config = MemoryConfig.from_dict(meta["config"])
    keys = table.column("keys").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    state = {
        "keys": torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32).reshape(table.num_rows, -1).copy()),
        "values": torch.from_numpy(table.column("values").to_numpy().astype(np.int64)),
        "ages": torch.from_numpy(table.column("ages").to_numpy().astype(np.int64)),
        "step": torch.tensor(int(meta["step"])),
        "recent_labels": torch.tensor(meta["recent_labels"], dtype=torch.int64),
        "recent_slots": torch.tensor(meta["recent_slots"], dtype=torch.int64),
    }
    return config, state


def write_memory_file(path: str | PathLike, config: MemoryConfig, state: dict[str, Tensor]) -> None:
    """Write atomically: a temporary file beside `path`, then a rename (a failed save leaves
    any earlier file intact)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: folder {path.parent} does not exist")
    table = state_to_table(config, state)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix == ".parquet":
            pq.write_table(table, tmp)
        else:
            with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_memory_file(path: str | PathLike) -> tuple[MemoryConfig, dict[str, Tensor]]:
    """Config and state from a file written by `write_memory_file`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: memory file {path} does not exist")
    if path.suffix == ".parquet":
        table = pq.read_table(path)
    else:
        with pa.memory_map(str(path)) as source:
            table = ipc.open_file(source).read_all()
    return table_to_state(table, str(path))
