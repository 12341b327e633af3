"""Iterated online RLHF (Bai et al. 2022, sec. 4.5; `rlhf online-rlhf`): the reward model is kept fresh with
comparisons of the current policy's own samples.

Each round: PPO runs `online.ppo_steps` more steps against the current reward model (one PPO job that
continues from its last checkpoint, so the policy, its optimizer and its data position carry over); the
policy it leaves samples two replies to each of `online.pairs_per_round` training prompts; the labeller
(`preferences.labeller`, the stand-in for people) labels them; the reward model is trained again, from
its base, on every pair so far. A held-out share of each round's pairs measures how well the reward
model that PPO just optimised against judges the policy it produced, before and after it sees them.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from cluster.commands import config_arguments, load, staged_output
from core.config import replace_section
from core.preferences import PreferencePair, split_pairs, write_preferences

HELP = "iterated online RLHF: PPO rounds, each followed by fresh pairs and a retrained reward model"

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    config_arguments(parser)


def run(args) -> None:
    cfg = load(args)
    cfg.check_ppo_job()
    with staged_output(cfg, "online") as staged:
        online_rlhf(staged)


def pair_accuracy(scorer, pairs: list[PreferencePair]) -> float:
    """The share of pairs whose chosen reply the scorer scores above the rejected one."""
    from reward_server.scorers import score_checked

    prompts = [p.prompt for p in pairs]
    chosen = score_checked(scorer, prompts, [p.chosen for p in pairs])
    rejected = score_checked(scorer, prompts, [p.rejected for p in pairs])
    return statistics.mean(float(c > r) for c, r in zip(chosen, rejected))


def _policy_pairs(cfg, model_path: str, count: int, seed: int, label: str):
    """`count` pairs of two samples of the policy at `model_path`, labelled by `preferences.labeller`, split
    into (train, held-out) by `online.eval_fraction`."""
    from cluster.pipeline import generation_workers, gold_pairs, policy_prompts
    from reward_server.scorers import make_scorer

    pc = cfg.preferences
    _, prompts, _ = policy_prompts(cfg)
    with generation_workers(cfg, model_path) as pool:
        pairs, _ = gold_pairs(pool, prompts, count, make_scorer(pc.labeller), pc.flip_fraction, pc.min_margin, seed,
                              label=label)
    return split_pairs(pairs, cfg.online.eval_fraction, seed, "online.eval_fraction")


def online_rlhf(cfg) -> list[dict]:
    """`online.rounds` rounds; per round the PPO figures, the reward model's accuracy on the current policy's
    pairs and the proxy against the gold reward, in `online.output_dir/rounds.json`."""
    from cluster.job import train
    from cluster.pipeline import load_pair_sets, policy_prompts, train_reward_model
    from reward_server.scorers import RewardModelScorer

    oc, out = cfg.online, Path(cfg.online.output_dir)
    model_path = policy_prompts(cfg)[0]
    if cfg.preferences.path:
        train_pairs, held_out = load_pair_sets(cfg.preferences)
    else:
        train_pairs, held_out = _policy_pairs(cfg, model_path, oc.initial_pairs, cfg.preferences.seed,
                                              "initial preference pairs")
    write_preferences(out / "pairs-0.jsonl", train_pairs)
    reward_model = str(out / "rm-0")
    train_reward_model(cfg, train_pairs, held_out, reward_model)
    ppo_out = str(out / "ppo")
    results = []
    for round_ in range(1, oc.rounds + 1):
        ppo = replace_section(cfg, "train", output_dir=ppo_out, steps=round_ * oc.ppo_steps, resume="auto",
                              checkpoint_every=min(cfg.train.checkpoint_every, oc.ppo_steps))
        summary = train(replace_section(ppo, "reward", scorer=f"model:{reward_model}"))
        policy = str(Path(ppo_out) / "checkpoint")
        new_train, new_held_out = _policy_pairs(cfg, policy, oc.pairs_per_round, cfg.preferences.seed + round_,
                                                f"round {round_} preference pairs")
        write_preferences(out / f"pairs-{round_}.jsonl", new_train + new_held_out)
        stale = pair_accuracy(RewardModelScorer(reward_model, device=cfg.rm.device), new_held_out)
        train_pairs += new_train
        reward_model = str(out / f"rm-{round_}")
        history = train_reward_model(cfg, train_pairs, new_held_out, reward_model)[1]
        results.append({
            "round": round_, "ppo_steps": summary["steps"], "pairs": len(train_pairs),
            "gold_reward": summary["eval/gold_reward_after"], "proxy_reward": summary["eval/proxy_reward_after"],
            "kl": summary["eval/kl_after"],
            "rm_accuracy_on_policy_pairs_before": stale,
            "rm_accuracy_on_policy_pairs_after": history[-1]["eval/accuracy"],
        })
        r = results[-1]
        print(f"round {round_}: after {r['ppo_steps']} PPO steps held-out gold {r['gold_reward']:+.3f}, proxy "
              f"{r['proxy_reward']:+.3f}; the reward model PPO used judges the new policy's pairs at "
              f"{stale:.3f} accuracy, retrained on {r['pairs']} pairs: {r['rm_accuracy_on_policy_pairs_after']:.3f}",
              flush=True)
        (out / "rounds.json").write_text(json.dumps(results, indent=1))
    return results
