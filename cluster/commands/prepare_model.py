"""`rlhf prepare-model`: convert the embedded model(s) into HF directories now rather than at a job's start."""

from __future__ import annotations

from core.specs import EMBEDDED_MODELS, EMBEDDED_PREFIX, check_model

HELP = "convert the embedded model(s) into HF directories now"


def add_arguments(parser) -> None:
    parser.add_argument("names", nargs="*", default=["smollm2-135m-instruct"],
                        help=f"embedded models: {', '.join(EMBEDDED_MODELS)} (default: %(default)s)")


def run(args) -> None:
    for name in args.names:
        check_model(EMBEDDED_PREFIX + name, "prepare-model")
    from cluster.models import resolve_model

    for name in args.names:
        print(resolve_model(EMBEDDED_PREFIX + name))
