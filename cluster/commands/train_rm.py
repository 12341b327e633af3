"""`rlhf train-rm`: a Bradley-Terry reward model on `preferences.path` (`rm.base` under a scalar head), its
held-out pair accuracy per epoch, saved to `rm.output_dir` for `reward.scorer=model:<dir>`."""

from __future__ import annotations

from cluster.commands import config_arguments, load, staged_output

HELP = "a Bradley-Terry reward model on preferences.path, saved to rm.output_dir"


def add_arguments(parser) -> None:
    config_arguments(parser)


def run(args) -> None:
    with staged_output(load(args), "rm") as cfg:
        train_rm(cfg)


def train_rm(cfg) -> dict:
    from cluster.pipeline import load_pair_sets, train_reward_model

    train_pairs, eval_pairs = load_pair_sets(cfg.preferences)
    path = cfg.rm.output_dir
    _, history = train_reward_model(cfg, train_pairs, eval_pairs, path)
    print(f"\nreward model saved to {path} (serve it with reward.scorer=model:{path})")
    for h in history:
        print(f"epoch {h['epoch']}: train loss {h['train/loss']:.3f}, held-out loss {h['eval/loss']:.3f}, "
              f"held-out pair accuracy {h['eval/accuracy']:.3f}")
    return history[-1]
