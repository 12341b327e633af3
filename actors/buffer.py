"""The rollout stream: keeps every generation worker busy, scores what they return, and holds the
scored rollouts in a bounded buffer from which the learner takes batches.

It runs in the job's driver and moves only small objects (token ids, log-probs); the heavy work
happens in the actors it calls. Staleness is enforced twice: a worker is handed prompts only when
its rollouts could still be trained on, and `take` drops anything older than `max_staleness`
versions, so no rollout older than that is ever trained on.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field

import ray

from actors.prompts import Prompt
from actors.rollout import Rollout

log = logging.getLogger(__name__)


@dataclass
class _Chunk:
    worker: int
    prompts: list[Prompt]
    started: float
    rollouts: list[Rollout] = field(default_factory=list)


class RolloutStream:
    def __init__(self, workers: list, reference, reward, prompts: list[Prompt], *, samples_per_prompt: int,
                 prompts_per_request: int, buffer_size: int, max_staleness: int, seed: int = 0,
                 reward_timeout_s: float = 600.0):
        self.workers = list(workers)
        self.worker_versions = [0] * len(workers)  # version of the last weights sent to each worker
        self.reference = reference
        self.reward = reward
        self.prompts = prompts
        self.n = samples_per_prompt
        self.prompts_per_request = prompts_per_request
        self.capacity = buffer_size * samples_per_prompt  # in rollouts
        self.max_staleness = max_staleness
        self.reward_timeout_s = reward_timeout_s
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.epoch = 0
        self.buffer: deque[Rollout] = deque()
        self.generating: dict[ray.ObjectRef, _Chunk] = {}
        self.scoring: dict[ray.ObjectRef, tuple[_Chunk, object]] = {}
        self.pending_loads: list[ray.ObjectRef] = []
        self.learner_version = 0
        self.updating = False  # an update is running: what is generated now is trained on after it
        self.wanted = 0  # rollouts the learner is waiting for; on-policy mode generates no more than that
        self.counters = {"prompts_issued": 0, "rollouts_scored": 0, "rollouts_dropped_stale": 0}
        self.timings = {"generate": 0.0, "score": 0.0}

    # --- prompts -------------------------------------------------------------------------------
    def _next_prompts(self, k: int) -> list[Prompt]:
        """The next k prompts of a seeded shuffle, reshuffled every epoch over the prompt set."""
        out = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(len(self.prompts)))
                self.rng.shuffle(self.order)
                self.epoch += 1
            out.append(self.prompts[self.order.pop()])
        self.counters["prompts_issued"] += k
        return out

    # --- pumping -------------------------------------------------------------------------------
    def _in_flight(self) -> int:
        chunks = list(self.generating.values()) + [c for c, _ in self.scoring.values()]
        return sum(len(c.prompts) for c in chunks) * self.n

    def _usable_version(self) -> int:
        """Oldest policy version whose rollouts can still be trained on by the next update."""
        return self.learner_version + (1 if self.updating else 0) - self.max_staleness

    def _dispatch(self) -> None:
        busy = {c.worker for c in self.generating.values()}
        for i, worker in enumerate(self.workers):
            if i in busy or self.worker_versions[i] < self._usable_version():
                continue
            # On-policy, anything beyond the current batch would be stale by the time it is trained on.
            limit = self.capacity if self.max_staleness > 0 else self.wanted
            if len(self.buffer) + self._in_flight() >= limit:
                return
            chunk = _Chunk(worker=i, prompts=self._next_prompts(self.prompts_per_request), started=time.perf_counter())
            ref = worker.generate.remote([(p.index, p.token_ids) for p in chunk.prompts], self.n)
            self.generating[ref] = chunk

    def pump(self, timeout: float = 0.05) -> None:
        """Hand out prompts to idle workers and move finished work one stage on."""
        self._dispatch()
        waiting = list(self.generating) + list(self.scoring) + self.pending_loads
        if not waiting:
            time.sleep(timeout)
            return
        ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=timeout)
        for ref in ready:
            if ref in self.generating:
                self._start_scoring(self.generating.pop(ref), ref)
            elif ref in self.scoring:
                self._finish_scoring(ref)
            else:
                ray.get(ref)  # surfaces a failed weight load
                self.pending_loads.remove(ref)
        self._dispatch()

    def _start_scoring(self, chunk: _Chunk, ref: ray.ObjectRef) -> None:
        chunk.rollouts = ray.get(ref)
        self.timings["generate"] += time.perf_counter() - chunk.started
        chunk.started = time.perf_counter()
        texts = {p.index: p.text for p in chunk.prompts}
        reward = self.reward.score.remote([texts[r.prompt_index] for r in chunk.rollouts],
                                          [r.text for r in chunk.rollouts])
        self.scoring[self.reference.ref_logprobs.remote(chunk.rollouts)] = (chunk, reward)

    def _finish_scoring(self, ref: ray.ObjectRef) -> None:
        chunk, reward = self.scoring.pop(ref)
        rollouts = ray.get(ref)
        scores = reward.result(timeout_s=self.reward_timeout_s)
        for r, s in zip(rollouts, scores):
            r.score = float(s)
        self.buffer.extend(rollouts)
        self.counters["rollouts_scored"] += len(rollouts)
        self.timings["score"] += time.perf_counter() - chunk.started

    # --- the learner's side ----------------------------------------------------------------------
    def take(self, n: int) -> list[Rollout]:
        """The next n rollouts fresh enough for the update at `learner_version`, pumping until there are."""
        while True:
            oldest = self.learner_version - self.max_staleness
            stale = [r for r in self.buffer if r.version < oldest]
            if stale:
                self.buffer = deque(r for r in self.buffer if r.version >= oldest)
                self.counters["rollouts_dropped_stale"] += len(stale)
            if len(self.buffer) >= n:
                self.wanted = 0
                return [self.buffer.popleft() for _ in range(n)]
            self.wanted = n
            self.pump()

    def wait(self, ref: ray.ObjectRef):
        """ray.get(ref), keeping the workers and the buffer going meanwhile."""
        while not ray.wait([ref], timeout=0)[0]:
            self.pump()
        return ray.get(ref)

    def broadcast(self, version: int, weights_ref: ray.ObjectRef, block: bool) -> float:
        """Every worker loads the weights published once as `weights_ref`; returns seconds waited."""
        start = time.perf_counter()
        loads = [w.load_weights.remote(version, weights_ref) for w in self.workers]
        self.worker_versions = [version] * len(self.workers)
        if block:
            ray.get(loads)
        else:
            self.pending_loads.extend(loads)
        return time.perf_counter() - start

    def stats(self) -> dict:
        timings, self.timings = self.timings, {k: 0.0 for k in self.timings}
        return {**{f"stream/{k}": v for k, v in self.counters.items()},
                "stream/buffer_depth": len(self.buffer), "stream/epoch": self.epoch,
                **{f"timing/{k}_total": v for k, v in timings.items()}}
