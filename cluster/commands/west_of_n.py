"""`rlhf west-of-n`: West-of-N self-training (Pace et al. 2024), starting from the reward model in
`rm.output_dir`. Each round the policy samples `west_of_n.n` replies to unlabelled prompts, the current reward
model's best and worst make a synthetic pair (filtered by confidence and likelihood), and a reward model is
trained on the original pairs plus the synthetic ones; each round's pairs and model go to
`west_of_n.output_dir`."""

from __future__ import annotations

import logging
from pathlib import Path

from cluster.commands import config_arguments, load, staged_output

HELP = "West-of-N self-training of the reward model in rm.output_dir"

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    config_arguments(parser)


def run(args) -> None:
    with staged_output(load(args), "west_of_n") as cfg:
        west_of_n(cfg)


def west_of_n(cfg) -> list[dict]:
    from actors.worker_pool import sample
    from cluster.pipeline import (
        cycle,
        generation_workers,
        load_pair_sets,
        policy_prompts,
        score_groups,
        train_reward_model,
        west_of_n_candidates,
    )
    from core.preferences import PreferenceDataError, write_preferences
    from reward_server.scorers import RewardModelScorer
    from reward_server.west_of_n import select_pairs

    wn = cfg.west_of_n
    train_pairs, eval_pairs = load_pair_sets(cfg.preferences)
    reward_model = cfg.rm.output_dir
    if not (Path(reward_model) / "config.json").exists():
        raise PreferenceDataError(f"rm.output_dir = {reward_model} holds no reward model; train the base one first "
                                  f"with `rlhf train-rm` (same config)")
    model_path, train_prompts, _ = policy_prompts(cfg)
    scorer = RewardModelScorer(reward_model, device=cfg.rm.device)
    results = []
    for round_ in range(1, wn.rounds + 1):
        out = Path(wn.output_dir) / f"round-{round_}"
        prompts = cycle(train_prompts, wn.num_prompts, cfg.preferences.seed + round_)
        with generation_workers(cfg, model_path) as pool:
            groups = sample(pool, prompts, wn.n, label=f"West-of-{wn.n} samples")
        candidates = west_of_n_candidates(prompts, groups, score_groups(scorer, prompts, groups))
        synthetic, stats = select_pairs(candidates, wn.quantile, wn.min_logprob)
        write_preferences(out / "pairs.jsonl", synthetic)
        log.info("West-of-N round %d: %s", round_, stats)
        reward_model = str(out / "model")
        # this round's model labels the next round's samples
        scorer, history = train_reward_model(cfg, train_pairs + synthetic, eval_pairs, reward_model)
        results.append({"round": round_, "model": reward_model, **stats, **history[-1]})
        print(f"round {round_}: {stats['west_of_n/pairs']} synthetic pairs + {len(train_pairs)} original -> "
              f"{reward_model}, held-out pair accuracy {history[-1]['eval/accuracy']:.3f}")
    return results
