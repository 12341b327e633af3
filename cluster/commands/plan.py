"""`rlhf plan`: memory per role for a model and the run config, and the smallest learner group that fits a
device; reads only the model's config.json (cluster/plan.py)."""

from __future__ import annotations

from pathlib import Path

from cluster.commands import config_arguments, load
from core.config import ConfigError
from core.specs import EMBEDDED_PREFIX, check_model

HELP = "memory per role for a model and the run config, and the smallest learner group that fits"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory (only config.json is read), "
                        "one of cluster/configs/shapes/, or embedded:<name>")
    parser.add_argument("--learners", type=int, default=None, help="learner ranks (default: ppo.num_learners)")
    parser.add_argument("--lora-rank", type=int, default=None, help="LoRA adapters of this rank (default: "
                        "ppo.lora_rank)")
    parser.add_argument("--device-gib", type=float, nargs="*", default=[24, 80],
                        help="device memory sizes to find the smallest learner group for (%(default)s)")
    config_arguments(parser)


def run(args) -> None:
    # as overrides, so that the run config's own checks apply (LoRA on one rank, minibatch per rank)
    if args.lora_rank is not None:
        args.overrides.append(f"ppo.lora_rank={args.lora_rank}")
    if args.learners is not None:
        args.overrides.append(f"ppo.num_learners={args.learners}")
    cfg = load(args)
    cfg.check_ppo_job()
    if args.model.startswith(EMBEDDED_PREFIX):
        check_model(args.model, "--model")
    elif not (Path(args.model) / "config.json").is_file():
        raise ConfigError(f"--model {args.model!r} holds no config.json (the model's shape is read from it); give an "
                          f"HF model directory, one of cluster/configs/shapes/, or embedded:<name>")
    from cluster.models import resolve_model
    from cluster.plan import report

    model = resolve_model(args.model, "--model") if args.model.startswith(EMBEDDED_PREFIX) else args.model
    print(report(model, cfg, cfg.ppo.num_learners, args.device_gib))
