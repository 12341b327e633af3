"""The `rlhf` command. Each subcommand is a module of cluster/commands/ (its help line, its arguments and
`run`); the parser and `rlhf --help` are built from `cluster.commands.COMMANDS`. Bad input (any `InputError`)
is one line on stderr and exit status 2, before Ray or a model starts."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cluster.commands import COMMANDS
from core.errors import CannotPlace, InputError, JobHung

# Exit status of a job that stopped because some of its roles stopped answering (cluster/job.py).
EXIT_HUNG = 3


def command_module(name: str):
    return importlib.import_module(f"cluster.commands.{name.replace('-', '_')}")


def parser() -> argparse.ArgumentParser:
    modules = {name: command_module(name) for name in COMMANDS}
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:{width}}  {module.HELP}" for name, module in modules.items())
    top = argparse.ArgumentParser(
        prog="rlhf", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="RLHF with PPO on Ray. The commands that run something take --config FILE and dotted overrides "
                    "(section.field=value); `rlhf config` lists every field.",
        epilog=f"commands:\n{listing}\n\n`rlhf COMMAND --help` shows a command's arguments.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in modules.items():
        command = sub.add_parser(name, description=(module.__doc__ or module.HELP).strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        command_module(args.command).run(args)
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
