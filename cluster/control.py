"""Talking to a running job: `rlhf scale --workers N` and `rlhf status`.

Each training job starts one small named actor, `control`, in its Ray namespace (`train.ray_namespace`).
The job's rollout stream reports its status there and picks up scaling requests from it between
batches, so a request never interrupts an update. The actor lives and dies with the job.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def start_control():
    """The job's control actor (replacing one a previous job left under the same name)."""
    import ray

    try:
        ray.kill(ray.get_actor(CONTROL_NAME))
    except ValueError:
        pass
    return ray.remote(JobControl).options(name=CONTROL_NAME, num_cpus=0).remote()


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
