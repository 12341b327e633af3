"""`rlhf train`: a PPO job (cluster/job.py) on the run config."""

from __future__ import annotations

from cluster.commands import config_arguments, load

HELP = "run a PPO job on the run config (the default demo without arguments)"


def add_arguments(parser) -> None:
    config_arguments(parser)


def run(args) -> None:
    cfg = load(args)
    cfg.check_ppo_job()
    from cluster.job import train

    train(cfg)
