"""Sampling N responses per prompt from the generation workers, outside the PPO loop: for preference
data, West-of-N, Best-of-N and evaluation. Chunks go to whichever worker is free, with a progress line."""

from __future__ import annotations

import logging
import time

import ray

from actors.prompts import Prompt
from actors.rollout import Rollout

log = logging.getLogger(__name__)


def sample(workers: list, prompts: list[Prompt], n: int, temperature: float | None = None,
           chunk_size: int = 32, label: str = "sampling") -> list[list[Rollout]]:
    """`n` responses for each prompt, as one list per prompt in the order given. The prompts may repeat
    (a prompt listed twice gets 2n responses, in two lists)."""
    chunks = [list(range(i, min(i + chunk_size, len(prompts)))) for i in range(0, len(prompts), chunk_size)]
    results: list[list[Rollout]] = [[] for _ in prompts]
    idle, pending = list(workers), {}
    progress = Progress(label, len(prompts) * n, "responses")
    while chunks or pending:
        while idle and chunks:
            worker, positions = idle.pop(), chunks.pop(0)
            # The position in `prompts` is the index the worker echoes back, so duplicates stay apart.
            ref = worker.generate.remote([(i, prompts[i].token_ids) for i in positions], n, temperature)
            pending[ref] = worker
        ready, _ = ray.wait(list(pending), num_returns=1)
        idle.append(pending.pop(ready[0]))
        rollouts = ray.get(ready[0])
        for rollout in rollouts:
            results[rollout.prompt_index].append(rollout)
        progress.advance(len(rollouts))
    return results


class Progress:
    """A log line every `every_s` seconds and at the end: done/total, rate and ETA."""

    def __init__(self, label: str, total: int, unit: str, every_s: float = 15.0):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.start = self.last_log = time.perf_counter()
        self.done = 0

    def advance(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.last_log > self.every_s or self.done >= self.total:
            rate = self.done / max(now - self.start, 1e-9)
            log.info("%s: %d/%d %s | %.1f %s/s | ETA %.0f s", self.label, self.done, self.total, self.unit, rate,
                     self.unit, (self.total - self.done) / max(rate, 1e-9))
            self.last_log = now


def mean_logprob(rollout: Rollout) -> float:
    """Mean per-token log-prob of the response under the policy that sampled it."""
    return sum(rollout.logprobs) / max(1, len(rollout.logprobs))
