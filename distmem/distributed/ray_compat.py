"""The Ray internals distmem relies on, in one place (tested with Ray 2.60, pinned in pyproject.toml).

Ray replaces 127.0.0.1 as a node address by the host's outward address unless its single-machine
switch is on, and it reads that switch (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`, as the constant
`ray_constants.ENABLE_RAY_CLUSTER`) once, at import. distmem keeps every local Ray on loopback,
so it has to set the constant after import; if a Ray upgrade removes it, these functions fail with
a message saying so instead of silently listening on every interface. For the same reason the
trainers' rendezvous subclasses Ray Train's torch backend (`rendezvous.py`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from types import ModuleType

import ray

TESTED_RAY = "2.60"


def _require(module: ModuleType, attribute: str) -> None:
    if not hasattr(module, attribute):
        raise RuntimeError(f"Ray {ray.__version__} has no {module.__name__}.{attribute}, which distmem needs to keep "
                           f"a local Ray on 127.0.0.1 (distmem was tested with Ray {TESTED_RAY}.x): install "
                           f"ray=={TESTED_RAY}.* or update distmem/distributed/ray_compat.py")


def _constants() -> ModuleType:
    from ray._private import ray_constants  # noqa: PLC0415

    _require(ray_constants, "ENABLE_RAY_CLUSTER")
    return ray_constants


@contextlib.contextmanager
def single_machine() -> Iterator[None]:
    """Ray's single-machine switch on, for a `ray.init` in this process (already imported) and
    for the processes it starts (through the environment they inherit)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    constants = _constants()
    saved = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved


def loopback_node_cli() -> None:
    """For the `ray` CLI process that starts a node of a cluster on this machine (cluster/local.sh):
    the nodes run with the single-machine switch (so they stay on 127.0.0.1), which also makes
    `ray start --address` refuse to add a node; lift that refusal here and pin this process's
    address lookup to 127.0.0.1."""
    from ray._private import services  # noqa: PLC0415

    constants = _constants()
    _require(services, "get_node_ip_address")
    constants.ENABLE_RAY_CLUSTER = True
    services.get_node_ip_address = lambda address=None: "127.0.0.1"


def torch_backend() -> tuple[type, Callable[[], None], type]:
    """Ray Train's torch backend class (to subclass), its function that sets a worker's torch
    variables (LOCAL_RANK, ...), and Ray Train v1's worker group class (whose groups set them later)."""
    from ray.train._internal import worker_group  # noqa: PLC0415
    from ray.train.torch import config  # noqa: PLC0415

    for module, attribute in ((config, "_TorchBackend"), (config, "_set_torch_distributed_env_vars"),
                              (worker_group, "WorkerGroup")):
        _require(module, attribute)
    return config._TorchBackend, config._set_torch_distributed_env_vars, worker_group.WorkerGroup
