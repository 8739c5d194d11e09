"""Training checkpoints in a run folder: one format, written and read here only.

    checkpoints/<name>/model.pt      model, optimizer, config (plain data), step, curve, task state
    checkpoints/<name>/memory.arrow  a local memory, or memory/ (one part per shard + manifest)
    checkpoints/latest.json          {"name", "step"}: written last, so it names a complete checkpoint

model.pt is read with `torch.load(weights_only=True)`: tensors and plain Python data only, so a
checkpoint from elsewhere cannot run code when it is loaded.
"""

from __future__ import annotations

import io
import json
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from distmem.memory import LocalMemory, Memory
from distmem.runs import RunStore

LATEST = "checkpoints/latest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely (not tensors and plain data, or damaged)."""


def latest(store: RunStore) -> str | None:
    """The run folder's latest checkpoint ("checkpoints/<name>"), or None."""
    if not store.exists(LATEST):
        return None
    return f"checkpoints/{json.loads(store.read_text(LATEST))['name']}"


def step_name(step: int) -> str:
    """The name training gives the checkpoint of `step`: "step-0002000"."""
    return f"step-{step:07d}"


def at_step(store: RunStore, step: int) -> str | None:
    """The run's checkpoint of `step` ("checkpoints/step-0002000"), or None if none was saved there."""
    checkpoint = f"checkpoints/{step_name(step)}"
    return checkpoint if store.exists(f"{checkpoint}/model.pt") else None


def read_payload(data: bytes, where: str) -> dict[str, Any]:
    """A model.pt payload from its bytes, on the CPU, refusing anything but tensors and plain data."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"checkpoint: {where} is not a distmem checkpoint of tensors and plain data "
                              f"(refused to unpickle it: {str(err).splitlines()[0]})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint: {where} holds a {type(payload).__name__}, expected a dict")
    return payload


def upgrade(payload: dict[str, Any]) -> dict[str, Any]:
    """A payload written before the one training loop, in today's terms: Omniglot counted its
    updates as "batch" and kept its evaluation points as "curve"; the rare-symbol task kept its
    stream position as "rare_exhausted_at"."""
    if "evals" in payload:
        return payload
    payload = dict(payload)
    if "batch" in payload:  # Omniglot
        payload["step"] = payload.pop("batch")
        payload["evals"] = [{"step": point.pop("batch"), **point} for point in map(dict, payload.get("curve", []))]
        payload["curve"] = []
    else:
        payload["evals"] = []
    payload.setdefault("summary", {"rare_exhausted_at": payload.get("rare_exhausted_at")}
                       if "rare_exhausted_at" in payload else {})
    return payload


def load(store: RunStore, checkpoint: str) -> dict[str, Any]:
    """The model.pt payload of checkpoint folder `checkpoint` of the run (on the CPU)."""
    return upgrade(read_payload(store.read_bytes(f"{checkpoint}/model.pt"), store.location(f"{checkpoint}/model.pt")))


def save(store: RunStore, name: str, payload: dict[str, Any], memory: Memory | None = None) -> None:
    """Write checkpoints/<name>/ (model.pt = payload, and the memory), then point latest.json at it.

    A sharded memory writes its own parts (each shard writes its own; nothing passes through
    this process); a local one is written here as memory.arrow."""
    sharded = memory is not None and not isinstance(memory, LocalMemory)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(payload, Path(tmp) / "model.pt")
        if memory is not None and not sharded:
            memory.save(Path(tmp) / "memory.arrow")
        store.upload(tmp, f"checkpoints/{name}")
    if sharded:
        memory.save(store.location(f"checkpoints/{name}/memory"))
    store.write_text(LATEST, json.dumps({"name": name, "step": payload.get("step")}))


def memory_location(store: RunStore, checkpoint: str) -> str | None:
    """Where the memory of `checkpoint` is (a file or a sharded folder), or None if it has none."""
    for rel in (f"{checkpoint}/memory.arrow", f"{checkpoint}/memory"):
        if store.exists(rel):
            return store.location(rel)
    return None


def restore_memory(memory: Memory, store: RunStore, checkpoint: str) -> bool:
    """Load the memory saved with `checkpoint` into `memory`; False if the checkpoint has none."""
    where = memory_location(store, checkpoint)
    if where is None:
        return False
    if "://" not in where:
        memory.load(where)
        return True
    with tempfile.TemporaryDirectory() as tmp:  # a LocalMemory reads local files
        rel = where[len(store.uri) + 1:]
        memory.load(store.download(rel, Path(tmp) / Path(rel).name))
    return True


def restore(store: RunStore, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
            ) -> dict[str, Any] | None:
    """Load the run's latest checkpoint into `model` (and `optimizer`); returns its payload, or None
    (a new run: both left as they are)."""
    checkpoint = latest(store)
    if checkpoint is None:
        return None
    saved = load(store, checkpoint)
    model.load_state_dict(saved["model"])
    if optimizer is not None:
        optimizer.load_state_dict(saved["optimizer"])
    return saved
