"""The Ray nodes under a job: keeping small helpers beside the driver, and whether the cluster has room for
an actor that waits to be placed."""

from __future__ import annotations

import ray


def on_this_node():
    """The scheduling strategy that keeps a small helper (the job's control actor, the learner group's
    gatherer) on the driver's node: a lost node then takes none of them, as it cannot take the driver without
    ending the job."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
