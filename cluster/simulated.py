"""Several Ray nodes on one machine (`ray.cluster_utils.Cluster`), for the multi-node tests and for trying
node loss without a cloud: each node has its own raylet and its own object store, so objects travel between
nodes (over loopback) as they do between machines, and `kill` takes a node down with every process on it, as a
preempted machine goes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

log = logging.getLogger(__name__)

# The head's GCS declares a node dead after this many missed health checks of this period: about 3 s here,
# against Ray's default of 15 s, so that a test sees a lost node quickly.
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                   "health_check_failure_threshold": 3}


class SimulatedCluster:
    """A head node (where the driver runs) and named worker nodes, each offering CPUs and custom resources
    (`train.role_resources` places each role on the nodes that offer its resource)."""

    def __init__(self, head_cpus: float = 2, object_store_mib: int = 128, system_config: dict | None = None):
        """`system_config`: Ray system settings on top of the fast node-death detection (e.g. how often the
        nodes report metrics)."""
        from ray.cluster_utils import Cluster

        self.object_store_bytes = object_store_mib * 1024**2
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": head_cpus, "include_dashboard": False, "object_store_memory": self.object_store_bytes,
            "_system_config": {**FAST_NODE_DEATH, **(system_config or {})}})
        self.nodes = {"head": self.cluster.head_node}
        # Nodes added from other threads (a fault schedule beside a job) start from this one thread, which
        # lives as long as the cluster: Ray ties a node's processes to the life of the thread that started
        # them (PR_SET_PDEATHSIG), so a node started from a short-lived thread would die with it.
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="simulated-node-starter")

    def _start_node(self, num_cpus: float, resources: dict):
        with _without_sigterm_hook_off_the_main_thread():
            return self.cluster.add_node(num_cpus=num_cpus, resources=resources,
                                         object_store_memory=self.object_store_bytes)

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, name: str, num_cpus: float, **resources: float) -> str:
        """Start node `name` offering `num_cpus` CPUs and `resources` (e.g. generation=2); returns its node id."""
        if name in self.nodes:
            raise ValueError(f"a node named {name!r} is already up")
        if threading.current_thread() is threading.main_thread():
            node = self._start_node(num_cpus, resources)
        else:
            node = self._starter.submit(self._start_node, num_cpus, resources).result()
        self.cluster.wait_for_nodes()
        self.nodes[name] = node
        log.info("node %s (%s) up: %s CPUs, %s", name, node.node_id[:8], num_cpus, resources)
        return node.node_id

    def node_id(self, name: str) -> str:
        return self.nodes[name].node_id

    def name_of(self, node_id: str) -> str:
        return next((name for name, node in self.nodes.items() if node.node_id == node_id), node_id[:8])

    def kill(self, name: str) -> None:
        """Kill node `name` with every process on it, at once (no graceful shutdown)."""
        if name == "head":
            raise ValueError("the head node holds the driver; kill a worker node")
        node = self.nodes.pop(name)
        self.cluster.remove_node(node, allow_graceful=False)
        log.warning("node %s (%s) killed", name, node.node_id[:8])

    def shutdown(self) -> None:
        self.cluster.shutdown()
        self._starter.shutdown()


def _without_sigterm_hook_off_the_main_thread():
    """Ray's node object installs a SIGTERM handler when it starts, which Python allows on the main thread
    only; a node added from another thread (a fault schedule running beside a job) goes without it: the
    process's own handler (the job's graceful stop) stays, and the node is killed by `kill` or at exit."""
    if threading.current_thread() is threading.main_thread():
        return contextlib.nullcontext()
    return mock.patch("ray._private.utils.set_sigterm_handler", lambda handler: None)
