"""Talking to a running job: `rlhf scale --workers N` and `rlhf status`.

Each training job starts one small named actor, `control`, in its Ray namespace (`train.ray_namespace`).
The job's rollout stream reports its status there and picks up scaling requests from it between
batches, so a request never interrupts an update. The actor lives and dies with the job.
"""

from __future__ import annotations

import ray

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
    try:
        ray.kill(ray.get_actor(CONTROL_NAME))
    except ValueError:
        pass
    return ray.remote(JobControl).options(name=CONTROL_NAME, num_cpus=0).remote()


def find_control(address: str, namespace: str):
    """The control actor of the job running in `namespace` on the cluster at `address`."""
    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=namespace, logging_level="warning")
    try:
        return ray.get_actor(CONTROL_NAME, namespace=namespace)
    except ValueError:
        raise SystemExit(f"rlhf: no running job in Ray namespace {namespace!r} on {address or 'this cluster'} "
                         f"(start one with `rlhf train`, or pass --namespace / --address)") from None
