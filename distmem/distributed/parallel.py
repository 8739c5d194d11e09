"""Independent pieces of work (an evaluation's parts, say) spread over the cluster's CPUs as Ray
tasks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import ray
from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def map_tasks(fn: Callable[[T], R], items: Sequence[T], cpus: float = 1, desc: str | None = None) -> list[R]:
    """[fn(item) for item in items], each call a Ray task that holds `cpus` CPUs; Ray starts them
    in the order given as CPUs free up (put the longest first). A progress bar with `desc`.
    `fn` must be picklable (a module-level function, or a functools.partial of one)."""
    if not cpus > 0:
        raise ValueError(f"cpus: expected a number > 0, got {cpus!r}")
    remote = ray.remote(num_cpus=cpus)(_call)  # ray.remote takes only functions and classes, not a partial
    refs = [remote.remote(fn, item) for item in items]
    order = {ref: i for i, ref in enumerate(refs)}
    results: list[R] = [None] * len(refs)  # type: ignore[list-item]
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit="task", disable=desc is None) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results[order[done[0]]] = ray.get(done[0])
            bar.update(1)
    return results


def _call(fn: Callable[[T], R], item: T) -> R:
    return fn(item)
