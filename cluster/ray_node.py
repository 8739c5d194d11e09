"""The `ray` command for `cluster/local.sh`, with every node address kept on loopback.

Ray replaces 127.0.0.1 (as a node address, and in the head's address) by the host's outward
network address, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ("single machine"), which
local.sh sets for every node and every process the nodes start. That setting also makes
`ray start --address` refuse to add a node, so this wrapper lifts the refusal in its own
process, pins the address lookup to 127.0.0.1, then runs the `ray` CLI:

    python cluster/ray_node.py start --head ...      # any `ray` command
    python cluster/ray_node.py wait-nodes HOST:PORT N  # until N nodes are alive (90 s at most)
"""

import sys
import time

import ray
import ray._private.ray_constants as ray_constants
import ray._private.services as services
from ray.scripts.scripts import main

ray_constants.ENABLE_RAY_CLUSTER = True
services.get_node_ip_address = lambda address=None: "127.0.0.1"


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
    if sys.argv[1:2] == ["wait-nodes"]:
        sys.exit(wait_nodes(sys.argv[2], int(sys.argv[3])))
    sys.argv[0] = "ray"
    sys.exit(main())
