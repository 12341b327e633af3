"""The `rlhf` command: `rlhf train --config FILE [section.field=value ...]`, `rlhf prepare-model`, `rlhf config`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from actors.prompts import PromptDataError
from cluster.config import ConfigError, describe, load_config

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf", description="RLHF with PPO on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a PPO job")
    train.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run file (default: %(default)s)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.lr=1e-5 train.steps=10")
    prep = sub.add_parser("prepare-model", help="convert the embedded model(s) into HF directories now")
    prep.add_argument("names", nargs="*", default=["smollm2-135m-instruct"])
    show = sub.add_parser("config", help="print every config field with its default and help, or a run's config")
    show.add_argument("--config", default=None)
    show.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    try:
        if args.command == "train":
            from learner.train import train as run_training

            run_training(load_config(args.config, args.overrides))
        elif args.command == "prepare-model":
            from cluster.models import EMBEDDED_PREFIX, resolve_model

            for name in args.names:
                print(resolve_model(EMBEDDED_PREFIX + name))
        elif args.config or args.overrides:
            import yaml

            print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False))
        else:
            print(describe())
    except (ConfigError, PromptDataError) as exc:
        print(f"rlhf: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
