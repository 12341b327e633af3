"""`rlhf status`: a running job's workers, policy version and counters, as JSON."""

from __future__ import annotations

import json

from cluster.commands import config_arguments, load, ray_arguments

HELP = "a running job's workers, policy version and counters"


def add_arguments(parser) -> None:
    ray_arguments(parser)
    config_arguments(parser)


def run(args) -> None:
    train = load(args).train
    import ray

    from cluster.control import find_control

    print(json.dumps(ray.get(find_control(train.ray_address, train.ray_namespace).get_status.remote()), indent=1))
