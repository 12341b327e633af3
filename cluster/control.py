"""Talking to a running job: `rlhf scale --workers N` and `rlhf status`.

Each training job starts one small named actor, `control`, in its Ray namespace (`train.ray_namespace`).
The job reports its status there and picks up scaling requests from it (`ControlLink`, polled while the
rollout stream pumps), so a request applies within a second or two and never interrupts an update. The
actor lives and dies with the job.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

CONTROL_NAME = "control"


class JobControl:
    """Holds the newest scaling request and the job's latest status."""

    def __init__(self):
        self.requested: int | None = None
        self.status: dict = {}

    def scale(self, workers: int) -> dict:
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        self.requested = workers
        return self.status

    def poll(self, status: dict) -> int | None:
        """The job's side: report status, collect the pending request (once)."""
        self.status = status
        requested, self.requested = self.requested, None
        return requested

    def get_status(self) -> dict:
        return self.status


class ControlLink:
    """The job's side of the control actor: at most every `interval_s` it reports `status()` and applies a
    pending scaling request with `scale_to(count)`; it never waits for the actor."""

    def __init__(self, actor, status: Callable[[], dict], workers: Callable[[], int],
                 scale_to: Callable[[int], None], interval_s: float = 1.0,
                 restart: Callable[[], object] | None = None):
        """`restart()`: a new control actor for one that was lost (default: `start_control`)."""
        self.actor, self.status, self.workers, self.scale_to = actor, status, workers, scale_to
        self.interval_s = interval_s
        self.restart = restart or start_control
        self.reply = None  # the poll in flight
        self.last_poll = 0.0

    def poll(self) -> None:
        import ray
        from ray.exceptions import RayActorError

        if self.reply is not None:
            if not ray.wait([self.reply], timeout=0)[0]:
                return
            try:
                requested = ray.get(self.reply)
            except RayActorError as exc:
                # Training never needs the control actor: start another (a scaling request sent to the lost
                # one is lost with it) and go on.
                log.warning("the job's control actor was lost (%s); starting another: `rlhf scale` and `rlhf "
                            "status` answer again in a moment", type(exc).__name__)
                requested, self.actor = None, self.restart()
            self.reply = None
            if requested is not None and requested != self.workers():
                log.info("scaling request: %d -> %d generation workers", self.workers(), requested)
                self.scale_to(requested)
        if time.perf_counter() - self.last_poll >= self.interval_s:
            self.last_poll = time.perf_counter()
            self.reply = self.actor.poll.remote(self.status())


def start_control():
    """The job's control actor (replacing one a previous job left under the same name), on the driver's
    node, so that losing another node does not take it."""
    import ray

    from actors.nodes import on_this_node

    try:
        ray.kill(ray.get_actor(CONTROL_NAME))
    except ValueError:
        pass
    return ray.remote(JobControl).options(name=CONTROL_NAME, num_cpus=0, scheduling_strategy=on_this_node()).remote()


def find_control(address: str, namespace: str):
    """The control actor of the job running in `namespace` on the cluster at `address`."""
    # Present the cluster's token when there is one (Ray does so on its own only for address "auto").
    # Ray reads the mode when it is imported, so this comes first.
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get(
            "RAY_AUTH_TOKEN_PATH") or Path("~/.ray/auth_token").expanduser().is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=namespace, logging_level="warning")
    try:
        return ray.get_actor(CONTROL_NAME, namespace=namespace)
    except ValueError:
        raise SystemExit(f"rlhf: no running job in Ray namespace {namespace!r} on {address or 'this cluster'} "
                         f"(start one with `rlhf train`, or pass --namespace / --address)") from None
