"""`rlhf chaos`: the PPO job under a fault schedule, with a report of what each fault cost (cluster/chaos.py)."""

from __future__ import annotations

from cluster.commands import config_arguments, load

HELP = "a PPO job under a fault schedule (killed workers, nodes, the learner), and what each fault cost"


def add_arguments(parser) -> None:
    config_arguments(parser)
    parser.add_argument("--fault", action="append", default=[], help="STEP:KIND[:SECONDS], repeatable (default: "
                        "2:kill-worker 4:hang-worker:20 6:stop-reward:15 8:kill-learner 10:kill-node)")
    parser.add_argument("--simulate", action="store_true", help="on a simulated cluster of seven nodes on this "
                        "machine (cluster/simulated.py) instead of RAY_ADDRESS's")


def run(args) -> None:
    cfg = load(args)
    cfg.check_ppo_job()
    from cluster.chaos import chaos

    chaos(cfg, args.fault, args.simulate)
