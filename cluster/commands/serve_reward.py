"""`rlhf serve-reward`: the reward server on its own, for another trainer or an evaluation script to call
over HTTP (or through a Serve handle on the same Ray cluster).

Same scorer specs, security defaults and limits as inside a training job: it listens on loopback unless
`reward.host` says otherwise, and then only with `reward.auth_token`. It runs on a local Ray it starts,
or joins a cluster (`--address`, train.ray_address or RAY_ADDRESS), and stops cleanly on Ctrl-C or SIGTERM: the app is
deleted, and a Ray it started is shut down.
"""

from __future__ import annotations

import os
import signal
import threading

from cluster.commands import config_arguments, load, ray_arguments
from core.config import RunConfig

HELP = "the reward server alone, over HTTP, until Ctrl-C or SIGTERM"

# Not the training job's app name, so that a server started this way and a job's own reward server can
# share a cluster (each needs its own reward.route_prefix and port then).
APP_NAME = "reward-server"


def add_arguments(parser) -> None:
    ray_arguments(parser)
    config_arguments(parser)


def run(args) -> None:
    serve_reward(load(args))


def serve_reward(cfg: RunConfig) -> None:
    """Serve `reward.scorer` until Ctrl-C or SIGTERM."""
    import ray
    from ray import serve

    from cluster.launch import start_ray
    from reward_server.server import reward_url, start_reward_server

    stop, previous = threading.Event(), {}
    joined = bool(cfg.train.ray_address or os.environ.get("RAY_ADDRESS"))
    try:
        start_ray(cfg.train)
        # After Ray's start, which sets handlers of its own for these signals.
        previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        start_reward_server(cfg.reward, name=APP_NAME)
        url = reward_url(cfg.reward)
        auth = " (Authorization: Bearer <reward.auth_token>)" if cfg.reward.auth_token else ""
        print(f"reward server ({cfg.reward.scorer}) ready: POST a JSON list of {{\"prompt\", \"response\"}} objects "
              f"to {url}{auth}; health at {url.rsplit('/', 1)[0]}/health. Ctrl-C or SIGTERM stops it.", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping the reward server", flush=True)
    finally:
        if ray.is_initialized():
            if joined:
                serve.delete(APP_NAME)
            else:
                serve.shutdown()
            ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
