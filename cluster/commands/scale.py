"""`rlhf scale`: add or remove generation workers of a running job, through its control actor."""

from __future__ import annotations

from cluster.commands import config_arguments, load, ray_arguments
from core.config import ConfigError

HELP = "add or remove generation workers of a running job"


def add_arguments(parser) -> None:
    parser.add_argument("--workers", type=int, required=True, help="generation workers the job should have")
    ray_arguments(parser)
    config_arguments(parser)


def run(args) -> None:
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    train = load(args).train
    import ray

    from cluster.control import find_control

    ray.get(find_control(train.ray_address, train.ray_namespace).scale.remote(args.workers))
    print(f"asked the job in namespace {train.ray_namespace!r} for {args.workers} generation workers; it applies "
          f"the change within a second or two (new workers load the current weights first)")
