"""The rest of the RLHF recipe around PPO: demonstrations, supervised fine-tuning, DPO and ratings of
policies. Entry points of `rlhf make-demos`, `rlhf sft`, `rlhf dpo` and `rlhf elo`.

`make-demos` is rejection-sampling fine-tuning's data step: the generation workers sample
`sft.demo_samples` replies to each training prompt, the gold scorer (`train.gold_scorer`) judges them and
the best reply becomes the prompt's demonstration. `sft` trains the policy on demonstrations in the job's
own process (submit it with `ray job submit --entrypoint-num-gpus 1 ...` for a GPU) and writes an HF
directory that `model.path` takes. `dpo` trains the policy on the preference pairs `train-rm` reads, with
the reference log-probs computed first by the reference model, and judges the base and the result with
the gold scorer on the held-out prompts.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from cluster.models import resolve_model
from cluster.reward_modeling import cycle, generation_workers, pick_best, policy_prompts, score_groups
from core.config import ConfigError
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


def held_out_gold(cfg, model_path: str, label: str) -> dict[str, float]:
    """The gold scorer's mean on `train.eval_samples` samples per held-out prompt from the policy at
    `model_path`, at `train.eval_temperature` (as a PPO job's evaluation samples)."""
    from actors.worker_pool import sample

    _, _, held_out = policy_prompts(cfg)
    with generation_workers(cfg, model_path) as pool:
        groups = sample(pool, held_out, cfg.train.eval_samples, cfg.train.eval_temperature, label=f"{label} samples")
    scores = [s for group in score_groups(make_scorer(cfg.train.gold_scorer), held_out, groups) for s in group]
    return {"gold_reward_mean": statistics.mean(scores),
            "response_len": statistics.mean(len(r.response_ids) for g in groups for r in g)}


def dpo_command(cfg) -> dict:
    """`rlhf dpo`: DPO of `model.path` on `preferences.path`, saved to `dpo.output_dir`; held-out pair figures
    per epoch, and the held-out gold reward of the base and of the result."""
    from actors.reference import ReferenceModel
    from cluster.reward_modeling import load_pair_sets
    from core.config import ReferenceConfig
    from learner.dpo import DPOTrainer, encode_pairs, with_reference

    dc, pc = cfg.dpo, cfg.preferences
    train_pairs, eval_pairs = load_pair_sets(pc)
    model_path = resolve_model(cfg.model.path)
    trainer = DPOTrainer(model_path, dc)
    encoded = [encode_pairs(pairs, trainer.tokenizer, dc.max_length, source, pc.on_bad_row)
               for pairs, source in [(train_pairs, pc.path), (eval_pairs, pc.eval_path or pc.path)]]
    reference = ReferenceModel(model_path, ReferenceConfig(device=dc.device, threads=dc.threads), dtype=dc.dtype,
                               autocast=dc.autocast)
    train, held = (with_reference(pairs, reference) for pairs in encoded)
    del reference
    log.info("dpo: %d pairs, %d held out, beta %g -> %s", len(train), len(held), dc.beta, dc.output_dir)
    history = trainer.train(train, held)
    path = trainer.save(dc.output_dir)
    del trainer
    for h in history:
        print(f"epoch {h['epoch']}: held-out loss {h['eval/loss']:.3f}, implicit-reward accuracy "
              f"{h['eval/accuracy']:.3f}, margin {h['eval/margin']:+.3f}")
    before, after = held_out_gold(cfg, model_path, "base"), held_out_gold(cfg, path, "dpo")
    print(f"held-out gold reward ({cfg.train.gold_scorer}): {before['gold_reward_mean']:+.3f} before, "
          f"{after['gold_reward_mean']:+.3f} after DPO\nDPO policy saved to {path} (use it with model.path={path})")
    return {**history[-1], "gold_reward_before": before["gold_reward_mean"],
            "gold_reward_after": after["gold_reward_mean"]}


def sft_command(cfg) -> list[dict]:
    """`rlhf sft`: fine-tune `model.path` on `sft.path`; print the held-out loss per epoch, then the held-out
    gold reward of the base and of the result."""
    model_path = resolve_model(cfg.model.path)
    path, history = run_sft(model_path, cfg.sft)
    for h in history:
        trained = f"train loss {h['train/loss']:.3f}, " if "train/loss" in h else ""
        print(f"epoch {h['epoch']}: {trained}held-out loss {h['eval/loss']:.3f} (perplexity "
              f"{h['eval/perplexity']:.2f})")
    before, after = held_out_gold(cfg, model_path, "base"), held_out_gold(cfg, path, "sft")
    print(f"held-out gold reward ({cfg.train.gold_scorer}): {before['gold_reward_mean']:+.3f} before, "
          f"{after['gold_reward_mean']:+.3f} after SFT")
    print(f"\nfine-tuned policy saved to {path} (train from it with model.path={path})")
    return history


def elo_players(cfg, runs: list[str], named: list[str]) -> list[tuple[str, int, str, str]]:
    """(name, training step, model directory, series) of each policy to rate: the base (`model.path`, step 0),
    every complete checkpoint of each run directory, then each NAME=DIR given."""
    from cluster.checkpoint import complete_checkpoints
    from core import storage

    players = [("base", 0, resolve_model(cfg.model.path), "base")]
    for run in runs:
        if storage.is_uri(run):
            raise ConfigError(f"--run {run}: rate runs on a local or mounted path (the players are loaded by vLLM "
                              f"from a directory); copy the run's checkpoints/ down first")
        found = complete_checkpoints(run)
        if not found:
            raise ConfigError(f"{run} holds no complete checkpoint (checkpoints/step-*/ with meta.json); rate a run "
                              f"that saved some (train.checkpoint_every), or name model directories with --player")
        for path in found:
            step = json.loads((Path(path) / "meta.json").read_text())["step"]
            players.append((f"{Path(run).name}@{step}", step, str(Path(path) / "policy"), Path(run).name))
    for spec in named:
        name, sep, path = spec.partition("=")
        if not sep or not name or not (Path(path) / "config.json").is_file():
            raise ConfigError(f"--player {spec!r} must be NAME=DIR with an HF model directory (config.json) at DIR")
        players.append((name, 0, path, name))
    return players


def elo_command(cfg, runs: list[str], named: list[str]) -> dict:
    """`rlhf elo`: each policy answers `elo.num_prompts` held-out prompts (one sample each, at
    `train.eval_temperature`); every two play a match on every prompt, decided by `elo.judge`; prints the
    ratings with 95% intervals and the win-rate matrix; writes ratings.json and ratings.png (rating against
    training step) to `elo.output_dir`."""
    from actors.worker_pool import sample
    from reward_server.ratings import Ladder, make_judge

    ec = cfg.elo
    players = elo_players(cfg, runs, named)
    if len(players) < 2:
        raise ConfigError("rlhf elo needs at least one policy besides the base: give --run DIR or --player NAME=DIR")
    _, _, held_out = policy_prompts(cfg)
    prompts = cycle(held_out, ec.num_prompts, ec.seed)
    ladder = Ladder(make_judge(ec.judge, cfg.train.gold_scorer, cfg.reward.scorer), [p.text for p in prompts])
    for name, step, path, series in players:
        with generation_workers(cfg, path) as pool:
            groups = sample(pool, prompts, 1, cfg.train.eval_temperature, label=f"{name} responses")
        ladder.add(name, step, [g[0].text for g in groups], series)
    printed, result = ladder.write(ec.output_dir, ec.bootstrap, ec.seed)
    print(f"\n{result['matches']} matches on {len(prompts)} held-out prompts, judged by {result['judge']}\n")
    print(printed)
    print(f"\nratings in {ec.output_dir}/ratings.json, plot in {ec.output_dir}/ratings.png")
    return result
