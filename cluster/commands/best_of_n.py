"""`rlhf best-of-n`: the best of `best_of_n.n` samples under `reward.scorer` for the given requests (or the
held-out prompts); on the held-out prompts also the gold reward of Best-of-N against one sample."""

from __future__ import annotations

from cluster.commands import config_arguments, deprecated, load

HELP = "the best of best_of_n.n samples per prompt under reward.scorer"


def add_arguments(parser) -> None:
    config_arguments(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a request (repeatable); default: the "
                        "held-out prompts")
    deprecated(parser, "--n", "best_of_n.n")


def run(args) -> None:
    best_of_n(load(args), args.prompt)


def best_of_n(cfg, texts: list[str]) -> dict:
    import statistics

    from actors.worker_pool import sample
    from cluster.pipeline import (
        generation_workers,
        keep_scored,
        pick_best,
        policy_prompts,
        reward_server,
        score_groups,
        scored_rows,
    )
    from reward_server.scorers import make_scorer, score_checked

    n = cfg.best_of_n.n
    model_path, _, held_out = policy_prompts(cfg)
    if texts:
        from transformers import AutoTokenizer

        from core.prompts import encode

        prompts = encode(texts, AutoTokenizer.from_pretrained(model_path), cfg.data.max_prompt_tokens,
                         cfg.data.system_prompt, "--prompt")
    else:
        prompts = held_out
    with generation_workers(cfg, model_path) as pool, reward_server(cfg.reward) as reward:
        groups = sample(pool, prompts, n, label=f"Best-of-{n} samples")
        scores = score_groups(reward, prompts, groups)
    best = pick_best(scores, n)
    if cfg.best_of_n.keep_rollouts:
        keep_scored(cfg.best_of_n.output_dir, model_path,
                    scored_rows([p.text for p, g in zip(prompts, groups) for _ in g], [r for g in groups for r in g],
                                [x for s in scores for x in s]), "best_of_n.keep_rollouts")
    for p, g, s, b in zip(prompts[:10] if not texts else prompts, groups, scores, best):
        print(f"\n> {p.text}\n[{cfg.reward.scorer} {s[b]:+.3f}, best of {n}] {g[b].text.strip()}")
    if texts:
        return {}
    gold = make_scorer(cfg.train.gold_scorer)
    chosen = score_checked(gold, [p.text for p in prompts], [g[b].text for g, b in zip(groups, best)])
    first = score_checked(gold, [p.text for p in prompts], [g[0].text for g in groups])
    result = {"best_of_n/gold_reward": statistics.mean(chosen), "one_sample/gold_reward": statistics.mean(first)}
    print(f"\nheld-out prompts ({len(prompts)}): gold reward ({cfg.train.gold_scorer}) of best-of-{n} under "
          f"{cfg.reward.scorer}: {result['best_of_n/gold_reward']:+.3f}; of one sample: "
          f"{result['one_sample/gold_reward']:+.3f}")
    return result
