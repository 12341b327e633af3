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
    idle, pending, start, done = list(workers), {}, time.perf_counter(), 0
    last_log = start
    while chunks or pending:
        while idle and chunks:
            worker, positions = idle.pop(), chunks.pop(0)
            # The position in `prompts` is the index the worker echoes back, so duplicates stay apart.
            ref = worker.generate.remote([(i, prompts[i].token_ids) for i in positions], n, temperature)
            pending[ref] = worker
        ready, _ = ray.wait(list(pending), num_returns=1)
        idle.append(pending.pop(ready[0]))
        for rollout in ray.get(ready[0]):
            results[rollout.prompt_index].append(rollout)
            done += 1
        now = time.perf_counter()
        if now - last_log > 15 or not (chunks or pending):
            rate = done / (now - start)
            log.info("%s: %d/%d responses | %.1f responses/s | ETA %.0f s", label, done, len(prompts) * n,
                     rate, (len(prompts) * n - done) / max(rate, 1e-9))
            last_log = now
    return results


def mean_logprob(rollout: Rollout) -> float:
    """Mean per-token log-prob of the response under the policy that sampled it."""
    return sum(rollout.logprobs) / max(1, len(rollout.logprobs))
