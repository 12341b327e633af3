"""The rollout stream: keeps every generation worker busy, scores what they return, and holds the
scored rollouts in a bounded buffer from which the learner takes batches.

It runs in the job's driver and moves only small objects (token ids, log-probs); the heavy work
happens in the actors it calls. Staleness is enforced twice: a worker is handed prompts only when
its rollouts could still be trained on, and `take` sets aside anything older than `max_staleness`
versions (its prompts are issued again), so no rollout older than that is ever trained on.

Every prompt handed out is a *draw* with a serial number. A draw is pending from the moment it is
issued until a batch that holds it is taken, and it is trained on exactly once: when a worker dies,
is removed, or its rollouts go stale, the draw's prompt goes back to the front of the queue. The
counters (`stream/prompts_*`) show it: drawn = trained + pending, and `prompts_trained_twice` stays 0.

Membership changes while the stream runs: `add_worker` and `remove_worker` (elastic scaling), and a
worker whose process dies is brought back (Ray restarts the actor; if it cannot, `spawn` replaces
it) and loads the current weights before it is handed prompts again.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

import ray
from ray.exceptions import ActorDiedError, RayActorError

from actors.prompts import Prompt
from actors.rollout import Rollout

log = logging.getLogger(__name__)

# A worker that Ray has not brought back after this long is replaced by a new one.
RECOVER_TIMEOUT_S = 300.0
# How often a worker that is being restarted is asked whether it is up.
SYNC_RETRY_S = 1.0


@dataclass
class _Chunk:
    worker: int
    draws: list[tuple[int, Prompt]]  # (draw number, prompt)
    started: float
    version: int  # the newest weights sent to the worker when the chunk was handed out

    @property
    def prompts(self) -> list[Prompt]:
        return [p for _, p in self.draws]


class RolloutStream:
    def __init__(self, workers: list, reference, reward, prompts: list[Prompt], *, samples_per_prompt: int,
                 prompts_per_request: int, buffer_size: int, max_staleness: int, seed: int = 0,
                 spawn: Callable[[int], object] | None = None):
        """`reward` is a `reward_server.client.RewardClient` (or anything with `submit` and `result`);
        `spawn(index)` starts a replacement or additional generation worker."""
        self.workers: dict[int, object] = dict(enumerate(workers))
        self.worker_versions = {i: 0 for i in self.workers}  # version of the last weights sent to each
        self.syncing: dict[int, int] = {}  # worker -> failed attempts so far; no prompts until it has synced
        self.down_since: dict[int, float] = {}  # worker -> when it failed, until it has synced again
        self.retry_at: dict[int, float] = {}  # worker -> when to ask a restarting worker again
        self.spawn = spawn
        self.reference = reference
        self.reward = reward
        self.prompts = prompts
        self.by_index = {p.index: p for p in prompts}
        self.n = samples_per_prompt
        self.prompts_per_request = prompts_per_request
        self.capacity = buffer_size * samples_per_prompt  # in rollouts
        self.max_staleness = max_staleness
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.epoch = 0
        self.next_draw = 0
        self.pending: dict[int, Prompt] = {}  # draw -> prompt: issued, not yet trained on
        self.requeue: deque[tuple[int, Prompt]] = deque()  # draws to hand out again, before new ones
        self.trained: Counter[int] = Counter()  # draw -> times taken into a batch (must stay <= 1)
        self.buffer: deque[Rollout] = deque()
        self.generating: dict[ray.ObjectRef, _Chunk] = {}
        self.scoring: dict[ray.ObjectRef, tuple[_Chunk, object]] = {}
        self.loads: dict[ray.ObjectRef, tuple[int, int]] = {}  # weight load -> (worker, version)
        self.learner_version = 0
        self.weights_ref: ray.ObjectRef | None = None  # the weights of `weights_version`, kept for late joiners
        self.weights_version = 0
        self.updating = False  # an update is running: what is generated now is trained on after it
        self.wanted = 0  # rollouts the learner is waiting for; on-policy mode generates no more than that
        self.batch = 0  # rollouts per batch, known from the first `take`
        self.last_dispatch: dict[int, float] = {}  # worker -> when it was last handed prompts
        self.counters = {"prompts_drawn": 0, "prompts_reissued": 0, "prompts_trained": 0, "prompts_trained_twice": 0,
                         "rollouts_scored": 0, "rollouts_dropped_stale": 0, "worker_failures": 0,
                         "workers_replaced": 0, "workers_added": 0, "workers_removed": 0, "chunks_behind_weights": 0}
        self.joined: dict[int, dict] = {}  # added worker -> policy version of its first rollouts and the current one
        self.timings = {"generate": 0.0, "score": 0.0}
        self.recoveries: list[float] = []  # seconds from each worker failure to its first successful sync
        self.control = None  # cluster.control.JobControl handle: scaling requests from `rlhf scale`
        self.control_ref: ray.ObjectRef | None = None
        self.last_poll = 0.0
        self.autoscale_bounds: tuple[int, int] | None = None  # (fewest, most) workers, or no autoscaling

    # --- prompts -------------------------------------------------------------------------------
    def _next_prompts(self, k: int) -> list[tuple[int, Prompt]]:
        """k draws: first those to be issued again, then the next prompts of a seeded shuffle,
        reshuffled every epoch over the prompt set."""
        out = []
        while len(out) < k and self.requeue:
            out.append(self.requeue.popleft())
            self.counters["prompts_reissued"] += 1
        while len(out) < k:
            if not self.order:
                self.order = list(range(len(self.prompts)))
                self.rng.shuffle(self.order)
                self.epoch += 1
            prompt = self.prompts[self.order.pop()]
            self.pending[self.next_draw] = prompt
            out.append((self.next_draw, prompt))
            self.next_draw += 1
            self.counters["prompts_drawn"] += 1
        return out

    def _issue_again(self, draws: list[tuple[int, Prompt]]) -> None:
        """Put draws back at the front of the queue, oldest first."""
        merged = {d: p for d, p in self.requeue}
        merged.update(draws)
        self.requeue = deque(sorted(merged.items()))

    # --- pumping -------------------------------------------------------------------------------
    def _in_flight(self) -> int:
        chunks = list(self.generating.values()) + [c for c, _ in self.scoring.values()]
        return sum(len(c.draws) for c in chunks) * self.n

    def _usable_version(self) -> int:
        """Oldest policy version whose rollouts can still be trained on by the next update."""
        return self.learner_version + (1 if self.updating else 0) - self.max_staleness

    def _dispatch(self) -> None:
        busy = {c.worker for c in self.generating.values()}
        # The worker idle longest goes first: a new one gets work even when only a few chunks fit.
        for i in sorted(self.workers, key=lambda w: self.last_dispatch.get(w, 0.0)):
            worker = self.workers[i]
            if i in busy or i in self.syncing or self.worker_versions[i] < self._usable_version():
                continue
            # On-policy, anything beyond the current batch would be stale by the time it is trained on; with
            # staleness k, anything beyond k batches ahead of the learner would be too.
            limit = self.wanted
            if self.max_staleness > 0:
                limit = min(self.capacity, self.max_staleness * self.batch) if self.batch else self.capacity
            if len(self.buffer) + self._in_flight() >= limit:
                return
            chunk = _Chunk(worker=i, draws=self._next_prompts(self.prompts_per_request), started=time.perf_counter(),
                           version=self.worker_versions[i])
            ref = worker.generate.remote([(p.index, p.token_ids) for p in chunk.prompts], self.n)
            self.generating[ref] = chunk
            self.last_dispatch[i] = chunk.started

    def pump(self, timeout: float = 0.05) -> None:
        """Hand out prompts to idle workers and move finished work one stage on."""
        self._poll_control()
        self._retry_syncs()
        self._dispatch()
        waiting = list(self.generating) + list(self.scoring) + list(self.loads)
        if not waiting:
            time.sleep(timeout)
            return
        ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=timeout)
        for ref in ready:
            if ref in self.generating:
                self._start_scoring(self.generating.pop(ref), ref)
            elif ref in self.scoring:
                self._finish_scoring(ref)
            elif ref in self.loads:
                self._finish_load(ref, *self.loads.pop(ref))
        self._dispatch()

    def _start_scoring(self, chunk: _Chunk, ref: ray.ObjectRef) -> None:
        try:
            rollouts = ray.get(ref)
        except RayActorError as exc:
            self._worker_failed(chunk.worker, exc, chunk)
            return
        if chunk.worker not in self.workers:  # removed while it generated: its draws went back already
            return
        for j, r in enumerate(rollouts):  # n samples per prompt, in prompt order
            r.draw = chunk.draws[j // self.n][0]
        if rollouts and rollouts[0].version < chunk.version:  # never expected: calls run in the order sent
            self.counters["chunks_behind_weights"] += 1
        if chunk.worker in self.joined and "first_version" not in self.joined[chunk.worker]:
            self.joined[chunk.worker].update(first_version=rollouts[0].version if rollouts else -1,
                                             current_version=chunk.version)
        self.timings["generate"] += time.perf_counter() - chunk.started
        chunk.started = time.perf_counter()
        reward = self.reward.submit([self.by_index[r.prompt_index].text for r in rollouts], [r.text for r in rollouts])
        self.scoring[self.reference.ref_logprobs.remote(rollouts)] = (chunk, reward)

    def _finish_scoring(self, ref: ray.ObjectRef) -> None:
        chunk, reward = self.scoring.pop(ref)
        rollouts = ray.get(ref)
        scores = self.reward.result(reward)
        for r, s in zip(rollouts, scores):
            r.score = float(s)
        self.buffer.extend(rollouts)
        self.counters["rollouts_scored"] += len(rollouts)
        self.timings["score"] += time.perf_counter() - chunk.started

    # --- membership and failures ---------------------------------------------------------------------
    def _worker_failed(self, i: int, exc: Exception, chunk: _Chunk | None = None, during_sync: bool = False) -> None:
        """A call to worker i failed because its process is gone: re-issue its prompts and bring it back
        (Ray restarts the actor; one that is dead for good, or not back in RECOVER_TIMEOUT_S, is replaced)."""
        if i not in self.workers:
            return
        lost = self._take_back(i)  # whatever else it was generating is lost too
        if chunk is not None:
            self._issue_again(chunk.draws)
            lost += chunk.draws
        now = time.perf_counter()
        if i not in self.down_since:
            self.counters["worker_failures"] += 1
            self.down_since[i] = now
            log.warning("generation worker %d failed (%s); %d prompts go back in the queue; waiting for it to "
                        "come back", i, type(exc).__name__, len(lost))
        # The call that saw the death may say "died" while Ray restarts the actor, but calls to a restarting
        # actor say "unavailable": "died" twice while bringing it back means it is dead for good.
        self.syncing[i] = self.syncing.get(i, 0) + (1 if during_sync and isinstance(exc, ActorDiedError) else 0)
        if self.syncing[i] >= 2 or now - self.down_since[i] > RECOVER_TIMEOUT_S:
            self._replace(i)
            self.syncing[i] = 0
        if not self._has_load(i) and i not in self.retry_at:
            self.retry_at[i] = now + SYNC_RETRY_S

    def _take_back(self, i: int) -> list[tuple[int, Prompt]]:
        """Forget what worker i is generating; its draws go back to the front of the queue."""
        lost = [d for ref, c in list(self.generating.items()) if c.worker == i for d in self.generating.pop(ref).draws]
        self._issue_again(lost)
        return lost

    def _sync(self, i: int) -> None:
        """Load the current weights into worker i (a restarted, replaced or new one) before it gets prompts."""
        self.syncing.setdefault(i, 0)
        worker = self.workers[i]
        ref = (worker.load_weights.remote(self.weights_version, self.weights_ref) if self.weights_ref is not None
               else worker.stats.remote())
        self.loads[ref] = (i, self.weights_version)

    def _retry_syncs(self) -> None:
        now = time.perf_counter()
        for i, when in list(self.retry_at.items()):
            if now >= when:
                del self.retry_at[i]
                if i in self.workers:
                    self._sync(i)

    def _replace(self, i: int) -> None:
        if self.spawn is None:
            raise RuntimeError(f"generation worker {i} is dead and there is no way to start another")
        log.warning("generation worker %d is not coming back; starting a replacement", i)
        ray.kill(self.workers[i], no_restart=True)
        self.workers[i] = self.spawn(i)
        self.counters["workers_replaced"] += 1

    def _finish_load(self, ref: ray.ObjectRef, i: int, version: int) -> None:
        if i not in self.workers:
            return
        try:
            ray.get(ref)
        except RayActorError as exc:
            self._worker_failed(i, exc, during_sync=i in self.syncing)
            return
        self.worker_versions[i] = max(self.worker_versions[i], version)
        if i in self.syncing:
            if version < self.weights_version:  # newer weights were published while it loaded these
                self._sync(i)
                return
            del self.syncing[i]
            if i in self.down_since:
                took = time.perf_counter() - self.down_since.pop(i)
                self.recoveries.append(took)
                log.warning("generation worker %d is back with policy version %d, %.1f s after it failed",
                            i, version, took)

    def _has_load(self, i: int) -> bool:
        return any(w == i for w, _ in self.loads.values())

    def add_worker(self) -> int:
        """Start one more generation worker; it loads the current weights before it gets prompts."""
        if self.spawn is None:
            raise RuntimeError("this stream has no way to start workers (no spawn function)")
        i = max(self.workers, default=-1) + 1
        self.workers[i] = self.spawn(i)
        self.worker_versions[i] = self.weights_version
        self.counters["workers_added"] += 1
        self.joined[i] = {"added_at_version": self.weights_version}
        self._sync(i)
        log.info("added generation worker %d (%d workers)", i, len(self.workers))
        return i

    def remove_worker(self, i: int | None = None) -> int:
        """Stop worker i (default: the newest); the prompts it was generating are issued again."""
        if len(self.workers) <= 1:
            raise ValueError("cannot remove the last generation worker")
        i = max(self.workers) if i is None else i
        lost = self._take_back(i)
        ray.kill(self.workers.pop(i))
        self.worker_versions.pop(i, None)
        self.syncing.pop(i, None)
        self.down_since.pop(i, None)
        self.retry_at.pop(i, None)
        self.counters["workers_removed"] += 1
        log.info("removed generation worker %d (%d workers); %d prompts go back in the queue", i, len(self.workers),
                 len(lost))
        return i

    def generate_now(self, prompts: list[tuple[int, list[int]]], n: int, temperature: float) -> list[Rollout]:
        """Sample `n` responses for each (index, token ids) on the workers that are up, outside the
        training stream (evaluation); a shard whose worker dies is sampled again on another."""
        todo, done = [prompts], []
        while todo:
            workers = [i for i in self.workers if i not in self.syncing]
            if not workers:
                self.pump(timeout=0.5)
                continue
            shards = [(i, shard[k::len(workers)]) for shard in todo for k, i in enumerate(workers)]
            refs = {self.workers[i].generate.remote(shard, n, temperature): (i, shard) for i, shard in shards if shard}
            todo = []
            for ref, (i, shard) in refs.items():
                try:
                    done += ray.get(ref)
                except RayActorError as exc:
                    self._worker_failed(i, exc)
                    todo.append(shard)
        return done

    def scale_to(self, count: int) -> None:
        while len(self.workers) < count:
            self.add_worker()
        while len(self.workers) > max(count, 1):
            self.remove_worker()

    def _poll_control(self, interval_s: float = 1.0) -> None:
        """Report status to the job's control actor and apply a scaling request, without blocking."""
        if self.control is None:
            return
        if self.control_ref is not None:
            if not ray.wait([self.control_ref], timeout=0)[0]:
                return
            requested, self.control_ref = ray.get(self.control_ref), None
            if requested is not None and requested != len(self.workers):
                log.info("scaling request: %d -> %d generation workers", len(self.workers), requested)
                self.scale_to(requested)
        if time.perf_counter() - self.last_poll >= interval_s:
            self.last_poll = time.perf_counter()
            self.control_ref = self.control.poll.remote(self.status())

    def status(self) -> dict:
        return {"workers": {i: ("syncing" if i in self.syncing else f"version {self.worker_versions[i]}")
                            for i in sorted(self.workers)},
                "policy_version": self.learner_version, "buffer_depth": len(self.buffer),
                "counters": dict(self.counters), "recoveries_s": [round(t, 1) for t in self.recoveries],
                "joined": self.joined}

    def autoscale(self, batch: int) -> None:
        """At most one membership change per batch, on buffer depth: a learner that finds less than a batch
        waiting gets another worker; one that finds two batches waiting gives one back."""
        if self.autoscale_bounds is None or self.syncing:
            return
        fewest, most = self.autoscale_bounds
        depth = len(self.buffer)
        if depth < batch and len(self.workers) < most:
            log.info("autoscale: %d rollouts waiting for a batch of %d, adding a worker", depth, batch)
            self.add_worker()
        elif depth >= 2 * batch and len(self.workers) > fewest:
            log.info("autoscale: %d rollouts waiting for a batch of %d, removing a worker", depth, batch)
            self.remove_worker()

    # --- the learner's side ----------------------------------------------------------------------
    def take(self, n: int) -> list[Rollout]:
        """The next n rollouts fresh enough for the update at `learner_version`, pumping until there are."""
        self.batch = n
        self.autoscale(n)
        while True:
            oldest = self.learner_version - self.max_staleness
            stale = [r for r in self.buffer if r.version < oldest]
            if stale:
                self.buffer = deque(r for r in self.buffer if r.version >= oldest)
                self.counters["rollouts_dropped_stale"] += len(stale)
                self._issue_again([(d, self.pending[d]) for d in sorted({r.draw for r in stale})])
            if len(self.buffer) >= n:
                self.wanted = 0
                batch = [self.buffer.popleft() for _ in range(n)]
                self._mark_trained(batch)
                return batch
            self.wanted = n
            self.pump()

    def _mark_trained(self, batch: list[Rollout]) -> None:
        for draw in {r.draw for r in batch}:
            self.trained[draw] += 1
            if self.trained[draw] > 1:
                self.counters["prompts_trained_twice"] += 1
                log.error("prompt draw %d was trained on twice", draw)
            self.pending.pop(draw, None)
            self.counters["prompts_trained"] += 1

    def wait(self, ref: ray.ObjectRef):
        """ray.get(ref), keeping the workers and the buffer going meanwhile."""
        while not ray.wait([ref], timeout=0)[0]:
            self.pump()
        return ray.get(ref)

    def broadcast(self, version: int, weights_ref: ray.ObjectRef, block: bool) -> float:
        """Every worker loads the weights published once as `weights_ref`; returns seconds waited."""
        start = time.perf_counter()
        self.weights_ref, self.weights_version = weights_ref, version
        sent = []
        for i, worker in self.workers.items():
            if i in self.syncing:  # a worker coming back gets these weights from `_sync` when it is up
                continue
            ref = worker.load_weights.remote(version, weights_ref)
            self.loads[ref] = (i, version)
            self.worker_versions[i] = version
            sent.append(ref)
        if block:  # only the loads sent here: a worker added meanwhile does not hold up the learner
            while any(ref in self.loads for ref in sent):
                self.pump()
        return time.perf_counter() - start

    # --- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The data position: the shuffle's state and every draw not yet trained on (JSON-able)."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self.order), "epoch": self.epoch,
                "next_draw": self.next_draw, "counters": dict(self.counters),
                "pending": [[d, p.index] for d, p in sorted(self.pending.items())]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved data position: the draws pending then are issued first, in draw order."""
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order, self.epoch, self.next_draw = list(state["order"]), state["epoch"], state["next_draw"]
        self.counters.update(state["counters"])
        self.pending = {d: self.by_index[i] for d, i in state["pending"]}
        self.requeue = deque(sorted(self.pending.items()))

    def stats(self) -> dict:
        timings, self.timings = self.timings, {k: 0.0 for k in self.timings}
        return {**{f"stream/{k}": v for k, v in self.counters.items()},
                "stream/prompts_pending": len(self.pending), "stream/buffer_depth": len(self.buffer),
                "stream/epoch": self.epoch, "stream/workers": len(self.workers),
                "stream/workers_syncing": len(self.syncing),
                **{f"timing/{k}_total": v for k, v in timings.items()}}
