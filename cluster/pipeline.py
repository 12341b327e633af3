"""The rest of the RLHF recipe around PPO: demonstrations and supervised fine-tuning. Entry points of
`rlhf make-demos` and `rlhf sft`.

`make-demos` is rejection-sampling fine-tuning's data step: the generation workers sample
`sft.demo_samples` replies to each training prompt, the gold scorer (`train.gold_scorer`) judges them and
the best reply becomes the prompt's demonstration. `sft` trains the policy on demonstrations in the job's
own process (submit it with `ray job submit --entrypoint-num-gpus 1 ...` for a GPU) and writes an HF
directory that `model.path` takes.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from cluster.models import resolve_model
from cluster.reward_modeling import cycle, generation_workers, pick_best, policy_prompts, score_groups
from learner.sft import run_sft
from reward_server.scorers import make_scorer

log = logging.getLogger(__name__)


def make_demos(cfg, out_path: str) -> str:
    """`rlhf make-demos`: the gold-best of `sft.demo_samples` samples for `sft.num_demos` training prompts,
    as prompt/response JSONL (with each demonstration's gold score and the mean gold score of its group)."""
    sc = cfg.sft
    model_path, train, _ = policy_prompts(cfg)
    prompts = cycle(train, sc.num_demos, sc.seed)
    gold = make_scorer(cfg.train.gold_scorer)
    from actors.worker_pool import sample

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


def sft_command(cfg) -> list[dict]:
    """`rlhf sft`: fine-tune `model.path` on `sft.path`; print the held-out loss per epoch."""
    path, history = run_sft(resolve_model(cfg.model.path), cfg.sft)
    for h in history:
        trained = f"train loss {h['train/loss']:.3f}, " if "train/loss" in h else ""
        print(f"epoch {h['epoch']}: {trained}held-out loss {h['eval/loss']:.3f} (perplexity "
              f"{h['eval/perplexity']:.2f})")
    print(f"\nfine-tuned policy saved to {path} (train from it with model.path={path})")
    return history
