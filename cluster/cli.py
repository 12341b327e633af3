"""The `rlhf` command: PPO training, the reward-modeling jobs, model preparation and the config reference.

    rlhf train [--config FILE] [section.field=value ...]     PPO job
    rlhf make-preferences --out FILE ...                     gold-labelled preference pairs from the policy
    rlhf train-rm ...                                        Bradley-Terry reward model on preferences.path
    rlhf west-of-n ...                                       West-of-N self-training rounds
    rlhf best-of-n --n 16 [--prompt TEXT ...] ...            Best-of-N sampling under reward.scorer
    rlhf rm-report ...                                       the reward-modeling comparison table
    rlhf scale --workers N [--namespace NS] [--address A]   add or remove generation workers of a running job
    rlhf status [--namespace NS] [--address A]               a running job's workers, version and counters
    rlhf prepare-model [NAME ...]                            convert the embedded model(s) now
    rlhf config [--config FILE] [...]                        every field with its help, or a run's config
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from actors.prompts import PromptDataError
from cluster.config import ConfigError, describe, load_config
from reward_server.preferences import PreferenceDataError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def parser() -> argparse.ArgumentParser:
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run file (default: %(default)s)")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.lr=1e-5 train.steps=10")
    top = argparse.ArgumentParser(prog="rlhf", description="RLHF with PPO on Ray")
    sub = top.add_subparsers(dest="command", required=True)
    sub.add_parser("train", parents=[run], help="run a PPO job")
    make = sub.add_parser("make-preferences", parents=[run],
                          help="sample two responses per prompt, label them with preferences.labeller")
    make.add_argument("--out", default="runs/preferences/pairs.jsonl", help="JSONL file to write (%(default)s)")
    sub.add_parser("train-rm", parents=[run], help="train a Bradley-Terry reward model on preferences.path")
    sub.add_parser("west-of-n", parents=[run], help="West-of-N self-training from the reward model in rm.output_dir")
    bon = sub.add_parser("best-of-n", parents=[run], help="best of N samples under reward.scorer")
    bon.add_argument("--n", type=int, default=16, help="samples per prompt (%(default)s)")
    bon.add_argument("--prompt", action="append", default=[], help="a request (repeatable); default: held-out prompts")
    report = sub.add_parser("rm-report", parents=[run], help="reward-model accuracy and Best-of-N table (one run)")
    report.add_argument("--pairs", type=int, default=256, help="D, the base reward model's pairs (%(default)s)")
    report.add_argument("--eval-pairs", type=int, default=256, help="held-out gold-labelled pairs (%(default)s)")
    report.add_argument("--out", default="runs/rm_report", help="where models and results go (%(default)s)")
    job = argparse.ArgumentParser(add_help=False)
    job.add_argument("--namespace", default="rlhf", help="the job's train.ray_namespace (%(default)s)")
    job.add_argument("--address", default="", help="Ray cluster address (default: RAY_ADDRESS or the local one)")
    scale = sub.add_parser("scale", parents=[job], help="add or remove generation workers of a running job")
    scale.add_argument("--workers", type=int, required=True, help="generation workers the job should have")
    sub.add_parser("status", parents=[job], help="a running job's workers, policy version and counters")
    prep = sub.add_parser("prepare-model", help="convert the embedded model(s) into HF directories now")
    prep.add_argument("names", nargs="*", default=["smollm2-135m-instruct"])
    show = sub.add_parser("config", help="print every config field with its default and help, or a run's config")
    show.add_argument("--config", default=None)
    show.add_argument("overrides", nargs="*")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        run(args)
    except (ConfigError, PromptDataError, PreferenceDataError) as exc:
        print(f"rlhf: {exc}", file=sys.stderr)
        return 2
    return 0


def run(args) -> None:
    if args.command == "prepare-model":
        from cluster.models import EMBEDDED_PREFIX, resolve_model

        for name in args.names:
            print(resolve_model(EMBEDDED_PREFIX + name))
        return
    if args.command in ("scale", "status"):
        import json

        from cluster.control import find_control

        control = find_control(args.address, args.namespace)
        import ray

        if args.command == "scale":
            if args.workers < 1:
                raise ConfigError(f"--workers must be at least 1, got {args.workers}")
            ray.get(control.scale.remote(args.workers))
            print(f"asked the job in namespace {args.namespace!r} for {args.workers} generation workers; it applies "
                  f"the change within a second or two (new workers load the current weights first)")
        else:
            print(json.dumps(ray.get(control.get_status.remote()), indent=1))
        return
    if args.command == "config":
        if args.config or args.overrides:
            import yaml

            print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False))
        else:
            print(describe())
        return
    cfg = load_config(args.config, args.overrides)
    if args.command == "train":
        from learner.train import train

        train(cfg)
        return
    from cluster import reward_modeling as rm

    if args.command == "make-preferences":
        rm.make_preferences(cfg, args.out)
    elif args.command == "train-rm":
        rm.train_rm_command(cfg)
    elif args.command == "west-of-n":
        rm.west_of_n_command(cfg)
    elif args.command == "best-of-n":
        rm.best_of_n_command(cfg, args.n, args.prompt)
    elif args.command == "rm-report":
        from cluster.rm_report import report

        report(cfg, args.pairs, args.eval_pairs, args.out)


if __name__ == "__main__":
    sys.exit(main())
