"""`Progress`: the rate-and-ETA line of any long loop (training, evaluation, sampling, scoring)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class Progress:
    """done/total with rate and ETA; `advance` logs a line every `every_s` seconds and at the end (never,
    with `every_s=None`: the caller prints `eta_s()` itself)."""

    def __init__(self, label: str, total: int, unit: str, every_s: float | None = 15.0):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.start = self.last_log = time.perf_counter()
        self.done = 0

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def pace(self) -> str:
        """The rate as a reader wants it: `2.1 steps/s`, or for slow loops `23.4 s/step`."""
        rate = self.rate()
        if rate >= 0.5:
            return f"{rate:.1f} {self.unit}/s"
        return f"{1 / max(rate, 1e-9):.1f} s/{self.unit.removesuffix('s')}"

    def eta_s(self) -> float:
        return (self.total - self.done) / max(self.rate(), 1e-9)

    def advance(self, count: int, detail: str = "") -> None:
        self.done += count
        now = time.perf_counter()
        if self.every_s is not None and (now - self.last_log > self.every_s or self.done >= self.total):
            log.info("%s: %d/%d %s%s | %s | ETA %.0f s", self.label, self.done, self.total, self.unit,
                     f" | {detail}" if detail else "", self.pace(), self.eta_s())
            self.last_log = now
