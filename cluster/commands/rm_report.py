"""`rlhf rm-report`: does West-of-N help our reward model, and how far does Best-of-N get?

One run, four reward models trained the same way, all judged by pair accuracy on held-out pairs (held-out
prompts, fresh samples, labelled by the gold scorer without flips, never seen in training):
  (a) base: D gold-labelled pairs (with `preferences.flip_fraction` of the labels flipped);
  (b) base + D West-of-N pairs, labelled by (a) and filtered (Pace et al. 2024);
  (c) base + D more gold-labelled pairs: what a second round of human labelling would buy;
  (d) base + D West-of-N pairs without the filters.
Then the held-out gold reward of Best-of-N (N = 1, 4, 16) when the best is picked by reward model (a), by
(b), and by the gold scorer itself (the ceiling). Everything is sampled from the initial policy.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

from cluster.commands import config_arguments, deprecated, load, staged_output

HELP = "does West-of-N help the reward model, and how far does Best-of-N get? (one run, one table)"

log = logging.getLogger(__name__)

BEST_OF = (1, 4, 16)


def add_arguments(parser) -> None:
    config_arguments(parser)
    deprecated(parser, "--pairs", "rm_report.pairs")
    deprecated(parser, "--eval-pairs", "rm_report.eval_pairs")
    deprecated(parser, "--out", "rm_report.output_dir")


def run(args) -> None:
    with staged_output(load(args), "rm_report") as cfg:
        report(cfg)


def report(cfg) -> dict:
    from actors.worker_pool import sample
    from cluster.pipeline import (
        cycle,
        generation_workers,
        gold_pairs,
        policy_prompts,
        reward_server,
        score_groups,
        train_reward_model,
        west_of_n_candidates,
    )
    from core.preferences import write_preferences
    from reward_server.scorers import make_scorer
    from reward_server.west_of_n import select_pairs

    start = time.perf_counter()
    pc, wn = cfg.preferences, cfg.west_of_n
    num_pairs, num_eval_pairs, out_dir = cfg.rm_report.pairs, cfg.rm_report.eval_pairs, Path(cfg.rm_report.output_dir)
    model_path, train_prompts, held_out = policy_prompts(cfg)
    gold = make_scorer(cfg.train.gold_scorer)
    won_prompts = cycle(train_prompts, max(wn.num_prompts, num_pairs), pc.seed + 1)
    with generation_workers(cfg, model_path) as pool:
        labelled, _ = gold_pairs(pool, train_prompts, 2 * num_pairs, gold, pc.flip_fraction, pc.min_margin,
                                 pc.seed, label="gold-labelled pairs")
        eval_pairs, _ = gold_pairs(pool, held_out, num_eval_pairs, gold, 0.0, pc.min_margin, pc.seed + 100,
                                   label="held-out pairs")
        won_groups = sample(pool, won_prompts, wn.n, label=f"West-of-{wn.n} samples")
        bon_groups = sample(pool, held_out, max(BEST_OF), label="Best-of-N samples")
    base, extra_gold = labelled[:num_pairs], labelled[num_pairs:]
    write_preferences(out_dir / "base_pairs.jsonl", base)
    write_preferences(out_dir / "heldout_pairs.jsonl", eval_pairs)

    models, accuracy, sizes = {}, {}, {}

    def fit(name: str, pairs):
        models[name] = str(out_dir / f"rm_{name}")
        trainer, history = train_reward_model(cfg, pairs, eval_pairs, models[name])
        accuracy[name], sizes[name] = history[-1]["eval/accuracy"], len(pairs)
        return trainer

    base_model = fit("a", base)
    candidates = west_of_n_candidates(won_prompts, won_groups, score_groups(base_model, won_prompts, won_groups))
    del base_model
    filtered, filtered_stats = select_pairs(candidates, wn.quantile, wn.min_logprob)
    unfiltered, _ = select_pairs(candidates, 0.0, -math.inf)
    if len(filtered) < num_pairs:
        log.warning("West-of-N kept %d pairs after its filters, fewer than D = %d; raise west_of_n.num_prompts",
                    len(filtered), num_pairs)
    write_preferences(out_dir / "west_of_n_pairs.jsonl", filtered[:num_pairs])
    fit("b", base + filtered[:num_pairs])
    fit("c", base + extra_gold)
    fit("d", base + unfiltered[:num_pairs])

    gold_scores = score_groups(gold, held_out, bon_groups)
    best_of = {"gold": bon_scores(gold_scores, gold_scores)}
    for name in ("a", "b"):
        with reward_server(replace(cfg.reward, scorer=f"model:{models[name]}")) as reward:
            best_of[name] = bon_scores(score_groups(reward, held_out, bon_groups), gold_scores)

    results = {"D": num_pairs, "held_out_pairs": len(eval_pairs), "train_pairs": sizes, "accuracy": accuracy,
               "west_of_n": filtered_stats, "best_of_n_gold_reward": best_of, "held_out_prompts": len(held_out),
               "minutes": (time.perf_counter() - start) / 60}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print_table(cfg, results)
    return results


def bon_scores(scores: list[list[float]], gold_scores: list[list[float]]) -> dict[int, float]:
    """Mean gold reward of the response that `scores` rank best among the first N samples, for each N."""
    from cluster.pipeline import pick_best

    return {n: statistics.mean(g[i] for g, i in zip(gold_scores, pick_best(scores, n))) for n in BEST_OF}


def print_table(cfg, r: dict) -> None:
    pc, wn = cfg.preferences, cfg.west_of_n
    acc, sizes, stats = r["accuracy"], r["train_pairs"], r["west_of_n"]
    d = r["D"]
    print(f"\n=== reward modeling report ({r['minutes']:.1f} min) ===")
    print(f"policy {cfg.model.path}, gold scorer {cfg.train.gold_scorer}, D = {d} pairs with "
          f"{pc.flip_fraction:.0%} of labels flipped; West-of-{wn.n} on {stats['west_of_n/prompts']} prompts, "
          f"confidence quantile {wn.quantile}, min mean log-prob {wn.min_logprob} "
          f"({stats['west_of_n/low_likelihood_responses']} responses below it) -> {stats['west_of_n/pairs']} pairs kept")
    print(f"\nheld-out pair accuracy ({r['held_out_pairs']} gold-labelled pairs on held-out prompts)")
    rows = [("a", "base: D gold pairs"), ("b", "base + D West-of-N pairs"), ("c", "base + D more gold pairs"),
            ("d", "base + D West-of-N pairs, no filters")]
    print(f"  {'reward model':42s} {'train pairs':>11s} {'accuracy':>9s}")
    for key, name in rows:
        print(f"  ({key}) {name:38s} {sizes[key]:11d} {acc[key]:9.3f}")
    bon = r["best_of_n_gold_reward"]
    print(f"\nBest-of-N on {r['held_out_prompts']} held-out prompts: mean gold reward of the pick")
    print(f"  {'N':>3s} {'by RM (a)':>10s} {'by RM (b)':>10s} {'by gold':>10s}")
    for n in BEST_OF:
        print(f"  {n:3d} {bon['a'][n]:+10.3f} {bon['b'][n]:+10.3f} {bon['gold'][n]:+10.3f}")
