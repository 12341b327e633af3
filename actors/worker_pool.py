"""The generation workers: the one owner of the fleet.

Membership changes while a job runs: `add` and `remove` (elastic scaling, `rlhf scale`, autoscaling on
the rollout buffer's depth), and a worker whose process dies is brought back (Ray restarts the actor;
if it cannot, or the worker is not back within RECOVER_TIMEOUT_S, `spawn` replaces it). A worker that
comes back, a replacement and a new worker all load the current weights before they are handed prompts;
so does a worker that Ray restarted while it was idle, which says so at its next call (`WeightsBehind`).

Weights are published once into the object store and every worker loads that one object (`publish`).
`sample(pool, ...)` draws N responses per prompt outside the training stream (evaluation, preference
pairs, West-of-N, Best-of-N), on whichever workers are free, re-sampling a chunk whose worker dies.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter, deque
from typing import Callable

import ray
from ray.exceptions import ActorDiedError, RayActorError

from actors.generation import WeightsBehind
from actors.nodes import room_for
from actors.watchdog import Watchdog
from core.environment import Conversations, EnvironmentFailure
from core.progress import Progress
from core.prompts import Prompt
from core.rollout import Rollout

log = logging.getLogger(__name__)

# A worker that Ray has not brought back after this long is replaced by a new one.
RECOVER_TIMEOUT_S = 300.0
# How often a worker that is being restarted is asked whether it is up.
SYNC_RETRY_S = 1.0
# A worker down this long is reported (what it waits for: a node with room), then every minute.
DOWN_REPORT_S = 10.0


class WorkersLost(RuntimeError):
    """Every generation worker has been down for longer than the job's deadline (`train.hang_timeout_s`), and
    the cluster has no room to bring them back: the job stops with a checkpoint."""


def worker_name(index: int) -> str:
    """The Ray actor name of generation worker `index`, as the dashboard shows it."""
    return f"generation-worker-{index}"


def autoscale_step(depth: int, batch: int, workers: int, fewest: int, most: int) -> int:
    """+1, -1 or 0 workers, from the rollouts waiting when the learner asks for a batch: less than a batch
    waiting means generation is the bottleneck (add one); two batches waiting means workers sit idle
    behind a full buffer (give one back)."""
    if depth < batch and workers < most:
        return 1
    if depth >= 2 * batch and workers > fewest:
        return -1
    return 0


class WorkerPool:
    def __init__(self, workers: list, spawn: Callable[[int], object] | None = None,
                 watchdog: Watchdog | None = None, autoscale_bounds: tuple[int, int] | None = None,
                 fixed: bool = False, demand: dict[str, float] | None = None):
        """`workers`: generation worker actor handles (worker i is named `worker_name(i)`); `spawn(i)` starts
        a replacement or an additional one; `autoscale_bounds`: (fewest, most) workers, or no autoscaling;
        `fixed`: the workers take their weights through a collective group that cannot take another one
        (`ppo.weight_transfer=nccl`), so a worker that would need syncing on its own stops the job; `demand`: the
        Ray resources one worker asks for (what a lost worker waits for, in the reports)."""
        self.workers: dict[int, object] = dict(enumerate(workers))
        self.versions = {i: 0 for i in self.workers}  # version of the last weights sent to each
        self.syncing: dict[int, int] = {}  # worker -> failed attempts so far; no prompts until it has synced
        self.down_since: dict[int, float] = {}  # worker -> when it failed, until it has synced again
        self.retry_at: dict[int, float] = {}  # worker -> when to ask a restarting worker again
        self.loads: dict[ray.ObjectRef, tuple[int, int]] = {}  # weight load or liveness check -> (worker, version)
        self.weights_ref: ray.ObjectRef | None = None  # the newest published weights, kept for late joiners
        self.weights_version = 0
        self.last_dispatch: dict[int, float] = {}  # worker -> when it was last handed prompts
        self.generating: dict[ray.ObjectRef, tuple[int, object, int]] = {}  # call -> (worker, its handle, version)
        self.spawn = spawn
        self.watchdog = watchdog or Watchdog(None)
        self.autoscale_bounds = autoscale_bounds
        self.fixed = fixed
        self.demand = demand or {}
        self.reported_at: dict[int, float] = {}  # down worker -> when it was last reported as waiting
        self.counters = {"worker_failures": 0, "workers_replaced": 0, "workers_added": 0, "workers_removed": 0,
                         "workers_resynced": 0, "environment_failures": 0}
        self.joined: dict[int, dict] = {}  # added worker -> policy version of its first rollouts and the current one
        self.recoveries: list[float] = []  # seconds from each worker failure to its first successful sync

    # --- handing out work ----------------------------------------------------------------------------
    def idle(self, held: Counter, min_version: int, capacity: int = 1) -> list[int]:
        """Workers with room for prompts: holding fewer than `capacity` (`held`: prompts each worker is
        generating), up, holding at least `min_version`; the least loaded first, then the one idle longest, so
        that an added worker gets work even when only a few prompts fit."""
        free = [i for i in self.workers
                if held[i] < capacity and i not in self.syncing and self.versions[i] >= min_version]
        return sorted(free, key=lambda i: (held[i], self.last_dispatch.get(i, 0.0)))

    def generate(self, i: int, prompts: list[Prompt], n: int, temperature: float | None = None,
                 conversations: Conversations | None = None) -> ray.ObjectRef:
        """Start worker i sampling `n` responses to each prompt (with `conversations`: holding `n` conversations
        about each); `collect` takes the result."""
        self.last_dispatch[i] = time.perf_counter()
        actor, version = self.workers[i], self.versions[i]
        if conversations is None:
            ref = actor.generate.remote([(p.index, p.token_ids) for p in prompts], n, temperature,
                                        expect_version=version)
        else:
            ref = actor.converse.remote([(p.index, p.text) for p in prompts], n, conversations, temperature,
                                        expect_version=version)
        self.generating[ref] = (i, actor, version)
        return self.watchdog.sent(ref, worker_name(i), "generate")

    def collect(self, ref: ray.ObjectRef) -> list[Rollout] | None:
        """The rollouts of a finished `generate` call, or None when they were lost: the worker died (it is
        being brought back), was behind (it is loading the current weights), or an environment failed."""
        self.watchdog.done(ref)
        i, actor, version = self.generating.pop(ref)
        try:
            rollouts = ray.get(ref)
        except RayActorError as exc:
            if self._is_current(i, actor):
                self._failed(i, exc)
            return None
        except WeightsBehind as exc:
            if self._is_current(i, actor):
                self._resync(i, exc)
            return None
        except EnvironmentFailure as exc:
            self.counters["environment_failures"] += 1
            log.error("%s; the conversations of that call are dropped and their prompts issued again", exc)
            return None
        if i in self.joined and "first_version" not in self.joined[i] and rollouts:
            self.joined[i].update(first_version=rollouts[0].version, current_version=version)
        return rollouts

    def wait(self, calls: list[ray.ObjectRef], timeout: float) -> list[ray.ObjectRef]:
        """Wait up to `timeout` s for the caller's calls in flight (its `generate` calls and any others of its
        own); returns those that finished. The pool's own calls (a worker loading weights or coming back) are
        settled here. The one wait of every loop that hands prompts to the workers."""
        refs = [*calls, *self.waiting()]
        if not refs:  # every worker is on its way back; nothing to wait on yet
            time.sleep(timeout)
            return []
        mine, finished = set(calls), []
        for ref in ray.wait(refs, num_returns=len(refs), timeout=timeout)[0]:
            if ref in mine:
                finished.append(ref)
            else:
                self.settle(ref)
        return finished

    def _is_current(self, i: int, actor) -> bool:
        """Whether `actor` still is worker i (not removed, not replaced since the call was sent)."""
        return i in self.workers and self.workers[i] == actor

    # --- failures and recovery -----------------------------------------------------------------------
    def _failed(self, i: int, exc: Exception, during_sync: bool = False) -> None:
        """A call to worker i failed because its process is gone: bring it back (Ray restarts the actor;
        one that is dead for good, or not back in RECOVER_TIMEOUT_S, is replaced)."""
        if i not in self.workers:
            return
        now = time.perf_counter()
        if i not in self.down_since:
            self.counters["worker_failures"] += 1
            self.down_since[i] = now
            log.warning("generation worker %d failed (%s); the prompts it was generating go back in the queue; "
                        "waiting for it to come back", i, type(exc).__name__)
        # The call that saw the death may say "died" while Ray restarts the actor, but calls to a restarting
        # actor say "unavailable": "died" twice while bringing it back means it is dead for good.
        self.syncing[i] = self.syncing.get(i, 0) + (1 if during_sync and isinstance(exc, ActorDiedError) else 0)
        # A replacement waits for a node with room just as a restart does: only worth it where there is room.
        if self.syncing[i] >= 2 or (now - self.down_since[i] > RECOVER_TIMEOUT_S and room_for(self.demand)[0]):
            self._replace(i)
            self.syncing[i] = 0
        if not any(w == i for w, _ in self.loads.values()) and i not in self.retry_at:
            self.retry_at[i] = now + SYNC_RETRY_S

    def _resync(self, i: int, exc: Exception) -> None:
        log.warning("%s; loading policy version %d into it before it gets prompts again", exc, self.weights_version)
        self.counters["workers_resynced"] += 1
        self._sync(i)

    def _sync(self, i: int) -> None:
        """Load the current weights into worker i (a restarted, replaced or new one) before it gets prompts."""
        if self.fixed:
            raise RuntimeError(f"generation worker {i} was restarted, replaced or added, but with "
                               f"ppo.weight_transfer=nccl the workers' NCCL group cannot take a new member; resume "
                               f"from the last checkpoint (rlhf train --resume), or use ppo.weight_transfer="
                               f"object_store for elastic, fault-tolerant workers")
        self.syncing.setdefault(i, 0)
        worker = self.workers[i]
        if self.weights_ref is not None:
            ref = worker.load_weights.remote(self.weights_version, self.weights_ref)
        else:  # nothing published yet: it holds the initial weights; only check that it is up
            ref = worker.stats.remote()
        self._track_load(i, ref, self.weights_version)

    def _track_load(self, i: int, ref: ray.ObjectRef, version: int) -> ray.ObjectRef:
        """Worker i's weight load (or liveness check) of `version`, in flight: `settle` sees it through."""
        self.loads[self.watchdog.sent(ref, worker_name(i), "load_weights")] = (i, version)
        return ref

    def poll(self) -> None:
        """Ask restarting workers again whether they are up, where that is due; report the ones that stay
        down, and stop the job once none has been up for longer than its deadline."""
        now = time.perf_counter()
        for i, when in list(self.retry_at.items()):
            if now >= when:
                del self.retry_at[i]
                if i in self.workers:
                    self._sync(i)
        due = [i for i in self.down_since if self._report_due(i, now)]
        if due:
            self._report_down(due, now)
        deadline = self.watchdog.timeout_s
        if deadline is not None and self.workers and len(self.down_since) == len(self.workers):
            down_for = now - max(self.down_since.values())  # none has been up since the last went down
            if down_for > deadline:
                raise WorkersLost(f"no generation worker has been up for {down_for:.0f} s (train.hang_timeout_s = "
                                  f"{deadline:g} s): {self._why_down()}. Add a node with room, or lower "
                                  f"generation.num_cpus / num_gpus, then resume (train.resume=auto)")

    def _report_due(self, i: int, now: float) -> bool:
        """First DOWN_REPORT_S after the worker went down, then every 6 times that."""
        last = self.reported_at.get(i)
        return now - self.down_since[i] >= DOWN_REPORT_S if last is None else now - last >= 6 * DOWN_REPORT_S

    def _why_down(self) -> str:
        fits, offered = room_for(self.demand)
        return "Ray is starting them again" if fits else f"no node has room for them ({offered})"

    def _report_down(self, due: list[int], now: float) -> None:
        """Say what the workers in `due` wait for, and what the job does meanwhile."""
        for i in due:
            self.reported_at[i] = now
        up = len(self.workers) - len(self.down_since)
        deadline = self.watchdog.timeout_s
        if up:
            goes_on = f"training goes on with {up} of {len(self.workers)} workers"
        elif deadline is not None:
            left = deadline - (now - max(self.down_since.values()))
            goes_on = (f"no worker is up: the job waits {left:.0f} s more for room (train.hang_timeout_s), then "
                       f"stops with a checkpoint")
        else:
            goes_on = "no worker is up: the job waits for room"
        log.warning("generation workers %s down for %.0f s: %s; %s. They rejoin, with the current weights, as soon "
                    "as a node has room (one you add, or the autoscaler's)", ", ".join(map(str, due)),
                    now - min(self.down_since[i] for i in due), self._why_down(), goes_on)

    def _replace(self, i: int) -> None:
        if self.spawn is None:
            raise RuntimeError(f"generation worker {i} is dead and there is no way to start another")
        log.warning("generation worker %d is not coming back; starting a replacement", i)
        ray.kill(self.workers[i], no_restart=True)
        self._forget_calls(i)
        self.workers[i] = self.spawn(i)
        self.counters["workers_replaced"] += 1

    def _forget_calls(self, i: int) -> None:
        """Worker i was killed: its calls in flight will never be waited on."""
        self.watchdog.forget_role(worker_name(i))
        self.loads = {ref: (w, v) for ref, (w, v) in self.loads.items() if w != i}

    # --- weights -------------------------------------------------------------------------------------
    def publish(self, version: int, weights_ref: ray.ObjectRef) -> list[ray.ObjectRef]:
        """Every worker that is up loads the weights published once as `weights_ref` (a worker coming back
        gets them when it is up); returns the loads sent."""
        self.weights_ref, self.weights_version = weights_ref, version
        sent = []
        for i, worker in self.workers.items():
            if i not in self.syncing:
                sent.append(self._track_load(i, worker.load_weights.remote(version, weights_ref), version))
                self.versions[i] = version
        return sent

    def waiting(self) -> list[ray.ObjectRef]:
        """Weight loads and liveness checks in flight: pass each ready one to `settle`."""
        return list(self.loads)

    def settle(self, ref: ray.ObjectRef) -> None:
        """A weight load or liveness check has finished (or failed)."""
        self.watchdog.done(ref)
        if ref not in self.loads:
            return
        i, version = self.loads.pop(ref)
        if i not in self.workers:
            return
        try:
            ray.get(ref)
        except RayActorError as exc:
            self._failed(i, exc, during_sync=i in self.syncing)
            return
        self.versions[i] = max(self.versions[i], version)
        if i in self.syncing:
            if version < self.weights_version:  # newer weights were published while it loaded these
                self._sync(i)
                return
            del self.syncing[i]
            self.reported_at.pop(i, None)
            if i in self.down_since:
                took = time.perf_counter() - self.down_since.pop(i)
                self.recoveries.append(took)
                log.warning("generation worker %d is back with policy version %d, %.1f s after it failed",
                            i, version, took)

    # --- membership ----------------------------------------------------------------------------------
    def add(self) -> int:
        """Start one more generation worker; it loads the current weights before it gets prompts."""
        if self.spawn is None:
            raise RuntimeError("this pool has no way to start workers (no spawn function)")
        i = max(self.workers, default=-1) + 1
        self.workers[i] = self.spawn(i)
        self.versions[i] = self.weights_version
        self.counters["workers_added"] += 1
        self.joined[i] = {"added_at_version": self.weights_version}
        self._sync(i)
        log.info("added generation worker %d (%d workers)", i, len(self.workers))
        return i

    def remove(self, i: int | None = None) -> int:
        """Stop worker i (default: the newest); the prompts it was generating go back in the queue when its
        calls fail."""
        if len(self.workers) <= 1:
            raise ValueError("cannot remove the last generation worker")
        i = max(self.workers) if i is None else i
        ray.kill(self.workers.pop(i))
        self._forget_calls(i)
        for state in (self.versions, self.syncing, self.down_since, self.retry_at, self.reported_at):
            state.pop(i, None)
        self.counters["workers_removed"] += 1
        log.info("removed generation worker %d (%d workers)", i, len(self.workers))
        return i

    def scale_to(self, count: int) -> None:
        if self.fixed and count != len(self.workers):
            log.warning("scaling request for %d generation workers ignored: with ppo.weight_transfer=nccl the "
                        "workers' NCCL group is fixed at %d", count, len(self.workers))
            return
        while len(self.workers) < count:
            self.add()
        while len(self.workers) > max(count, 1):
            self.remove()

    def autoscale(self, depth: int, batch: int) -> None:
        """At most one membership change per batch, from the buffer depth (`autoscale_step`)."""
        if self.autoscale_bounds is None or self.syncing:
            return
        change = autoscale_step(depth, batch, len(self.workers), *self.autoscale_bounds)
        if change:
            log.info("autoscale: %d rollouts waiting for a batch of %d, %s a worker", depth, batch,
                     "adding" if change > 0 else "removing")
            self.add() if change > 0 else self.remove()

    # --- reporting -----------------------------------------------------------------------------------
    def status(self) -> dict:
        return {"workers": {i: ("syncing" if i in self.syncing else f"version {self.versions[i]}")
                            for i in sorted(self.workers)},
                "recoveries_s": [round(t, 1) for t in self.recoveries], "joined": self.joined}

    def stats(self) -> dict:
        return {**self.counters, "workers": len(self.workers), "workers_syncing": len(self.syncing)}

    def shutdown(self) -> None:
        for worker in self.workers.values():
            ray.kill(worker, no_restart=True)


def sample(pool: WorkerPool, prompts: list[Prompt], samples_per_prompt: int, temperature: float | None = None,
           chunk_size: int = 32, label: str = "sampling",
           conversations: Conversations | None = None) -> list[list[Rollout]]:
    """`samples_per_prompt` responses for each prompt from the pool's workers, outside the training stream
    (evaluation, preference pairs, West-of-N, Best-of-N): one list per prompt in the order given (a prompt
    listed twice gets two lists). Chunks go to whichever worker is free, with a progress line; a chunk
    whose worker dies is sampled again."""
    todo = deque(list(range(start, min(start + chunk_size, len(prompts))))
                 for start in range(0, len(prompts), chunk_size))
    groups: list[list[Rollout]] = [[] for _ in prompts]
    running: dict[ray.ObjectRef, tuple[int, list[int]]] = {}  # call -> (worker, positions in `prompts`)
    progress = Progress(label, len(prompts) * samples_per_prompt, "responses")
    waiting_since = time.monotonic()
    while todo or running:
        for i in pool.idle(Counter(i for i, _ in running.values()), pool.weights_version):
            if not todo:
                break
            positions = todo.popleft()
            # The position in `prompts` is the index the worker echoes back, so duplicates stay apart.
            ref = pool.generate(i, [dataclasses.replace(prompts[k], index=k) for k in positions], samples_per_prompt,
                                temperature, conversations)
            running[ref] = (i, positions)
        pool.poll()
        pool.watchdog.check(waiting_since)
        for ref in pool.wait(list(running), timeout=0.05):
            _, positions = running.pop(ref)
            rollouts = pool.collect(ref)
            if rollouts is None:
                todo.appendleft(positions)
                continue
            for r in rollouts:
                groups[r.prompt_index].append(r)
                r.prompt_index = prompts[r.prompt_index].index
            progress.advance(len(rollouts))
    return groups
