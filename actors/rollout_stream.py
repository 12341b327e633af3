"""The rollout stream: keeps the generation workers busy, has what they return scored and given reference
log-probs, and holds the finished rollouts in a bounded buffer from which the learner takes batches.

One chunk of prompts (one prompt when streaming, the default) goes through three stages, each a method
below, in order:
  1. `_dispatch`:  the ledger draws prompts -> a worker with room generates (pool.generate)
  2. `_generated`: its rollouts go at once to the reward server (scores) and the reference (log-probs)
  3. `_scored`:    both answers in -> each rollout gets its score and reference log-probs -> the buffer
When the learner holds the reference model (`reference=None` here) it computes the reference log-probs in
its update, and a chunk is complete once scored.
`pump` moves every chunk in flight one stage on; the learner's side calls it while it waits (`take`,
`wait`, `publish`), so generation goes on while the learner updates and while weights load.

It runs in the job's driver and moves only small objects (token ids, log-probs); the heavy work happens
in the actors it calls. Staleness is enforced twice: a worker is handed prompts only when its rollouts
could still be trained on, and `take` sets aside anything older than `max_staleness` versions (its
prompts are issued again), so no rollout older than that is ever trained on.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import ray

from actors.prompt_ledger import Draw, PromptLedger
from actors.worker_pool import WorkerPool
from core.environment import Conversations
from core.rollout import Rollout


@dataclass
class _Chunk:
    worker: int
    draws: list[Draw]
    rollouts: list[Rollout] = field(default_factory=list)  # once generated
    scores: object = None  # the reward client's pending request, once generated
    reward_done: bool = False


class StageClock:
    """Wall-clock seconds during which at least one chunk was in a stage: chunks in the stage at the same
    time count once, so the stages of one step can be compared with the step's own time."""

    def __init__(self):
        self.active = 0
        self.since = 0.0
        self.total = 0.0

    def enter(self) -> None:
        if self.active == 0:
            self.since = time.perf_counter()
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.total += time.perf_counter() - self.since

    def lap(self) -> float:
        """Seconds busy since the last lap."""
        now = time.perf_counter()
        busy = self.total + (now - self.since if self.active else 0.0)
        self.total, self.since = 0.0, now
        return busy


class RolloutStream:
    def __init__(self, pool: WorkerPool, ledger: PromptLedger, reference, reward, *, samples_per_prompt: int,
                 prompts_per_request: int, buffer_size: int, max_staleness: int, streaming: bool = True,
                 conversations: Conversations | None = None, on_pump: Callable[[], None] | None = None):
        """`reference`: the reference model's actor handle, or None when the learner computes the reference
        log-probs itself; `reward`: a `reward_server.client.RewardClient`;
        `buffer_size` in prompts; `on_pump()` runs on every pump (the job's control link). Calls are timed
        by the pool's watchdog."""
        self.pool = pool
        self.ledger = ledger
        self.reference = reference
        self.reward = reward
        self.samples_per_prompt = samples_per_prompt
        self.prompts_per_request = prompts_per_request  # prompts a worker holds at once
        self.per_call = 1 if streaming else prompts_per_request  # prompts handed in one call
        self.conversations = conversations  # each rollout a conversation, scored by its environment
        self.capacity = buffer_size * samples_per_prompt  # in rollouts
        self.max_staleness = max_staleness
        self.watchdog = pool.watchdog
        self.on_pump = on_pump
        self.buffer: deque[Rollout] = deque()
        self.generating: dict[ray.ObjectRef, _Chunk] = {}  # generate call -> chunk
        self.scoring: dict[ray.ObjectRef, _Chunk] = {}  # reference call -> chunk (its reward is scored meanwhile)
        self.scoring_only: list[_Chunk] = []  # chunks waiting for their scores alone (no reference stage)
        self.learner_version = 0
        self.updating = False  # an update is running: what is generated now is trained on after it
        self.wanted = 0  # rollouts the learner is waiting for; on-policy mode generates no more than that
        self.batch_size = 0  # rollouts per batch, known from the first `take`
        self.clocks = {stage: StageClock() for stage in ("generate", "score", "reference")}
        self.counters = {"rollouts_scored": 0, "rollouts_dropped_stale": 0}

    # --- the per-chunk pipeline ------------------------------------------------------------------
    def _dispatch(self) -> None:
        """1. Hand prompts to workers with room for them, as many as may be in flight: streaming, one prompt a
        call, so that each comes back as soon as its own samples are done and its place is filled at once."""
        while True:
            held = Counter()  # prompts each worker is generating
            for c in self.generating.values():
                held[c.worker] += len(c.draws)
            free = self.pool.idle(held, self._usable_version(), self.prompts_per_request)
            room = self._limit() - len(self.buffer) - self._in_flight()  # in rollouts
            if not free or room <= 0:
                return
            i = free[0]
            # no more prompts than the room holds: on-policy, rollouts beyond the batch would be dropped stale
            count = min(self.per_call, self.prompts_per_request - held[i], -(-room // self.samples_per_prompt))
            chunk = _Chunk(worker=i, draws=self.ledger.draw(count))
            ref = self.pool.generate(i, [d.prompt for d in chunk.draws], self.samples_per_prompt,
                                     conversations=self.conversations)
            self.generating[ref] = chunk
            self.clocks["generate"].enter()

    def _generated(self, chunk: _Chunk, ref: ray.ObjectRef) -> None:
        """2. Rollouts are back: score them and get their reference log-probs, both at once."""
        self.clocks["generate"].leave()
        chunk.rollouts = self.pool.collect(ref) or []
        if not chunk.rollouts:  # lost with its worker: the prompts go out again
            self.ledger.give_back({d.number for d in chunk.draws})
            return
        for j, r in enumerate(chunk.rollouts):  # samples_per_prompt samples per prompt, in prompt order
            r.draw = chunk.draws[j // self.samples_per_prompt].number
        if self.conversations is not None:  # scored by their environment already
            chunk.scores, chunk.reward_done = [r.score for r in chunk.rollouts], True
        else:
            texts = {d.prompt.index: d.prompt.text for d in chunk.draws}
            chunk.scores = self.reward.submit([texts[r.prompt_index] for r in chunk.rollouts],
                                              [r.text for r in chunk.rollouts])
            self.clocks["score"].enter()
        if self.reference is None:
            self.scoring_only.append(chunk)
            return
        ref = self.reference.ref_logprobs.remote([r.prompt_ids for r in chunk.rollouts],
                                                 [r.response_ids for r in chunk.rollouts])
        self.scoring[self.watchdog.sent(ref, "reference", "ref_logprobs")] = chunk
        self.clocks["reference"].enter()

    def _scored(self, chunk: _Chunk, ref: ray.ObjectRef | None) -> None:
        """3. Reference log-probs (unless the learner computes them) and scores are in: the rollouts are
        complete and go into the buffer."""
        ref_logprobs = [None] * len(chunk.rollouts)
        if ref is not None:
            self.watchdog.done(ref)
            self.clocks["reference"].leave()
            ref_logprobs = ray.get(ref)
        if self.conversations is not None:
            scores = chunk.scores
        else:
            scores = self.reward.result(chunk.scores)  # waits, with retries, if the reward server is still at it
            if not chunk.reward_done:
                self.clocks["score"].leave()
        for r, lp, s in zip(chunk.rollouts, ref_logprobs, scores):
            r.ref_logprobs, r.score = lp, float(s)
        self.buffer.extend(chunk.rollouts)
        self.counters["rollouts_scored"] += len(chunk.rollouts)

    def pump(self, timeout: float = 0.05, waiting_since: float | None = None) -> None:
        """Move every chunk in flight one stage on, as far as it can go now."""
        if self.on_pump is not None:
            self.on_pump()
        self.pool.poll()
        self._dispatch()
        for chunk in self.scoring.values():  # the reward server's answers: for the stage clock only
            if not chunk.reward_done and self.reward.done(chunk.scores):
                chunk.reward_done = True
                self.clocks["score"].leave()
        for chunk in [c for c in self.scoring_only if c.reward_done or self.reward.done(c.scores)]:
            self.scoring_only.remove(chunk)
            self._scored(chunk, None)
        for ref in self.pool.wait([*self.generating, *self.scoring], timeout):
            if ref in self.generating:
                self._generated(self.generating.pop(ref), ref)
            else:
                self._scored(self.scoring.pop(ref), ref)
        self._dispatch()
        self.watchdog.check(waiting_since)

    def _in_flight(self) -> int:
        chunks = [*self.generating.values(), *self.scoring.values(), *self.scoring_only]
        return sum(len(c.draws) for c in chunks) * self.samples_per_prompt

    def _limit(self) -> int:
        """Rollouts that may be buffered or in flight. On-policy, anything beyond the batch the learner waits
        for would be stale by the time it is trained on; with staleness k, anything beyond k batches ahead
        of the learner would be."""
        if self.max_staleness == 0:
            return self.wanted
        return min(self.capacity, self.max_staleness * self.batch_size) if self.batch_size else self.capacity

    def _usable_version(self) -> int:
        """Oldest policy version whose rollouts can still be trained on by the next update."""
        return self.learner_version + (1 if self.updating else 0) - self.max_staleness

    # --- the learner's side ----------------------------------------------------------------------
    def take(self, count: int) -> list[Rollout]:
        """The next `count` rollouts fresh enough for the update at `learner_version`, pumping until there
        are; their prompts count as trained on."""
        self.batch_size = count
        self.pool.autoscale(len(self.buffer), count)
        since = time.monotonic()
        while True:
            oldest = self.learner_version - self.max_staleness
            stale = [r for r in self.buffer if r.version < oldest]
            if stale:
                self.buffer = deque(r for r in self.buffer if r.version >= oldest)
                self.counters["rollouts_dropped_stale"] += len(stale)
                self.ledger.give_back({r.draw for r in stale})
            if len(self.buffer) >= count:
                self.wanted = 0
                batch = [self.buffer.popleft() for _ in range(count)]
                self.ledger.trained_on({r.draw for r in batch})
                return batch
            self.wanted = count
            self.pump(waiting_since=since)

    @contextmanager
    def training(self):
        """The learner is updating: what the workers generate meanwhile is trained on after this update,
        so the staleness rule counts one version more. A finished update advances the version by one."""
        self.updating = True
        try:
            yield
            self.learner_version += 1
        finally:
            self.updating = False

    def wait(self, ref: ray.ObjectRef, role: str, method: str):
        """ray.get(ref) of a call to `role`, within the deadline, keeping the workers and the buffer going."""
        self.watchdog.sent(ref, role, method)
        since = time.monotonic()
        while not ray.wait([ref], timeout=0, fetch_local=False)[0]:
            self.pump(waiting_since=since)
        self.watchdog.done(ref)
        return ray.get(ref)

    def publish(self, weights_ref: ray.ObjectRef, block: bool) -> None:
        """Every worker loads the learner's weights, published once as `weights_ref`, as `learner_version`;
        with `block`, return when the workers up now have them (one added meanwhile does not hold this up)."""
        sent = self.pool.publish(self.learner_version, weights_ref)
        since = time.monotonic()
        while block and any(ref in self.pool.loads for ref in sent):
            self.pump(waiting_since=since)

    # --- checkpoints and metrics -----------------------------------------------------------------
    def resume(self, ledger_state: dict, version: int) -> None:
        """Continue from a checkpoint: its data position, and the learner at policy `version`."""
        self.ledger.load_state_dict(ledger_state)
        self.learner_version = version

    def stats(self) -> dict:
        """Counters of the ledger, the pool and the stream (`stream/...`)."""
        counts = {**self.ledger.stats(), **self.pool.stats(), **self.counters, "buffer_depth": len(self.buffer)}
        return {f"stream/{k}": v for k, v in counts.items()}

    def status(self) -> dict:
        """What `rlhf status` shows: each worker's state, the policy version, the buffer and the counters."""
        return {**self.pool.status(), "policy_version": self.learner_version, "buffer_depth": len(self.buffer),
                "counters": {k.split("/", 1)[1]: v for k, v in self.stats().items()}}

    def lap_stage_times(self) -> dict:
        """Wall-clock seconds each stage was busy since the last lap (`timing/generate`, `timing/score`,
        `timing/reference`); the job laps at the start and the end of each step, so that they count the
        step's own time (running ahead, a stage may be idle through a step whose rollouts were ready)."""
        return {f"timing/{stage}": clock.lap() for stage, clock in self.clocks.items()}
