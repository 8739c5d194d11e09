"""The `ray` command for `cluster/local.sh`, with every node address kept on loopback.

local.sh sets Ray's single-machine switch for every node and every process the nodes start;
this wrapper lifts that switch's refusal to add nodes in its own process (see
`distmem.distributed.ray_compat.loopback_node_cli`), then runs the `ray` CLI:

    python cluster/ray_node.py start --head ...      # any `ray` command
    python cluster/ray_node.py wait-nodes HOST:PORT N  # until N nodes are alive (90 s at most)
"""

import sys
import time

import ray
from ray.scripts.scripts import main

from distmem.distributed.ray_compat import loopback_node_cli


def wait_nodes(address: str, count: int, timeout_s: float = 90.0) -> int:
    ray.init(address=address, configure_logging=False, log_to_driver=False)
    deadline = time.time() + timeout_s
    while sum(node["Alive"] for node in ray.nodes()) < count:
        if time.time() > deadline:
            print(f"ray_node.py: fewer than {count} nodes alive after {timeout_s:.0f} s", file=sys.stderr)
            return 1
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    loopback_node_cli()
    if sys.argv[1:2] == ["wait-nodes"]:
        sys.exit(wait_nodes(sys.argv[2], int(sys.argv[3])))
    sys.argv[0] = "ray"
    sys.exit(main())
