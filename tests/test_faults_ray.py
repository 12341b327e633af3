"""Fault injection on the whole job (tiny model, real vLLM workers, the reward server on Serve): a killed
generation worker, workers added and removed while the job runs, a reward server that goes away and
comes back (or does not), a stop with `SIGTERM` (what `ray job stop` sends) and a resume, a killed learner,
a killed reference model, a worker that hangs.
Each run that is not stuck must finish its steps with every prompt trained on exactly once."""

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from ray import serve

from cluster.checkpoint import complete_checkpoints
from cluster.cli import EXIT_HUNG, main
from cluster.commands import DEFAULT_CONFIG
from cluster.control import CONTROL_NAME
from cluster.job import train
from core.config import load_config
from learner.distributed import free_port
from reward_server.client import RewardClient, RewardServerUnavailable
from reward_server.scorers import VaderScorer
from reward_server.server import APP_NAME, start_reward_server
from tests.helpers import assert_every_prompt_once, records, steps_done, wait_for

pytestmark = pytest.mark.ray

TINY = DEFAULT_CONFIG.parent / "tiny.yaml"


def config(out, *overrides):
    return load_config(TINY, [f"train.output_dir={out}", f"reward.port={free_port()}", "train.eval_every=100",
                              *overrides])


class Chaos(threading.Thread):
    """Runs `script` beside the job; re-raises its error in the test."""

    def __init__(self, script):
        super().__init__(daemon=True)
        self.script, self.error = script, None

    def run(self):
        try:
            self.script()
        except BaseException as exc:  # noqa: BLE001 - reported by check()
            self.error = exc

    def check(self):
        self.join(timeout=60)
        if self.error:
            raise self.error


def test_killed_added_and_removed_workers_lose_no_prompt(ray_session, tmp_path):
    """Workers run ahead of the learner (staleness 1), so the kill lands mid-generation. The job is long;
    the script stops it (SIGTERM, as `ray job stop` does) once everything has happened."""
    def status():
        return ray.get(ray.get_actor(CONTROL_NAME).get_status.remote())

    def script():
        wait_for(lambda: steps_done(tmp_path) >= 1)
        pid = ray.get(ray.get_actor("generation-worker-0").stats.remote())["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: status()["recoveries_s"])  # Ray restarted it and it loaded the current weights
        ray.get(ray.get_actor(CONTROL_NAME).scale.remote(3))  # what `rlhf scale --workers 3` sends
        wait_for(lambda: any("first_version" in j for j in status()["joined"].values()))  # it has generated
        ray.get(ray.get_actor(CONTROL_NAME).scale.remote(1))
        wait_for(lambda: len(status()["workers"]) == 1)
        at = steps_done(tmp_path)
        wait_for(lambda: steps_done(tmp_path) >= at + 2)
        os.kill(os.getpid(), signal.SIGTERM)

    chaos = Chaos(script)
    chaos.start()
    summary = train(config(tmp_path, "train.steps=500", "train.max_staleness=1", "train.checkpoint_every=1000"))
    chaos.check()
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == summary["policy_version"] > 5
    assert_every_prompt_once(summary)
    assert summary["stream/worker_failures"] == 1 and len(summary["worker_recovery_s"]) == 1
    assert summary["stream/workers_added"] == 1 and summary["stream/workers_removed"] == 2
    assert summary["stream/workers"] == 1
    (joined,) = summary["workers_joined"].values()  # the added worker's first rollouts: the current policy
    assert joined["first_version"] == joined["current_version"] >= 2
    assert all(r["version/lag_max"] <= 1 for r in records(tmp_path) if r["step"] > 0)


def test_the_job_waits_for_the_reward_server_and_goes_on(ray_session, tmp_path):
    cfg = config(tmp_path, "train.steps=6", "reward.timeout_s=5", "reward.retry_interval_s=1")

    def script():
        wait_for(lambda: steps_done(tmp_path) >= 1)
        serve.delete(APP_NAME)
        time.sleep(8)
        start_reward_server(cfg.reward)

    chaos = Chaos(script)
    chaos.start()
    summary = train(cfg)
    chaos.check()
    assert summary["steps"] == 6
    assert summary["reward/retries"] >= 1 and summary["reward/seconds_unavailable"] > 3
    assert_every_prompt_once(summary)


def test_a_reward_server_gone_past_the_deadline_stops_with_a_clear_error(ray_session):
    cfg = load_config(TINY, [f"reward.port={free_port()}", "reward.timeout_s=2", "reward.retry_interval_s=0.5",
                             "reward.unavailable_deadline_s=3"]).reward
    client = RewardClient(cfg, APP_NAME, start_reward_server(cfg))
    assert client.score(["p"], ["a lovely day"]) == pytest.approx(VaderScorer().score(["p"], ["a lovely day"]))
    serve.delete(APP_NAME)
    started = time.time()
    expected = r"has not answered for \d+ s \(reward.unavailable_deadline_s = 3\); last error: RayServeException"
    with pytest.raises(RewardServerUnavailable, match=expected):
        client.score(["p"], ["a lovely day"])
    assert 3 <= time.time() - started < 30
    assert client.counters["reward/retries"] >= 2


def test_a_stopped_job_resumes_with_the_batch_an_uninterrupted_run_takes(ray_session, tmp_path):
    steps = ["train.steps=3", "train.checkpoint_every=1"]
    straight = train(config(tmp_path / "straight", *steps))
    assert straight["steps"] == 3

    stopped_dir = tmp_path / "stopped"

    def script():
        wait_for(lambda: steps_done(stopped_dir) >= 1)
        os.kill(os.getpid(), signal.SIGTERM)  # what `ray job stop` sends the entrypoint

    chaos = Chaos(script)
    chaos.start()
    stopped = train(config(stopped_dir, *steps))
    chaos.check()
    assert stopped["stopped_by"] == "SIGTERM" and stopped["steps"] < 3
    assert stopped["eval/after"].startswith("not measured")  # not the figures from before training
    k = stopped["steps"]
    assert [int(p.rsplit("-", 1)[1]) for p in complete_checkpoints(str(stopped_dir))][-1] == k

    resumed = train(config(stopped_dir, *steps, "train.resume=auto"))
    assert resumed["steps"] == 3 and resumed["policy_version"] == 3 and resumed["eval/after_policy_version"] == 3
    batch = {r["step"]: sorted(r["batch/prompt_indices"]) for r in records(tmp_path / "straight") if r["step"]}
    after = [r for r in records(stopped_dir) if r["step"] == k + 1]
    assert len(after) == 1 and sorted(after[0]["batch/prompt_indices"]) == batch[k + 1]
    assert resumed["stream/prompts_trained"] == straight["stream/prompts_trained"]
    assert_every_prompt_once(resumed)


def test_a_killed_learner_is_recovered_from_the_last_checkpoint(ray_session, tmp_path):
    def script():
        wait_for(lambda: steps_done(tmp_path) >= 2)
        os.kill(ray.get(ray.get_actor("learner").pid.remote()), signal.SIGKILL)

    chaos = Chaos(script)
    chaos.start()
    summary = train(config(tmp_path, "train.steps=5", "train.checkpoint_every=1", "train.keep_rollouts=true"))
    chaos.check()
    assert summary["steps"] == 5 and summary["policy_version"] == 5 and summary["learner_restarts"] == 1
    assert_every_prompt_once(summary)
    # the kept rollouts are exactly those trained on: the steps trained again after the restart replaced theirs
    import datasets

    kept = datasets.load_dataset("json", data_dir=str(tmp_path / "rollouts"), split="train").to_list()
    trained = {r["step"]: sorted(r["batch/prompt_indices"]) for r in records(tmp_path) if r["step"]}  # the last
    assert {r["step"] for r in kept} == set(range(1, 6))
    assert {s: sorted(r["prompt_index"] for r in kept if r["step"] == s) for s in trained} == trained
    assert all(r["response"] and r["reward"] == r["reward"] and len(r["response_ids"]) > 0 for r in kept)
    assert all(r["version"] <= r["step"] - 1 for r in kept)


def test_a_killed_reference_model_is_restarted_and_its_calls_run_again(ray_session, tmp_path):
    pids = []

    def script():
        wait_for(lambda: steps_done(tmp_path) >= 1)
        pids.append(ray.get(ray.get_actor("reference").pid.remote()))
        os.kill(pids[0], signal.SIGKILL)
        pids.append(ray.get(ray.get_actor("reference").pid.remote()))  # answered by the restarted process

    chaos = Chaos(script)
    chaos.start()
    summary = train(config(tmp_path, "train.steps=4", "train.max_staleness=1"))
    chaos.check()
    assert summary["steps"] == 4 and summary["learner_restarts"] == 0 and pids[1] != pids[0]
    assert_every_prompt_once(summary)
    assert all(r["kl/mean"] == r["kl/mean"] for r in records(tmp_path) if r["step"])  # every rollout got its log-probs


def test_a_hung_worker_is_named_with_its_stack_and_the_job_exits_after_a_checkpoint(ray_session, tmp_path, capsys):
    """A generation worker stops answering without dying (SIGSTOP: the process is there, its calls never
    return). After train.hang_timeout_s the job names it, writes its Python stack to the run directory,
    checkpoints (the learner still answers) and `rlhf train` exits with status 3."""
    stopped = []

    def script():
        wait_for(lambda: steps_done(tmp_path) >= 1)
        pid = ray.get(ray.get_actor("generation-worker-0").stats.remote())["pid"]
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)

    chaos = Chaos(script)
    chaos.start()
    try:
        status = main(["train", "--config", str(TINY), f"train.output_dir={tmp_path}", f"reward.port={free_port()}",
                       "train.eval_every=100", "generation.num_workers=1", "train.steps=100",
                       "train.checkpoint_every=1000", "train.hang_timeout_s=15"])
    finally:
        chaos.check()
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert status == EXIT_HUNG
    err = capsys.readouterr().err
    assert "the job is stuck" in err and "generation-worker-0" in err
    (report,) = tmp_path.glob("hang-*.txt")
    text = report.read_text()
    # the stuck call (the worker was stopped while generating or loading weights) and py-spy's dump of its stack
    assert re.search(r"train.hang_timeout_s = 15 s from: generation-worker-0 \((generate|load_weights), \d+ s\)", text)
    assert "=== generation-worker-0 ===\nprocess " in text and "Thread" in text
    assert str(report) in err
    (saved,) = complete_checkpoints(str(tmp_path))  # written after the hang, not by checkpoint_every
    meta = json.loads((Path(saved) / "meta.json").read_text())
    assert meta["step"] == meta["policy_version"] >= 1


def test_a_lost_control_actor_is_replaced_and_scaling_requests_reach_the_job_again(ray_session):
    from cluster.control import ControlLink, start_control

    scaled = []
    link = ControlLink(start_control(), status=lambda: {"step": 1}, workers=lambda: 2, scale_to=scaled.append,
                       interval_s=0)
    lost = link.actor
    ray.kill(lost)
    wait_for(lambda: link.poll() or link.actor != lost, timeout=30)  # the poll in flight fails: a new actor
    ray.get(ray.get_actor(CONTROL_NAME).scale.remote(3))  # what `rlhf scale --workers 3` sends
    wait_for(lambda: link.poll() or scaled == [3], timeout=30)
    assert ray.get(ray.get_actor(CONTROL_NAME).get_status.remote()) == {"step": 1}
    ray.kill(link.actor)


def test_a_role_whose_resource_no_node_offers_fails_at_start_naming_it(ray_session, tmp_path, capsys):
    status = main(["train", "--config", str(TINY), f"train.output_dir={tmp_path}", f"reward.port={free_port()}",
                   "train.role_resources=true", "reference.placement=learner"])
    assert status == 1
    assert re.search(r"^rlhf: train.role_resources = true, but no node offers the resources generation, learner, "
                     r"reward: declare them", capsys.readouterr().err, re.M)
