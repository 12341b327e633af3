"""`rlhf config`: every config field with its default and help, or (given a file or overrides) a run's whole
config as YAML, checked as a PPO job checks it."""

from __future__ import annotations

from cluster.commands import DEFAULT_CONFIG
from core.config import describe, load_config

HELP = "every config field with its default and help, or a run's checked config"


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="YAML run file to print, checked, with its overrides")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.lr=1e-5")


def run(args) -> None:
    if not (args.config or args.overrides):
        print(describe(DEFAULT_CONFIG))
        return
    import yaml

    cfg = load_config(args.config, args.overrides)
    cfg.check_ppo_job()
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
