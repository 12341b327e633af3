"""The job across Ray nodes, on a simulated cluster of one machine (cluster/simulated.py: every node its own
raylet and object store): roles placed by `train.role_resources` on the nodes meant for them, the learner
group's ranks on two nodes, and whole nodes killed mid-run as a preempted machine dies.

These tests run last (tests/conftest.py): they stop the session's one-node Ray and start their own."""

import json
import os
import signal
import threading
import time

import pytest
import ray

from cluster.commands import DEFAULT_CONFIG
from cluster.control import CONTROL_NAME
from cluster.job import request_stop, train
from cluster.launch import ACTOR_ENV
from cluster.simulated import SimulatedCluster
from core.config import load_config
from learner.distributed import free_port
from tests.helpers import assert_every_prompt_once, s3_server, steps_done, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.multinode]

TINY = DEFAULT_CONFIG.parent / "tiny.yaml"


@pytest.fixture(scope="module")
def nodes():
    """A head (the driver and the job's helpers), two learner nodes, a generation node that also holds the
    reference, and a reward node."""
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    with s3_server() as env:  # checkpoints on a storage URI, which every node reaches
        cluster = SimulatedCluster(head_cpus=2)
        cluster.add("learner-a", 2, learner=1)
        cluster.add("learner-b", 2, learner=1)
        cluster.add("generation-a", 3, generation=2, reference=1)
        cluster.add("reward-a", 1, reward=1)
        ray.init(address=cluster.address, logging_level="warning", runtime_env={"env_vars": {**ACTOR_ENV, **env}})
        yield cluster
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def config(out, *overrides):
    return load_config(TINY, [f"train.output_dir={out}", f"reward.port={free_port()}", "train.eval_every=100",
                              "train.role_resources=true", "generation.num_cpus=1", *overrides])


def on_nodes(cluster, summary) -> dict[str, list[str]]:
    """The summary's roles by node, with the simulated nodes' names."""
    return {cluster.name_of(node): sorted(roles) for node, roles in summary["roles_by_node"].items()}


def after_step(out, step, action):
    """Run `action` in a thread once the job has finished `step`; returns a check that re-raises its error
    (an error also stops the job, as `ray job stop` does)."""
    return once(lambda: steps_done(out) >= step, action)


def once(condition, action):
    """Run `action` in a thread once `condition()` holds; returns a check that re-raises its error."""
    errors = []

    def run():
        try:
            wait_for(condition)
            action()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the check
            errors.append(exc)
            request_stop()  # stop the job, which would otherwise run its 500 steps

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def check():
        thread.join(timeout=60)
        if errors:
            raise errors[0]
    return check


def test_roles_are_placed_on_their_nodes_and_the_learner_group_spans_two(nodes, tmp_path):
    summary = train(config(tmp_path, "train.steps=2", "ppo.num_learners=2", "ppo.num_cpus=1",
                           "ppo.placement=spread"))
    assert summary["steps"] == summary["policy_version"] == 2
    assert on_nodes(nodes, summary) == {
        "learner-a": ["learner"], "learner-b": ["learner-1"],
        "generation-a": ["generation-worker-0", "generation-worker-1", "reference"], "reward-a": ["reward"],
    } or on_nodes(nodes, summary) == {
        "learner-a": ["learner-1"], "learner-b": ["learner"],
        "generation-a": ["generation-worker-0", "generation-worker-1", "reference"], "reward-a": ["reward"],
    }
    assert_every_prompt_once(summary)


def workers_on(placed: dict[str, list[str]]) -> dict[str, int]:
    return {node: sum(role.startswith("generation-worker") for role in roles) for node, roles in placed.items()
            if any(role.startswith("generation-worker") for role in roles)}


def job_status() -> dict:
    return ray.get(ray.get_actor(CONTROL_NAME).get_status.remote())


def run_until_back(tmp_path, lose, back, steps_after=2):
    """A chaos script for a long job: after step 2, `lose()` a node; once `back()`, let the job train
    `steps_after` more steps, then stop it (SIGTERM, as `ray job stop` sends)."""
    def script():
        lose()
        wait_for(back)
        at = steps_done(tmp_path)
        wait_for(lambda: steps_done(tmp_path) >= at + steps_after)
        os.kill(os.getpid(), signal.SIGTERM)
    return after_step(tmp_path, 2, script)


def test_a_lost_generation_node_costs_its_workers_until_they_are_back_on_another(nodes, tmp_path):
    nodes.add("generation-b", 2, generation=2)
    killed = []

    def kill_the_node_of_worker_0():
        killed.append(nodes.name_of(ray.get(ray.get_actor("generation-worker-0").stats.remote())["node_id"]))
        nodes.kill(killed[0])

    check = run_until_back(tmp_path, kill_the_node_of_worker_0, lambda: job_status()["recoveries_s"] and "syncing"
                           not in job_status()["workers"].values())
    summary = train(config(tmp_path, "train.steps=500", "train.max_staleness=1", "reference.placement=learner"))
    check()
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == summary["policy_version"] > 4
    assert summary["stream/worker_failures"] >= 1 and len(summary["worker_recovery_s"]) >= 1
    placed = on_nodes(nodes, summary)
    assert killed[0] not in placed and sum(workers_on(placed).values()) == 2
    assert_every_prompt_once(summary)


def generation_nodes(nodes, **cpus_and_units):
    """Replace every generation node with the ones named: name=(CPUs, generation units)."""
    for name in [n for n in nodes.nodes if n.startswith("generation-")]:
        nodes.kill(name)
    for name, (cpus, units) in cpus_and_units.items():
        nodes.add(name, cpus, generation=units)


def reported(caplog, text) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


def test_workers_with_no_room_are_reported_the_job_trains_on_and_waits_for_a_node(nodes, tmp_path, caplog):
    """Two one-worker nodes: one lost (training goes on with the other), then the other (the job waits,
    saying so), then a node with room for both joins (both come back)."""
    generation_nodes(nodes, **{"generation-c": (1, 1), "generation-d": (1, 1)})
    caplog.set_level("WARNING", logger="actors.worker_pool")

    def lose_both_nodes_then_add_one():
        nodes.kill(nodes.name_of(ray.get(ray.get_actor("generation-worker-0").stats.remote())["node_id"]))
        wait_for(lambda: reported(caplog, "training goes on with 1 of 2 workers"), timeout=60)
        assert "no node has room for them" in caplog.text
        at = steps_done(tmp_path)
        wait_for(lambda: steps_done(tmp_path) >= at + 2)  # on one worker
        nodes.kill(next(n for n in nodes.nodes if n.startswith("generation-")))
        wait_for(lambda: reported(caplog, "no worker is up: the job waits"), timeout=60)
        nodes.add("generation-e", 2, generation=2)
        wait_for(lambda: len(job_status()["recoveries_s"]) == 2 and "syncing" not in job_status()["workers"].values())
        at = steps_done(tmp_path)
        wait_for(lambda: steps_done(tmp_path) >= at + 2)
        os.kill(os.getpid(), signal.SIGTERM)

    check = after_step(tmp_path, 2, lose_both_nodes_then_add_one)
    summary = train(config(tmp_path, "train.steps=500", "train.max_staleness=1", "reference.placement=learner"))
    check()
    assert summary["stopped_by"] == "SIGTERM" and summary["stream/workers"] == 2
    assert workers_on(on_nodes(nodes, summary)) == {"generation-e": 2}
    assert_every_prompt_once(summary)


def test_a_job_whose_workers_find_no_room_before_the_deadline_stops_with_a_checkpoint(nodes, tmp_path):
    from cluster.checkpoint import complete_checkpoints
    from core.errors import JobHung

    generation_nodes(nodes, **{"generation-f": (2, 2)})
    check = after_step(tmp_path, 2, lambda: nodes.kill("generation-f"))
    with pytest.raises(JobHung, match=r"cannot go on: no generation worker has been up for \d+ s \(train.hang_timeout_s"
                                      r" = 20 s\): no node has room .*checkpoint of policy version \d+ in "):
        train(config(tmp_path, "train.steps=500", "train.max_staleness=1", "reference.placement=learner",
                     "train.hang_timeout_s=20", "train.checkpoint_every=1000"))
    check()
    assert complete_checkpoints(str(tmp_path))


def test_a_lost_reward_node_brings_the_reward_replica_back_on_another(nodes, tmp_path):
    from ray import serve

    from reward_server.server import APP_NAME

    generation_nodes(nodes, **{"generation-g": (2, 2)})
    nodes.add("reward-b", 1, reward=1)
    reward_node = lambda: serve.get_app_handle(APP_NAME).node_id.remote().result(timeout_s=5)  # noqa: E731
    killed = []

    def lose():
        killed.append(nodes.name_of(reward_node()))
        nodes.kill(killed[0])

    def back():
        try:
            return nodes.name_of(reward_node()) != killed[0]
        except Exception:  # noqa: BLE001 - Serve's errors while the replica is replaced
            return False

    check = run_until_back(tmp_path, lose, back)
    summary = train(config(tmp_path, "train.steps=500", "reference.placement=learner", "reward.timeout_s=5",
                           "reward.retry_interval_s=0.5"))
    check()
    assert summary["stopped_by"] == "SIGTERM"
    placed = on_nodes(nodes, summary)
    assert killed[0] not in placed and [n for n, roles in placed.items() if "reward" in roles] == [
        {"reward-a": "reward-b", "reward-b": "reward-a"}[killed[0]]]
    assert_every_prompt_once(summary)


def test_a_lost_learner_node_rebuilds_the_group_from_the_last_checkpoint_on_object_storage(nodes):
    """The checkpoints on S3: the rebuilt group, on another node, resumes from there."""
    from cluster.checkpoint import complete_checkpoints
    from core import storage

    generation_nodes(nodes, **{"generation-h": (2, 2)})
    nodes.add("learner-c", 2, learner=1)
    run, killed = f"s3://runs/learner-lost-{time.time_ns()}", []

    def lose():
        killed.append(nodes.name_of(ray.get(ray.get_actor("learner-1").node_id.remote())))
        nodes.kill(killed[0])

    check = once(lambda: len(complete_checkpoints(run)) >= 2, lose)
    summary = train(config(run, "train.steps=5", "train.checkpoint_every=1", "ppo.num_learners=2",
                           "ppo.num_cpus=1", "ppo.placement=spread", "reference.placement=learner"))
    check()
    place = storage.Location(run)
    assert place.is_file("checkpoint/config.json") and place.is_file("summary.json")
    assert [json.loads(line)["step"] for line in place.read_text("metrics.jsonl").splitlines()][-1] == 5
    assert [c.rsplit("-", 1)[-1] for c in complete_checkpoints(run)] == ["000004", "000005"]  # keep_checkpoints
    assert summary["steps"] == summary["policy_version"] == 5 and summary["learner_restarts"] == 1
    placed = on_nodes(nodes, summary)
    assert killed[0] not in placed
    assert sorted(r for roles in placed.values() for r in roles if r.startswith("learner")) == ["learner", "learner-1"]
    assert_every_prompt_once(summary)
