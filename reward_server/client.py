"""How the training job talks to the reward server: bounded retries with timeouts, never a made-up reward.

While the server is down or stalled the job waits and says so (a warning per attempt, with the time
left), and goes on where it stopped once the server answers again. Past `reward.unavailable_deadline_s`
it stops with an error that says what failed. A reward is only ever what the scorer returned: a
rollout is never scored 0 (or anything else) in place of an answer. A bad item (`ScoringError`) is
not retried: the same input would fail again, and the error names the item.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ray import serve

from reward_server.scorers import ScoringError

if TYPE_CHECKING:
    from core.config import RewardConfig

log = logging.getLogger(__name__)


class RewardServerUnavailable(RuntimeError):
    """The reward server did not answer within the configured deadline."""


@dataclass
class PendingScore:
    prompts: list[str]
    responses: list[str]
    response: object | None  # the Serve response of the latest attempt; None if it could not be sent
    error: Exception | None = None  # why it could not be sent
    rewards: list[float] | None = None  # the answer, once `done` has seen it


class RewardClient:
    def __init__(self, cfg: RewardConfig, app_name: str, handle=None):
        """`cfg` is the run's `RewardConfig`; `handle` the app's DeploymentHandle (looked up by name if
        None, and again after a failure, since a redeployed server needs a fresh handle)."""
        self.cfg = cfg
        self.app_name = app_name
        self.handle = handle
        self.counters = {"reward/retries": 0, "reward/seconds_unavailable": 0.0}

    def _handle(self):
        if self.handle is None:
            self.handle = serve.get_app_handle(self.app_name)
        return self.handle

    def submit(self, prompts: list[str], responses: list[str]) -> PendingScore:
        """Start scoring without waiting; `result` collects (and retries)."""
        try:
            return PendingScore(prompts, responses, self._handle().score.remote(prompts, responses))
        except Exception as exc:  # noqa: BLE001 - app gone, controller unreachable: retried in `result`
            return PendingScore(prompts, responses, None, exc)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """The `Scorer` interface (reward_server/scorers.py): Best-of-N and reports score through the server
        with the same retries and deadline as training."""
        return self.result(self.submit(prompts, responses))

    def done(self, pending: PendingScore) -> bool:
        """Whether the answer is in, or the attempt failed (`result` then retries); never waits."""
        if pending.rewards is not None or pending.response is None:
            return True
        try:
            pending.rewards = pending.response.result(timeout_s=0)
        except TimeoutError:
            return False
        except Exception:  # noqa: BLE001 - a failed attempt; `result` retries it
            return True
        return True

    def result(self, pending: PendingScore) -> list[float]:
        """The rewards, retrying every `retry_interval_s` until `unavailable_deadline_s` has passed."""
        if pending.rewards is not None:
            return pending.rewards
        first_failure = None
        while True:
            try:
                if pending.response is None:
                    raise pending.error
                rewards = pending.response.result(timeout_s=self.cfg.timeout_s)
            except Exception as exc:  # noqa: BLE001 - any other failure means no answer: wait, try again
                if _is_scoring_error(exc):
                    raise
                now = time.perf_counter()
                first_failure = first_failure or now
                waited = now - first_failure
                if waited >= self.cfg.unavailable_deadline_s:
                    raise RewardServerUnavailable(
                        f"the reward server has not answered for {waited:.0f} s "
                        f"(reward.unavailable_deadline_s = {self.cfg.unavailable_deadline_s:g}); last error: "
                        f"{type(exc).__name__}: {_first_line(exc)}. Check `serve status` and the reward "
                        f"server's logs on the Ray dashboard; the last checkpoint resumes the run "
                        f"(train.resume=auto)") from exc
                log.warning("reward server unavailable (%s: %s); waiting %.0f s more before giving up, "
                            "retrying in %.0f s", type(exc).__name__, _first_line(exc),
                            self.cfg.unavailable_deadline_s - waited, self.cfg.retry_interval_s)
                time.sleep(self.cfg.retry_interval_s)
                self.counters["reward/retries"] += 1
                self.handle = None
                pending = self.submit(pending.prompts, pending.responses)
                continue
            if first_failure is not None:
                down = time.perf_counter() - first_failure
                self.counters["reward/seconds_unavailable"] += down
                log.warning("reward server answering again after %.1f s", down)
            return rewards


def _is_scoring_error(exc: Exception) -> bool:
    """A ScoringError raised in the replica reaches the caller wrapped (RayTaskError and the like)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, ScoringError) or type(seen).__name__.startswith("ScoringError"):
            return True
        seen = getattr(seen, "cause", None) or seen.__cause__
    return False


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300].rstrip(".") if text else "(no message)"
