"""`rlhf serve-reward`: the reward server on its own, as a user starts it, answering over HTTP with the same
rewards and refusals as inside a job, and stopping cleanly on SIGTERM (what `kill` and process managers
send) with exit status 0."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from cluster.cli import main
from cluster.commands import DEFAULT_CONFIG
from learner.distributed import free_port
from reward_server.scorers import VaderScorer

TINY = DEFAULT_CONFIG.parent / "tiny.yaml"
ROOT = Path(__file__).resolve().parents[1]


def test_serve_reward_refuses_to_listen_beyond_loopback_without_a_token(capsys):
    assert main(["serve-reward", "--config", str(TINY), "reward.host=0.0.0.0"]) == 2
    assert "set reward.auth_token" in capsys.readouterr().err


def _lines(proc) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait_for(lines: queue.Queue, text: str, timeout: float) -> list[str]:
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"no {text!r} in the output:\n{''.join(seen[-40:])}")


@pytest.mark.ray
def test_serve_reward_answers_over_http_and_stops_on_sigterm():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve-reward", "--config", str(TINY), f"reward.port={port}",
         "train.ray_num_cpus=2", "reward.max_items=4"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = _lines(proc)
    try:
        ready = _wait_for(lines, "reward server (vader) ready", timeout=180)[-1]
        url = f"http://127.0.0.1:{port}/reward/score"
        assert url in ready
        responses = ["What a lovely surprise!", "That is awful."]
        reply = httpx.post(url, json=[{"prompt": "My train was late.", "response": r} for r in responses], timeout=30)
        assert reply.status_code == 200
        assert reply.json()["rewards"] == pytest.approx(VaderScorer().score(["", ""], responses))
        assert httpx.get(f"http://127.0.0.1:{port}/reward/health", timeout=30).json()["scorer"] == "vader"
        too_many = [{"prompt": "p", "response": "r"}] * 5
        assert httpx.post(url, json=too_many, timeout=30).status_code == 413  # the same limits as in a job
        assert httpx.post(url, content=b"not json", timeout=30).status_code == 422

        proc.send_signal(signal.SIGTERM)
        _wait_for(lines, "stopping the reward server", timeout=60)
        assert proc.wait(timeout=120) == 0
        with pytest.raises(httpx.TransportError):
            httpx.post(url, json=too_many[:1], timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
