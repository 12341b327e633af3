"""Deadlines for remote calls: every call the job waits on is registered with the role it waits on, and a
call in flight for longer than `train.hang_timeout_s` means that role is stuck.

A call that waits forever without an error (a wedged engine, a deadlocked collective, a process
stopped by the OS) is the failure users of RLHF systems find hardest to diagnose: the job just stops
printing. Here the wait loops call `check()`, which raises `Hang` naming each stuck role, the call and how
long it has waited; the job then writes the stuck processes' stacks and stops (cluster/job.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Call:
    role: str  # the Ray actor's name, e.g. generation-worker-0, reference, learner
    method: str  # what was called
    sent: float  # time.monotonic() when it was sent


class Hang(RuntimeError):
    """Remote calls that have not finished within the deadline; `stuck` names them."""

    def __init__(self, stuck: list[Call], timeout_s: float, waiting_on_nothing: float = 0.0):
        self.stuck = stuck
        self.timeout_s = timeout_s
        now = time.monotonic()
        if stuck:
            calls = ", ".join(f"{c.role} ({c.method}, {now - c.sent:.0f} s)" for c in stuck)
            text = f"no answer within train.hang_timeout_s = {timeout_s:g} s from: {calls}"
        else:
            text = (f"the job has waited {waiting_on_nothing:.0f} s with no remote call in flight "
                    f"(train.hang_timeout_s = {timeout_s:g} s): nothing can make progress")
        super().__init__(text)

    @property
    def roles(self) -> list[str]:
        return sorted({c.role for c in self.stuck})


class Watchdog:
    """The remote calls in flight, by the role they wait on. `timeout_s=None` never raises."""

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self.calls: dict["ray.ObjectRef", Call] = {}
        self.last_activity = time.monotonic()  # when a call was last sent or finished

    def sent(self, ref: ray.ObjectRef, role: str, method: str) -> ray.ObjectRef:
        self.last_activity = time.monotonic()
        self.calls[ref] = Call(role, method, self.last_activity)
        return ref

    def done(self, ref: ray.ObjectRef) -> None:
        self.last_activity = time.monotonic()
        self.calls.pop(ref, None)

    def forget_role(self, role: str) -> None:
        """A role that was killed or replaced: its calls will never be waited on again."""
        for ref in [r for r, c in self.calls.items() if c.role == role]:
            del self.calls[ref]

    def check(self, waiting_since: float | None = None) -> None:
        """Raise Hang if a call has been in flight longer than the deadline, or if the caller, waiting since
        `waiting_since` (time.monotonic()), has seen nothing sent or finished for that long."""
        if self.timeout_s is None:
            return
        now = time.monotonic()
        if not self.calls:
            quiet = now - max(waiting_since or now, self.last_activity)
            if quiet > self.timeout_s:
                raise Hang([], self.timeout_s, quiet)
            return
        late = [ref for ref, c in self.calls.items() if now - c.sent > self.timeout_s]
        if not late:
            return
        import ray

        # A call that has finished but was not collected yet (the caller was busy elsewhere) is not stuck.
        finished = set(ray.wait(late, num_returns=len(late), timeout=0, fetch_local=False)[0])
        stuck = sorted((self.calls[ref] for ref in late if ref not in finished), key=lambda c: c.sent)
        if stuck:
            raise Hang(stuck, self.timeout_s)

    def get(self, ref: ray.ObjectRef, role: str, method: str, poll_s: float = 1.0):
        """ray.get(ref) within the deadline: the value, Ray's error for a failed call, or Hang."""
        import ray

        self.sent(ref, role, method)
        while not ray.wait([ref], timeout=poll_s, fetch_local=False)[0]:
            self.check()
        self.done(ref)
        return ray.get(ref)
