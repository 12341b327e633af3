"""The rollout stream and the worker pool on Ray, with stand-in workers (plain actors that answer at once or
die on demand) so that membership changes and failures can be staged exactly: every prompt drawn is trained
on exactly once through worker deaths, additions and removals; new and restarted workers load the current
weights before they generate (also one that Ray restarted while it was idle); the data position survives
a checkpoint."""

import os
import time

import pytest
import ray
import torch

from actors.generation import WeightsBehind
from actors.prompt_ledger import PromptLedger
from actors.rollout_stream import RolloutStream
from actors.worker_pool import WorkerPool
from core.prompts import Prompt
from core.rollout import Rollout
from core.weights import publish_state_dict

pytestmark = pytest.mark.ray

PROMPTS = [Prompt(index=i, text=f"prompt {i}", token_ids=[1, i + 2]) for i in range(40)]


class StandInWorker:
    """Answers generate calls like a generation worker and loads published weights bucket by bucket;
    `die_on_call` makes its k-th generate call, `die_on_load` its k-th weight load (after the first bucket),
    kill its own process (once per actor, not again after Ray restarts it)."""

    def __init__(self, name: str, marker: str = "", die_on_call: int = 0, delay_s: float = 0.0,
                 die_on_load: int = 0):
        self.name, self.version, self.calls, self.loads, self.delay_s = name, 0, 0, 0, delay_s
        alive = marker and not os.path.exists(marker)
        self.die_on_call, self.die_on_load = (die_on_call, die_on_load) if alive else (0, 0)
        self.marker = marker

    def generate(self, prompts, n=1, temperature=None, max_tokens=None, expect_version=None):
        if expect_version is not None and self.version < expect_version:  # as GenerationWorker.generate does
            raise WeightsBehind(f"{self.name} holds version {self.version}, not {expect_version}")
        self.calls += 1
        if self.calls == self.die_on_call:
            open(self.marker, "w").close()
            os._exit(1)
        time.sleep(self.delay_s)
        return [Rollout(prompt_index=i, prompt_ids=list(ids), response_ids=[5, 6], text=f"reply to {i}",
                        logprobs=[-1.0, -1.0], version=self.version, worker=self.name, finished=True)
                for i, ids in prompts for _ in range(n)]

    def load_weights(self, version, weights):
        self.loads += 1
        for i, (name, tensor) in enumerate(weights.tensors()):
            if self.loads == self.die_on_load and i == 1:
                open(self.marker, "w").close()
                os._exit(1)
            assert tensor.eq(version).all(), f"{self.name} got {name} of another version"
        self.version = version
        return version

    def stats(self):
        return {"name": self.name, "version": self.version}

    def crash(self):
        os._exit(1)


class StandInReference:
    def ref_logprobs(self, prompt_ids, response_ids, temperature=None):
        return [[-1.0] * len(r) for r in response_ids]


class InstantReward:
    """The reward client's interface, answering in the driver."""
    counters = {}

    def submit(self, prompts, responses):
        return [float(len(r)) for r in responses]

    def done(self, pending):
        return True

    def result(self, pending):
        return pending


def workers(count, **options):
    """Stand-ins, up: each has decided whether it will die before any of them has had a call."""
    ws = [ray.remote(StandInWorker).options(max_restarts=options.pop("max_restarts", 0), max_task_retries=0)
          .remote(f"w{i}", **options) for i in range(count)]
    ray.get([w.stats.remote() for w in ws])
    return ws


def spawn(i):
    return ray.remote(StandInWorker).options(max_task_retries=0).remote(f"w{i}")


def make_stream(ws, staleness=0, buffer_size=16):
    return RolloutStream(WorkerPool(ws, spawn=spawn), PromptLedger(PROMPTS), ray.remote(StandInReference).remote(),
                         InstantReward(), samples_per_prompt=2, prompts_per_request=4, buffer_size=buffer_size,
                         max_staleness=staleness)


def step(stream, batch_prompts=8):
    """One training step as the job does it: take a batch, 'update', publish the next version."""
    batch = stream.take(batch_prompts * stream.samples_per_prompt)
    with stream.training():
        pass
    version = stream.learner_version
    weights = publish_state_dict({f"layer{i}": torch.full((4,), float(version)) for i in range(3)}, bucket_bytes=16)
    stream.publish(ray.put(weights), block=True)  # three buckets
    return batch


def pump_until_synced(stream, timeout=60):
    deadline = time.time() + timeout  # a restart takes a few seconds; batches go faster
    while stream.pool.syncing and time.time() < deadline:
        stream.pump()


def counters(stream):
    return {k.split("/", 1)[1]: v for k, v in stream.stats().items()}


def assert_exactly_once(stream, batches, on_policy=True):
    draws = [r.draw for b in batches for r in b]
    per_draw = {d: draws.count(d) for d in set(draws)}
    assert set(per_draw.values()) == {stream.samples_per_prompt}, "every prompt's samples, each in one batch"
    c = counters(stream)
    assert c["prompts_trained"] == len(per_draw) and c["prompts_trained_twice"] == 0
    assert c["prompts_drawn"] == c["prompts_trained"] + c["prompts_pending"]
    for b in batches:  # on-policy: every batch holds rollouts of the version being trained
        assert len({r.version for r in b}) == 1 or not on_policy


def test_on_policy_nothing_is_generated_beyond_the_batch(ray_session):
    # a request of 32 prompts x 4 samples would be twice the batch: only the batch's prompts go out, so
    # no rollout is generated, scored and given reference log-probs only to be dropped as stale
    stream = RolloutStream(WorkerPool(workers(1), spawn=spawn), PromptLedger(PROMPTS),
                           ray.remote(StandInReference).remote(), InstantReward(), samples_per_prompt=4,
                           prompts_per_request=32, buffer_size=64, max_staleness=0)
    batches = [step(stream, batch_prompts=16) for _ in range(3)]
    c = counters(stream)
    assert c["rollouts_scored"] == 3 * 64 and c["rollouts_dropped_stale"] == 0
    assert c["prompts_reissued"] == 0
    assert_exactly_once(stream, batches)


def test_without_a_reference_stage_rollouts_are_complete_once_scored(ray_session):
    # reference.placement=learner (or LoRA): the learner computes the reference log-probs in its update
    stream = RolloutStream(WorkerPool(workers(2), spawn=spawn), PromptLedger(PROMPTS), None, InstantReward(),
                           samples_per_prompt=2, prompts_per_request=4, buffer_size=16, max_staleness=0)
    batches = [step(stream) for _ in range(3)]
    assert all(r.score == len(r.text) and r.ref_logprobs is None for b in batches for r in b)
    assert_exactly_once(stream, batches)
    assert stream.lap_stage_times()["timing/reference"] == 0.0


def test_a_worker_that_dies_is_restarted_with_current_weights_and_loses_no_prompt(ray_session, tmp_path):
    ws = workers(2, max_restarts=1, marker=str(tmp_path / "died"), die_on_call=3)
    stream = make_stream(ws)
    batches = [step(stream) for _ in range(6)]
    pump_until_synced(stream)
    assert (tmp_path / "died").exists()
    assert counters(stream)["worker_failures"] == 2  # both stand-ins died once, on their 3rd call
    assert counters(stream)["prompts_reissued"] >= 4
    assert_exactly_once(stream, batches)
    assert len(stream.pool.recoveries) == 2 and not stream.pool.syncing
    # the restarted processes hold the newest weights, and their rollouts were trained on
    assert {ray.get(w.stats.remote())["version"] for w in stream.pool.workers.values()} == {6}
    assert {r.worker for r in batches[-1]} <= {"w0", "w1"}


def test_a_worker_that_dies_mid_sync_is_brought_back_and_the_others_get_the_version(ray_session, tmp_path):
    """Worker 0 dies in its second weight load, between two buckets: Ray restarts it and it loads the
    version again from the start; worker 1 loads every version; no step waits on the dead load."""
    ws = [ray.remote(StandInWorker).options(max_restarts=1, max_task_retries=0).remote(
              "w0", marker=str(tmp_path / "died"), die_on_load=2),
          ray.remote(StandInWorker).options(max_task_retries=0).remote("w1")]
    stream = make_stream(ws)
    batches = [step(stream) for _ in range(4)]
    pump_until_synced(stream)
    assert (tmp_path / "died").exists()
    assert counters(stream)["worker_failures"] == 1 and len(stream.pool.recoveries) == 1
    assert_exactly_once(stream, batches)
    assert [ray.get(w.stats.remote())["version"] for w in stream.pool.workers.values()] == [4, 4]


def test_a_worker_that_cannot_restart_is_replaced(ray_session, tmp_path):
    ws = workers(2, max_restarts=0, marker=str(tmp_path / "died"), die_on_call=2)
    stream = make_stream(ws)
    batches = [step(stream) for _ in range(4)]
    pump_until_synced(stream)
    assert counters(stream)["workers_replaced"] >= 1
    assert_exactly_once(stream, batches)
    assert {ray.get(w.stats.remote())["version"] for w in stream.pool.workers.values()} == {4}


def test_a_worker_restarted_while_idle_loads_the_current_weights_before_it_generates(ray_session):
    """Ray restarts a worker whose process died between calls; nothing the stream sent failed, so only the
    worker itself can tell that it holds the initial weights again: it refuses to generate (WeightsBehind),
    loads the current ones, and nothing it made at the old version is trained on or thrown away."""
    stream = make_stream(workers(2, max_restarts=1))
    batches = [step(stream) for _ in range(2)]
    victim = stream.pool.workers[0]
    ray.wait([victim.crash.remote()], timeout=30)  # on-policy, between steps: the worker is idle
    deadline = time.time() + 60
    while True:  # wait until Ray has it back, so that the stream never sees a failed call
        try:
            if ray.get(victim.stats.remote(), timeout=5)["version"] == 0:
                break
        except ray.exceptions.RayActorError:
            assert time.time() < deadline, "Ray did not restart the worker"
            time.sleep(0.5)
    batches += [step(stream) for _ in range(3)]
    pump_until_synced(stream)
    c = counters(stream)
    assert c["workers_resynced"] >= 1 and c["worker_failures"] == 0
    assert c["rollouts_dropped_stale"] == 0
    assert_exactly_once(stream, batches)  # every batch of one version: the one being trained
    assert all(r.version == v for v, b in enumerate(batches) for r in b)
    assert ray.get(victim.stats.remote())["version"] == 5


def test_an_added_worker_generates_with_the_current_weights(ray_session):
    stream = make_stream(workers(1))
    batches = [step(stream) for _ in range(2)]
    new = stream.pool.add()
    batches.append(step(stream))  # the learner goes on while the new worker starts
    pump_until_synced(stream)
    batches += [step(stream) for _ in range(2)]
    assert stream.pool.joined[new]["first_version"] == stream.pool.joined[new]["current_version"] >= 2
    assert any(r.worker == f"w{new}" for b in batches[2:] for r in b)
    assert_exactly_once(stream, batches)


def test_a_removed_worker_gives_back_its_unfinished_prompts(ray_session):
    stream = make_stream(workers(3, delay_s=0.5), staleness=2, buffer_size=64)
    # with staleness 2 the workers run two batches ahead: catch worker 2 while it is generating
    batches = [step(stream)]
    while not any(c.worker == 2 for c in stream.generating.values()) and len(batches) < 10:
        batches.append(step(stream))
    held = sum(len(c.draws) for c in stream.generating.values() if c.worker == 2)
    assert held
    stream.pool.remove(2)
    assert counters(stream)["workers_removed"] == 1 and 2 not in stream.pool.workers
    batches += [step(stream) for _ in range(3)]
    draws = [r.draw for b in batches for r in b]
    c = counters(stream)
    assert len(draws) == len(set(draws)) * stream.samples_per_prompt and c["prompts_trained_twice"] == 0
    assert c["prompts_drawn"] == c["prompts_trained"] + c["prompts_pending"]
    assert c["prompts_reissued"] >= held  # the prompts worker 2 held went out again
    assert all(r.worker != "w2" for b in batches[1:] for r in b if r.version >= 1)


@pytest.mark.parametrize("staleness", [0, 1])
def test_the_data_position_survives_a_checkpoint(ray_session, staleness):
    """The draws pending at the checkpoint are issued first, then the shuffle goes on where it was: on-policy,
    the resumed stream's next batches hold exactly the prompts the uninterrupted one's do."""
    stream = make_stream(workers(2), staleness=staleness)
    for _ in range(2):
        step(stream)
    state = stream.ledger.state_dict()
    expected = [sorted((r.draw, r.prompt_index) for r in step(stream)) for _ in range(2)]
    resumed = make_stream(workers(2), staleness=staleness)
    resumed.resume(state, version=2)
    assert [d.number for d in resumed.ledger.requeue] == [d for d, _ in state["pending"]]
    assert (staleness == 0) == (not state["pending"])  # running ahead leaves work in flight at a checkpoint
    resumed.publish(ray.put(publish_state_dict({}, 16)), block=True)
    got = [sorted((r.draw, r.prompt_index) for r in step(resumed)) for _ in range(2)]
    if staleness == 0:
        assert got == expected
    else:  # the work in flight at the checkpoint is redone first
        pending, trained = {d for d, _ in state["pending"]}, {d for batch in got for d, _ in batch}
        assert pending and pending <= trained
    assert counters(resumed)["prompts_trained_twice"] == 0


def test_workers_run_ahead_no_further_than_the_staleness_bound_allows(ray_session):
    """With staleness 1 and a buffer of several batches, the workers generate at most one batch ahead of
    the learner: nothing they make goes stale and has to be made again."""
    stream = make_stream(workers(2), staleness=1, buffer_size=64)
    batches, lags = [], []
    for _ in range(6):
        version = stream.learner_version
        batches.append(step(stream))
        lags += [version - r.version for r in batches[-1]]
    assert counters(stream)["rollouts_dropped_stale"] == 0 and counters(stream)["prompts_reissued"] == 0
    assert max(lags) <= 1
    assert_exactly_once(stream, batches, on_policy=False)


def test_workers_in_a_fixed_nccl_group_are_not_rescaled_and_a_lost_one_stops_the_job_saying_why():
    pool = WorkerPool(["worker-0", "worker-1"], spawn=lambda i: f"worker-{i}", fixed=True)
    pool.scale_to(3)
    assert len(pool.workers) == 2  # the request is logged and ignored
    pool._failed(1, ray.exceptions.RayActorError())
    pool.retry_at[1] = 0.0  # its retry is due
    with pytest.raises(RuntimeError, match="NCCL group cannot take a new member; resume from the last checkpoint"):
        pool.poll()
