"""Metrics leave the job whatever happens: when W&B's background process dies (as under `ray job stop`,
whose SIGTERM reaches every process of the job), metrics.jsonl and the summary go on, with one warning
and no traceback at exit; the Ray gauges keep their last value between steps far apart."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from core.monitoring import HeldGauges

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parent.parent


def test_a_dead_wandb_process_leaves_the_metrics_whole_and_the_exit_quiet(tmp_path):
    script = textwrap.dedent(f"""
        import signal, time, psutil
        from learner.metrics import RunLogger
        run = RunLogger({str(tmp_path)!r}, {{"lr": 1e-5}}, "offline", total_steps=2)
        run.log(1, {{"reward": 0.1}})
        for child in psutil.Process().children(recursive=True):  # wandb-core and its helpers
            child.send_signal(signal.SIGTERM)
        time.sleep(2)
        run.log(2, {{"reward": 0.2}})
        run.close({{"steps": 2}})
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"WANDB_SILENT": "true", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "W&B stopped working" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 2}


class RecordingGauge:
    """Stands in for a ray.util.metrics.Gauge: what Ray was told, and when."""

    def __init__(self):
        self.sets = []

    def set(self, value):
        self.sets.append((time.monotonic(), value))


def test_gauges_are_set_again_until_closed_so_a_slow_step_does_not_leave_a_gap():
    held, gauge = HeldGauges(refresh_s=0.05), RecordingGauge()
    held.set("kl", gauge, 1.5)
    held.set("kl", gauge, 2.5)  # the newest value is the one held
    time.sleep(0.5)
    held.close()
    count = len(gauge.sets)
    time.sleep(0.2)
    assert len(gauge.sets) == count  # a closed job's gauges age out
    times = [t for t, _ in gauge.sets]
    assert count >= 6 and [v for _, v in gauge.sets[1:]] == [2.5] * (count - 1)
    assert max(b - a for a, b in zip(times, times[1:])) < 0.3
