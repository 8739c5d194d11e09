"""A toy task of the one trainer, defined outside distmem: a linear map trained with the memory on
rows streamed from Parquet files. Adding it needed no change in distmem.distributed."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from distmem import MemoryConfig, MemoryLayer
from distmem.training import MemorySpec, ParquetSource, Schedule

from sockets import listening


@dataclass(frozen=True)
class ToyConfig:
    paths: tuple[str, ...] = ()
    steps: int = 4
    workers: int = 1
    rows_per_step: int = 8
    shards: int = 1
    checkpoint_every: int = 2
    seed: int = 0
    log_dir: str = ""  # each worker appends the ids of its rows to log_dir/rank-<r>.txt, and writes where its
    # process listens (TCP; during its first step, once the process group is up) to log_dir/listening-<r>.json


def write_rows(folder, files: int = 2, rows: int = 40, dim: int = 6) -> tuple[str, ...]:
    """Parquet files of rows {"id", "x" [dim] floats, "y" < 4}; ids 0..files*rows-1 in file order."""
    paths = []
    rng = np.random.default_rng(0)
    for f in range(files):
        ids = np.arange(f * rows, (f + 1) * rows)
        x = rng.standard_normal((rows, dim)).astype(np.float32)
        table = pa.table({"id": ids, "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim),
                          "y": ids % 4})
        path = f"{folder}/part-{f}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return tuple(paths)


class ToyNet(torch.nn.Module):
    """x [B, 6] -> unit-norm queries [B, 6]."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.layer = torch.nn.Linear(6, 6), MemoryLayer(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.query(F.dropout(self.linear(x), 0.2, self.training))


class ToyTask:
    name = "toy"

    def __init__(self, config: ToyConfig) -> None:
        self.config = config

    def schedule(self) -> Schedule:
        c = self.config
        return Schedule(steps=c.steps, workers=c.workers, log_every=1, checkpoint_every=c.checkpoint_every,
                        seed=c.seed)

    def memory_spec(self) -> MemorySpec:
        return MemorySpec(MemoryConfig(size=64, key_dim=6, k=4, age_noise=0.0), shared=True, shards=self.config.shards)

    def data(self) -> ParquetSource:
        return ParquetSource(self.config.paths, rows_per_step=self.config.rows_per_step)

    def build(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(self.config.seed)
        model = ToyNet()
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    def batches(self, rank: int, world: int, start: int, rows=None) -> Iterator[dict[str, np.ndarray]]:
        self.rank = rank
        buffer: dict[str, list] = {}
        for batch in rows:  # regroup the stream into batches of exactly rows_per_step rows
            for name, column in batch.items():
                buffer.setdefault(name, []).extend(list(column))
            while len(buffer.get("id", [])) >= self.config.rows_per_step:
                n = self.config.rows_per_step
                yield {name: np.stack(values[:n]) for name, values in buffer.items()}
                buffer = {name: values[n:] for name, values in buffer.items()}

    def train_step(self, model, memory, batch, optimizer, step: int) -> dict[str, float]:
        if self.config.log_dir:
            with open(f"{self.config.log_dir}/rank-{self.rank}.txt", "a") as log:
                log.write("".join(f"{int(i)}\n" for i in batch["id"]))
            if step == 0:
                found = listening({os.getpid()})
                with open(f"{self.config.log_dir}/listening-{self.rank}.json", "w") as log:
                    json.dump(None if found is None else sorted(set().union(*found.values())), log)
        model.train()
        x = torch.as_tensor(np.asarray(batch["x"], dtype=np.float32))
        read = memory.read(model(x), torch.as_tensor(batch["y"], dtype=torch.int64))
        optimizer.zero_grad()
        read.loss.backward()
        optimizer.step()
        memory.write(read)
        return {"loss": float(read.loss.detach()), "first_id": float(batch["id"][0])}

    def evaluate(self, model) -> dict[str, float]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}
