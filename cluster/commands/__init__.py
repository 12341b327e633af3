"""The `rlhf` subcommands, one module each. A command module has `HELP` (the one line `rlhf --help` shows),
`add_arguments(parser)` and `run(args)`; `cluster/cli.py` builds the parser and the usage text from
`COMMANDS`. Command modules import only the standard library and `core` at their top, so that `rlhf --help`
and a refused config answer in a fraction of a second; what a command runs is imported inside `run`.

One rule for where settings go: everything a run needs is a config field (`--config FILE` and dotted
`section.field=value` overrides), outputs in `<section>.output_dir`, counts as fields; flags are left for
what a command reads that a config does not hold (`elo --run`, `plan --model`, `chaos --fault`).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

from core.config import RunConfig, load_config

DEFAULT_CONFIG = Path(__file__).parent.parent / "configs" / "default.yaml"

# In the order `rlhf --help` lists them: the PPO job, the pipeline around it, running jobs, tools.
COMMANDS = ["train", "chaos", "serve-reward", "make-demos", "sft", "make-preferences", "train-rm", "west-of-n",
            "best-of-n", "rm-report", "dpo", "ilql", "online-rlhf", "elo", "scale", "status", "plan", "config",
            "prepare-model"]


def config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` and the dotted overrides that every command taking a run config accepts."""
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run file (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.lr=1e-5 train.steps=10")


def ray_arguments(parser: argparse.ArgumentParser) -> None:
    """`--address` and `--namespace`, which default to the config's train.ray_address and train.ray_namespace."""
    parser.add_argument("--address", default=None, help="Ray cluster address (default: train.ray_address, else "
                        "RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--namespace", default=None, help="the job's Ray namespace (default: train.ray_namespace)")


def deprecated(parser: argparse.ArgumentParser, flag: str, field: str, **kwargs) -> None:
    """A flag kept from an earlier release, hidden from the help; `load` turns it into `field=value`."""
    parser.add_argument(flag, dest=f"deprecated:{field}", default=None, help=argparse.SUPPRESS, **kwargs)


def deprecated_out(parser: argparse.ArgumentParser) -> None:
    """The `--out FILE` of earlier releases, hidden from the help: the command still writes FILE."""
    parser.add_argument("--out", dest="out_file", default=None, help=argparse.SUPPRESS)


def write_file_output(args: argparse.Namespace, section: str, name: str, write) -> None:
    """`write(cfg, path)` with `path` the file `name` in `<section>.output_dir` (staged where it is a storage
    URI), or the file of the deprecated `--out FILE`."""
    cfg = load(args)
    if args.out_file:
        warn_deprecated("--out", f"write {section}.output_dir=DIR instead ({name} is written there)")
        write(cfg, args.out_file)
        return
    with staged_output(cfg, section) as staged:
        write(staged, str(Path(getattr(staged, section).output_dir) / name))


def warn_deprecated(flag: str, instead: str) -> None:
    print(f"rlhf: {flag} is deprecated and will be removed; {instead}", file=sys.stderr)


def load(args: argparse.Namespace) -> RunConfig:
    """The run config of `--config` and the overrides, deprecated flags applied as the fields they became
    (with a line that says so) and `--address`/`--namespace` written into train.ray_address/ray_namespace."""
    extra = []
    for key, value in vars(args).items():
        if key.startswith("deprecated:") and value is not None:
            field = key.removeprefix("deprecated:")
            warn_deprecated("--" + field.split(".")[-1].replace("_", "-"), f"write {field}={value} instead")
            extra.append(f"{field}={value}")
    for flag, field in (("address", "train.ray_address"), ("namespace", "train.ray_namespace")):
        if getattr(args, flag, None) is not None:
            extra.append(f"{field}={getattr(args, flag)}")
    return load_config(args.config, [*args.overrides, *extra])


@contextmanager
def staged_output(cfg: RunConfig, section: str):
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
