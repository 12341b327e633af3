"""The `rlhf` command: PPO training, the reward server on its own, the reward-modeling jobs, control of a
running job, model preparation and the config reference.

    rlhf train [--config FILE] [section.field=value ...]     PPO job
    rlhf serve-reward [--address A] ...                      the reward server alone, over HTTP
    rlhf make-preferences --out FILE ...                     gold-labelled preference pairs from the policy
    rlhf train-rm ...                                        Bradley-Terry reward model on preferences.path
    rlhf west-of-n ...                                       West-of-N self-training rounds
    rlhf best-of-n --n 16 [--prompt TEXT ...] ...            Best-of-N sampling under reward.scorer
    rlhf rm-report ...                                       the reward-modeling comparison table
    rlhf chaos [--fault STEP:KIND[:S] ...] [--simulate] ...  the job under a fault schedule, with a report
    rlhf scale --workers N [--namespace NS] [--address A]   add or remove generation workers of a running job
    rlhf status [--namespace NS] [--address A]               a running job's workers, version and counters
    rlhf prepare-model [NAME ...]                            convert the embedded model(s) now
    rlhf config [--config FILE] [...]                        every field with its help, or a run's config
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from core.config import ConfigError, describe, load_config
from core.errors import CannotPlace, InputError, JobHung
from core.specs import EMBEDDED_PREFIX, check_model

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"

# Exit status of a job that stopped because some of its roles stopped answering (cluster/job.py).
EXIT_HUNG = 3


@contextmanager
def staged_output(cfg, section: str):
    """`cfg` with `<section>.output_dir` local: where it is a storage URI, the command writes into a local
    staging directory uploaded when it ends (core/storage.py); `rm.output_dir`, which West-of-N starts
    from, is downloaded first where it is a URI."""
    from core import storage
    from core.config import replace_section

    target = getattr(cfg, section).output_dir
    if section == "west_of_n" and storage.is_uri(cfg.rm.output_dir):
        with storage.fetched(cfg.rm.output_dir, tuple(storage.Location(cfg.rm.output_dir).names())) as base:
            with staged_output(replace_section(cfg, "rm", output_dir=str(base)), section) as staged_cfg:
                yield staged_cfg
        return
    if not storage.is_uri(target):
        yield cfg
        return
    storage.check_writable(target, f"{section}.output_dir")
    with storage.staged(target) as local:
        yield replace_section(cfg, section, output_dir=str(local))
    print(f"uploaded {section}.output_dir to {target}")


def train(args) -> None:
    cfg = load_config(args.config, args.overrides)
    cfg.check_ppo_job()
    from cluster.job import train

    train(cfg)


def serve_reward(args) -> None:
    cfg = load_config(args.config, args.overrides)
    from cluster.serve_reward import serve_reward

    serve_reward(cfg, args.address)


def make_preferences(args) -> None:
    cfg = load_config(args.config, args.overrides)
    from cluster.reward_modeling import make_preferences

    make_preferences(cfg, args.out)


def make_demos(args) -> None:
    cfg = load_config(args.config, args.overrides)
    from cluster.pipeline import make_demos

    make_demos(cfg, args.out)


def sft(args) -> None:
    cfg = load_config(args.config, args.overrides)
    from cluster.pipeline import sft_command

    with staged_output(cfg, "sft") as staged:
        sft_command(staged)


def dpo(args) -> None:
    cfg = load_config(args.config, args.overrides)
    from cluster.pipeline import dpo_command

    with staged_output(cfg, "dpo") as staged:
        dpo_command(staged)


def elo(args) -> None:
    cfg = load_config(args.config, args.overrides)
    from cluster.pipeline import elo_command

    with staged_output(cfg, "elo") as staged:
        elo_command(staged, args.run, args.player)


def online_rlhf(args) -> None:
    cfg = load_config(args.config, args.overrides)
    cfg.check_ppo_job()
    from cluster.online_rlhf import online_rlhf_command

    with staged_output(cfg, "online") as staged:
        online_rlhf_command(staged)


def train_rm(args) -> None:
    cfg = load_config(args.config, args.overrides)
    from cluster.reward_modeling import train_rm_command

    with staged_output(cfg, "rm") as staged:
        train_rm_command(staged)


def west_of_n(args) -> None:
    cfg = load_config(args.config, args.overrides)
    from cluster.reward_modeling import west_of_n_command

    with staged_output(cfg, "west_of_n") as staged:
        west_of_n_command(staged)


def best_of_n(args) -> None:
    cfg = load_config(args.config, args.overrides)
    from cluster.reward_modeling import best_of_n_command

    best_of_n_command(cfg, args.n, args.prompt)


def rm_report(args) -> None:
    cfg = load_config(args.config, args.overrides)
    from cluster.rm_report import report

    report(cfg, args.pairs, args.eval_pairs, args.out)


def chaos(args) -> None:
    cfg = load_config(args.config, args.overrides)
    cfg.check_ppo_job()
    from cluster.chaos import chaos

    chaos(cfg, args.fault, args.simulate)


def scale(args) -> None:
    import ray

    from cluster.control import find_control

    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    ray.get(find_control(args.address, args.namespace).scale.remote(args.workers))
    print(f"asked the job in namespace {args.namespace!r} for {args.workers} generation workers; it applies "
          f"the change within a second or two (new workers load the current weights first)")


def status(args) -> None:
    import ray

    from cluster.control import find_control

    print(json.dumps(ray.get(find_control(args.address, args.namespace).get_status.remote()), indent=1))


def prepare_model(args) -> None:
    from cluster.models import EMBEDDED_PREFIX, resolve_model

    for name in args.names:
        print(resolve_model(EMBEDDED_PREFIX + name))


def plan(args) -> None:
    from cluster.models import resolve_model
    from cluster.plan import report

    # as overrides, so that the run config's own checks apply (LoRA on one rank, minibatch per rank)
    flags = ([f"ppo.lora_rank={args.lora_rank}"] if args.lora_rank is not None else []) + \
            ([f"ppo.num_learners={args.learners}"] if args.learners is not None else [])
    cfg = load_config(args.config, [*args.overrides, *flags])
    cfg.check_ppo_job()
    if args.model.startswith(EMBEDDED_PREFIX):
        check_model(args.model, "--model")
        model = resolve_model(args.model)
    elif (Path(args.model) / "config.json").is_file():
        model = args.model
    else:
        raise ConfigError(f"--model {args.model!r} holds no config.json (the model's shape is read from it); give an "
                          f"HF model directory, one of cluster/configs/shapes/, or embedded:<name>")
    print(report(model, cfg, cfg.ppo.num_learners, args.device_gib))


def config(args) -> None:
    if args.config or args.overrides:
        import yaml

        cfg = load_config(args.config, args.overrides)
        cfg.check_ppo_job()
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    else:
        print(describe(DEFAULT_CONFIG))


def parser() -> argparse.ArgumentParser:
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run file (default: %(default)s)")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.lr=1e-5 train.steps=10")
    job = argparse.ArgumentParser(add_help=False)
    job.add_argument("--namespace", default="rlhf", help="the job's train.ray_namespace (%(default)s)")
    job.add_argument("--address", default="", help="Ray cluster address (default: RAY_ADDRESS or the local one)")
    top = argparse.ArgumentParser(prog="rlhf", description="RLHF with PPO on Ray")
    sub = top.add_subparsers(dest="command", required=True)

    sub.add_parser("train", parents=[run], help="run a PPO job").set_defaults(func=train)
    serve = sub.add_parser("serve-reward", parents=[run], help="run the reward server alone, over HTTP, until "
                           "Ctrl-C or SIGTERM")
    serve.add_argument("--address", default="", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    serve.set_defaults(func=serve_reward)
    make = sub.add_parser("make-preferences", parents=[run],
                          help="sample two responses per prompt, label them with preferences.labeller")
    make.add_argument("--out", default="runs/preferences/pairs.jsonl", help="JSONL file to write (%(default)s)")
    make.set_defaults(func=make_preferences)
    demos = sub.add_parser("make-demos", parents=[run], help="demonstrations for SFT: the gold-best of "
                           "sft.demo_samples samples per training prompt (rejection sampling)")
    demos.add_argument("--out", default="runs/sft/demos.jsonl", help="JSONL file to write (%(default)s)")
    demos.set_defaults(func=make_demos)
    sub.add_parser("sft", parents=[run], help="supervised fine-tuning of model.path on the demonstrations in "
                   "sft.path; saves to sft.output_dir").set_defaults(func=sft)
    sub.add_parser("dpo", parents=[run], help="DPO of model.path on the preference pairs in preferences.path; "
                   "saves to dpo.output_dir and compares held-out gold reward").set_defaults(func=dpo)
    rate = sub.add_parser("elo", parents=[run], help="rate policies (a run's checkpoints, the base) against each "
                          "other on held-out prompts, judged by elo.judge")
    rate.add_argument("--run", action="append", default=[], help="a run's output_dir: every checkpoint is a player "
                      "(repeatable)")
    rate.add_argument("--player", action="append", default=[], help="NAME=DIR: an HF model directory (repeatable)")
    rate.set_defaults(func=elo)
    sub.add_parser("online-rlhf", parents=[run], help="iterated online RLHF: PPO rounds, each followed by fresh "
                   "labelled pairs of the current policy and a retrained reward model").set_defaults(func=online_rlhf)
    sub.add_parser("train-rm", parents=[run], help="train a Bradley-Terry reward model on preferences.path"
                   ).set_defaults(func=train_rm)
    sub.add_parser("west-of-n", parents=[run], help="West-of-N self-training from the reward model in rm.output_dir"
                   ).set_defaults(func=west_of_n)
    bon = sub.add_parser("best-of-n", parents=[run], help="best of N samples under reward.scorer")
    bon.add_argument("--n", type=int, default=16, help="samples per prompt (%(default)s)")
    bon.add_argument("--prompt", action="append", default=[], help="a request (repeatable); default: held-out prompts")
    bon.set_defaults(func=best_of_n)
    report = sub.add_parser("rm-report", parents=[run], help="reward-model accuracy and Best-of-N table (one run)")
    report.add_argument("--pairs", type=int, default=256, help="D, the base reward model's pairs (%(default)s)")
    report.add_argument("--eval-pairs", type=int, default=256, help="held-out gold-labelled pairs (%(default)s)")
    report.add_argument("--out", default="runs/rm_report", help="where models and results go (%(default)s)")
    report.set_defaults(func=rm_report)
    ch = sub.add_parser("chaos", parents=[run], help="run the job under a fault schedule (killed workers, nodes, the "
                        "learner; hung workers, a stopped reward server) and report what each fault cost")
    ch.add_argument("--fault", action="append", default=[], help="STEP:KIND[:SECONDS], repeatable (default: "
                    "2:kill-worker 4:hang-worker:20 6:stop-reward:15 8:kill-learner 10:kill-node)")
    ch.add_argument("--simulate", action="store_true", help="on a simulated cluster of seven nodes on this machine "
                    "(cluster/simulated.py) instead of RAY_ADDRESS's")
    ch.set_defaults(func=chaos)
    sc = sub.add_parser("scale", parents=[job], help="add or remove generation workers of a running job")
    sc.add_argument("--workers", type=int, required=True, help="generation workers the job should have")
    sc.set_defaults(func=scale)
    sub.add_parser("status", parents=[job], help="a running job's workers, policy version and counters"
                   ).set_defaults(func=status)
    prep = sub.add_parser("prepare-model", help="convert the embedded model(s) into HF directories now")
    prep.add_argument("names", nargs="*", default=["smollm2-135m-instruct"])
    prep.set_defaults(func=prepare_model)
    pl = sub.add_parser("plan", parents=[run], help="memory per role for a model and the run config, and the "
                        "smallest learner group that fits a device (reads only the model's config.json)")
    pl.add_argument("--model", required=True, help="HF model directory (only config.json is read), or embedded:<name>")
    pl.add_argument("--learners", type=int, default=None, help="learner ranks (default: ppo.num_learners)")
    pl.add_argument("--lora-rank", type=int, default=None, help="LoRA adapters of this rank (default: ppo.lora_rank)")
    pl.add_argument("--device-gib", type=float, nargs="*", default=[24, 80],
                    help="device memory sizes to find the smallest learner group for (%(default)s)")
    pl.set_defaults(func=plan)
    show = sub.add_parser("config", help="print every config field with its default and help, or a run's config")
    show.add_argument("--config", default=None)
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=config)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.func(args)
    except InputError as exc:
        print(f"rlhf: {exc}", file=sys.stderr)
        return 2
    except JobHung as exc:
        print(f"rlhf: {exc}", file=sys.stderr)
        return EXIT_HUNG
    except CannotPlace as exc:
        print(f"rlhf: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
