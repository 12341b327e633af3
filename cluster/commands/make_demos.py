"""`rlhf make-demos`: rejection-sampling fine-tuning's data step. The generation workers sample
`sft.demo_samples` replies to each of `sft.num_demos` training prompts, the gold scorer (`train.gold_scorer`)
judges them, and the best reply becomes the prompt's demonstration, written to `<sft.output_dir>/demos.jsonl`
(prompt/response rows with each demonstration's gold score and its group's mean), which `sft.path` takes."""

from __future__ import annotations

from pathlib import Path

from cluster.commands import config_arguments, deprecated_out, write_file_output

HELP = "demonstrations for SFT: the gold-best of sft.demo_samples samples per prompt"


def add_arguments(parser) -> None:
    config_arguments(parser)
    deprecated_out(parser)


def run(args) -> None:
    write_file_output(args, "sft", "demos.jsonl", make_demos)


def make_demos(cfg, out_path: str) -> str:
    """The gold-best of `sft.demo_samples` samples for `sft.num_demos` training prompts, written to `out_path`."""
    import json
    import statistics

    from actors.worker_pool import sample
    from cluster.pipeline import cycle, generation_workers, pick_best, policy_prompts, score_groups
    from reward_server.scorers import make_scorer

    sc = cfg.sft
    model_path, train, _ = policy_prompts(cfg)
    prompts = cycle(train, sc.num_demos, sc.seed)
    gold = make_scorer(cfg.train.gold_scorer)
    with generation_workers(cfg, model_path) as pool:
        groups = sample(pool, prompts, sc.demo_samples, label=f"best-of-{sc.demo_samples} demonstrations")
    scores = score_groups(gold, prompts, groups)
    best = pick_best(scores, sc.demo_samples)
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for prompt, group, group_scores, i in zip(prompts, groups, scores, best):
            f.write(json.dumps({"prompt": prompt.text, "response": group[i].text, "gold": group_scores[i],
                                "group_gold_mean": statistics.mean(group_scores)}, ensure_ascii=False) + "\n")
    chosen = statistics.mean(s[i] for s, i in zip(scores, best))
    sampled = statistics.mean(x for s in scores for x in s)
    print(f"wrote {len(prompts)} demonstrations to {out_path}: gold score {chosen:+.3f} (best of "
          f"{sc.demo_samples}) against {sampled:+.3f} for a single sample")
    return out_path
