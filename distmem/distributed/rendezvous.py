"""The trainers' torch process group, its rendezvous store listening on one address only.

Ray Train's `TorchConfig` has rank 0 start torch's `TCPStore` at the node's address, but the store
listens on every interface whatever address it is given. distmem keeps a local Ray on 127.0.0.1,
so here rank 0 binds the store's socket to its node's Ray address itself and hands it to the
store (`master_listen_fd`). The rest (the backend, the workers' torch variables, shutdown) is
Ray's `TorchConfig`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
import ray.train.torch
import torch.distributed as dist

from distmem.distributed.ray_compat import torch_backend

_listener: socket.socket | None = None  # rank 0's, from _listen() until _join() hands it to the store


def _listen() -> tuple[str, int]:
    """On rank 0: a socket listening on this node's Ray address, kept for the store; (address, port)."""
    global _listener
    address = ray.util.get_node_ip_address()
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((address, 0))
    listener.listen(socket.SOMAXCONN)
    _listener = listener
    return address, listener.getsockname()[1]


def _join(backend: str, world_rank: int, world: int, address: str, port: int, timeout_s: int) -> None:
    """Every worker: the store (rank 0 serves it on `_listen`'s socket), then the process group."""
    global _listener
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        fd, _listener = _listener.detach(), None  # the store owns the socket from here on
        store = dist.TCPStore(address, port, world, is_master=True, timeout=timeout, master_listen_fd=fd)
    else:
        store = dist.TCPStore(address, port, world, is_master=False, timeout=timeout)
    if backend == "nccl" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:  # as Ray does: fail on a hung collective
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world, timeout=timeout)


_TorchBackend, _set_torch_env, _V1WorkerGroup = torch_backend()


class _BoundBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: BoundTorchConfig) -> None:
        address, port = worker_group.execute_single(0, _listen)
        if not isinstance(worker_group, _V1WorkerGroup):  # v2 sets LOCAL_RANK etc. here (v1: at training start)
            worker_group.execute(_set_torch_env)
        ray.get([worker_group.execute_single_async(rank, _join, backend=backend_config.backend, world_rank=rank,
                                                   world=len(worker_group), address=address, port=port,
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])


@dataclass
class BoundTorchConfig(ray.train.torch.TorchConfig):
    """`TorchConfig` (backend "gloo" or "nccl", given) whose rendezvous store listens on rank 0's
    node address only, not on every interface."""

    backend: str = "gloo"

    @property
    def backend_cls(self):
        return _BoundBackend
