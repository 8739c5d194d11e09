"""Joining a Ray cluster (or starting an embedded one on 127.0.0.1) and placing memory shards."""

from __future__ import annotations

import math
import os
import socket
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from distmem.config import MemoryConfig
from distmem.distributed.ray_compat import single_machine
from distmem.keycodes import DTYPES

NAMESPACE = "distmem"


def connect(address: str | None = None) -> None:
    """Join `address` (default: $RAY_ADDRESS), or start an embedded local Ray on 127.0.0.1.

    Call it from the main thread of a program that uses Ray from other threads too: Ray's local
    processes die with the thread that started them (the kernel's parent-death signal follows
    the creating thread), so an embedded Ray started inside a worker thread ends with it."""
    if ray.is_initialized():
        return
    source = "address"
    if address is None:
        address, source = os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"
    if address in (None, "local"):
        init_on_loopback(include_dashboard=False)
        return
    if address.startswith(("http://", "https://")):  # what `ray job submit` wants, not a driver
        raise ConnectionError(
            f"{source}: {address!r} is a Ray dashboard URL, the address `ray job submit` uses; a program that "
            "joins the cluster itself needs the head's GCS address 'host:port' (`ray start --head` prints it; "
            "cluster/local.sh up prints it as 'GCS address'). Pass --address HOST:PORT, or run the job with "
            "`ray job submit` (which sets RAY_ADDRESS for it), or unset RAY_ADDRESS for an embedded local Ray")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except (OSError, ValueError) as err:
        raise ConnectionError(f"address: no Ray cluster reachable at {address!r} ({err}); expected "
                              "'host:port' of a running head node (ray start --head), or None for an "
                              "embedded local Ray") from None
    if host not in ("127.0.0.1", "localhost"):
        ray.init(address=address, namespace=NAMESPACE, configure_logging=False, log_to_driver=False)
        return
    init_on_loopback(address=address)  # a cluster on this machine (cluster/local.sh): its nodes live on loopback


def init_on_loopback(**init_kwargs: Any) -> None:
    """ray.init with every address of this machine's Ray on 127.0.0.1 (an embedded Ray's processes
    also listen on loopback only). Ray replaces 127.0.0.1 by the host's outward address unless its
    single-machine switch (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) is set, and it reads that switch
    once, at import: so it is set for the processes Ray starts (which inherit it) and, for this
    call, in this already-imported one."""
    with single_machine():
        ray.init(_node_ip_address="127.0.0.1", namespace=NAMESPACE, configure_logging=False, log_to_driver=False,
                 **init_kwargs)


def gpu_share(gpus: float, num_shards: int) -> float:
    """The GPUs each of `num_shards` shards takes on a cluster of `gpus` GPUs: one each when there
    are enough, else an equal share (1/2, 1/3, ...) so that the shards fill whole GPUs (a
    fractional request must fit on one GPU); 0 without a GPU."""
    whole = int(gpus)
    if whole < 1:
        return 0.0
    return 1.0 if whole >= num_shards else 1.0 / math.ceil(num_shards / whole)


def spread_shards(config: MemoryConfig, ranges: list[tuple[int, int]], gpu: float, detached: bool,
                  timeout_s: float = 60.0) -> PlacementGroup:
    """A SPREAD placement group with one bundle per shard: its slots' bytes of the `memory`
    resource, plus `gpu` GPUs (see `gpu_share`). Fails with a clear error when the cluster cannot hold it."""
    per_slot = config.key_dim * DTYPES[config.key_dtype].itemsize + 3 * 8
    bundles = [{"memory": max(1, (hi - lo) * per_slot), **({"GPU": gpu} if gpu else {})}
               for lo, hi in ranges]
    group = placement_group(bundles, strategy="SPREAD", **({"lifetime": "detached"} if detached else {}))
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(f"num_shards: the cluster could not place {len(ranges)} shards of "
                           f"{bundles[0]['memory'] / 2**30:.2f} GiB{f' and {gpu:g} GPU' if gpu else ''} each within "
                           f"{timeout_s:.0f} s (cluster resources: {ray.cluster_resources()})") from None
    return group
