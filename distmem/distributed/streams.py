"""Ray Data streams of Parquet files outside a trainer (benchmarks, tools): one consumer reads
the files' rows in order, batch by batch, as a Ray Train worker's dataset shard would."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import ray.data

from distmem.distributed.cluster import connect


def parquet_batches(paths: Sequence[str], columns: Sequence[str], batch_rows: int,
                    address: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch_rows` rows ({column: array}) of the Parquet `paths`, read by Ray Data."""
    connect(address)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset = ray.data.read_parquet(list(paths), columns=list(columns))
    yield from dataset.iter_batches(batch_size=batch_rows, batch_format="numpy")
