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


def room_for(demand: dict[str, float]) -> tuple[bool, str]:
    """Whether the cluster could place an actor that asks for `demand` now (some alive node offers it and
    as much is free across the cluster), and a line saying what it offers."""
    alive = [node for node in ray.nodes() if node["Alive"]]
    offering = sum(all(node["Resources"].get(k, 0) >= v for k, v in demand.items()) for node in alive)
    free = ray.available_resources()
    fits = offering > 0 and all(free.get(k, 0) >= v for k, v in demand.items())
    wants = ", ".join(f"{k}: {v:g}" for k, v in demand.items())
    has = ", ".join(f"{k}: {free.get(k, 0):g}" for k in demand)
    return fits, f"it needs {{{wants}}}; {offering} of the {len(alive)} live nodes offer that, and free now is {{{has}}}"


def lost(node_ids) -> list[str]:
    """Those of `node_ids` that Ray no longer counts alive."""
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    return [node for node in node_ids if node not in alive]
