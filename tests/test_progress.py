"""The progress line of long loops: its pace reads as units a second, or seconds a unit when slow, and its ETA."""

import logging

import pytest

from core.progress import Progress

pytestmark = pytest.mark.pure


def test_the_line_gives_the_pace_a_reader_wants_and_the_eta(monkeypatch, caplog):
    now = [100.0]
    monkeypatch.setattr("core.progress.time.perf_counter", lambda: now[0])
    fast, slow = Progress("eval", 100, "responses", every_s=0.0), Progress("ilql", 62, "steps", every_s=0.0)
    now[0] = 110.0
    with caplog.at_level(logging.INFO, logger="core.progress"):
        fast.advance(40)
        slow.advance(2)
    assert "eval: 40/100 responses | 4.0 responses/s | ETA 15 s" in caplog.text
    assert "ilql: 2/62 steps | 5.0 s/step | ETA 300 s" in caplog.text
