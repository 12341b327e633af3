"""`rlhf ilql`: Implicit Language Q-Learning (learner/ilql.py) of `model.path` on scored replies (`ilql.path`: the
rollouts a job kept with `train.keep_rollouts=true`, or any prompt/response/reward data), offline: no sampling
and no reward calls while it trains. Every row is checked before a model loads. Prints the held-out losses per
epoch, then the held-out gold reward and KL of the starting policy and of the result (sampled as the paper
decodes: logits + beta (Q - V), top-k), and saves the result to `ilql.output_dir`: with linear heads an HF
directory that `model.path` takes (the heads folded into its LM head), with MLP heads the model and its heads."""

from __future__ import annotations

import dataclasses
import logging
import statistics
from functools import partial

from cluster.commands import config_arguments, load, staged_output

HELP = "offline RL (ILQL) on the scored replies in ilql.path, saved to ilql.output_dir"

log = logging.getLogger(__name__)

# a perturbed policy whose sampled tokens had this much probability on average has stopped sampling
DEGENERATE_TOP_PROB = 0.95


def add_arguments(parser) -> None:
    config_arguments(parser)


def run(args) -> None:
    with staged_output(load(args), "ilql") as cfg:
        ilql(cfg)


def ilql(cfg) -> dict:
    from transformers import AutoTokenizer

    from cluster.models import resolve_model
    from cluster.pipeline import held_out_gold, stage_run, train_policy
    from core.preferences import split_pairs
    from core.rollout_records import RolloutDataError, load_scored, tokenizer_id
    from learner.ilql import ILQLTrainer, encode_scored

    ic = cfg.ilql
    if not ic.path:
        raise RolloutDataError("ilql.path is empty: give scored replies, the rollouts folder of a job run with "
                               "train.keep_rollouts=true (<train.output_dir>/rollouts) or a data file with prompt, "
                               "response and reward columns")
    model_path = resolve_model(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    replies, skipped = load_scored(ic.path, (ic.prompt_column, ic.response_column, ic.reward_column),
                                   tokenizer_id(tokenizer), ic.on_bad_row, "ilql.on_bad_row")
    examples = encode_scored(replies, tokenizer, ic.max_length, ic.path, ic.on_bad_row)
    if skipped or len(examples) < len(replies):
        log.warning("ilql: %d of %d rows skipped (ilql.on_bad_row=skip)", len(replies) + len(skipped) - len(examples),
                    len(replies) + len(skipped))
    train, held = split_pairs(examples, ic.eval_fraction, ic.seed, "ilql.eval_fraction")
    rewards = [r for *_, r in examples]
    print(f"ilql: {len(train)} scored replies, {len(held)} held out, from {ic.path}; the data's mean reward "
          f"{statistics.mean(rewards):+.3f}", flush=True)

    before = held_out_gold(cfg, model_path, "base")
    print(f"held-out gold reward ({cfg.train.gold_scorer}) before ILQL: {before['eval/gold_reward_mean']:+.3f}")
    with stage_run(cfg, "ilql") as (logger, results):
        trainer, history = train_policy(cfg, "ilql", partial(ILQLTrainer, model_path, ic), train, held, logger)
        for h in history:
            print(f"epoch {h['epoch']}: held-out loss {h['eval/loss']:.3f} (Q {h['eval/loss_q']:.3f}, V "
                  f"{h['eval/loss_v']:.3f}, CQL {h['eval/loss_cql']:.3f}, LM {h['eval/loss_lm']:.3f}), advantage "
                  f"{h['eval/advantage_mean']:+.3f}")
        path = trainer.save(ic.output_dir)
        results.update({"data_reward_mean": statistics.mean(rewards),
                        "gold_reward_before": before["eval/gold_reward_mean"], **history[-1]})
        for beta in dict.fromkeys([ic.beta, *ic.eval_betas]):
            at = path if beta == ic.beta or ic.heads != "linear" else trainer.save_folded(f"{path}/beta-{beta:g}",
                                                                                           beta)
            after = judge_ilql(cfg, trainer, at, model_path, beta)
            print(f"after ILQL at beta {beta:g} (top-k {ic.top_k}, {ic.heads} heads): held-out gold "
                  f"{after['eval/gold_reward_mean']:+.3f}, KL to the starting policy {after['eval/kl_mean']:.2f}, "
                  f"distinct tokens {after['eval/distinct_frac']:.1%}" + (f" ({at})" if at != path else ""),
                  flush=True)
            if after["eval/top_prob_mean"] > DEGENERATE_TOP_PROB:
                print(f"warning: decoding at beta {beta:g} is degenerate: the sampled tokens had "
                      f"{after['eval/top_prob_mean']:.1%} probability on average; lower ilql.beta")
            figures = {f"beta-{beta:g}/{k.removeprefix('eval/')}": v for k, v in after.items()}
            logger.log(trainer.steps, figures)
            results.update(figures)
    use = f"model.path={path}" if ic.heads == "linear" else "its heads decoded in the learner (ilql.heads=mlp)"
    print(f"ILQL policy at beta {ic.beta:g} saved to {path} ({use})")
    return results


def judge_ilql(cfg, trainer, path: str, base_path: str, beta: float) -> dict[str, float]:
    """The held-out evaluation of the ILQL policy at `beta`: `train.eval_samples` samples of each held-out prompt at
    `train.eval_temperature` with top-k `ilql.top_k` (linear heads: vLLM workers on the model folded at `beta`, `path`;
    MLP heads: decoded here), judged by the gold scorer; the KL to the starting policy (the sum over each reply of
    log pi - log pi_start, both over the whole vocabulary at the evaluation's temperature); how peaked the
    perturbed policy was where it sampled (`eval/top_prob_mean`) and the share of distinct tokens."""
    from cluster.pipeline import held_out_judged, policy_prompts
    from core.forward import load_causal_lm, token_logprobs
    from core.progress import Progress
    from learner.evaluation import held_out_figures
    from learner.ilql import decode, perturbed_logprobs
    from reward_server.scorers import make_scorer, score_checked

    ic, temperature = cfg.ilql, cfg.train.eval_temperature
    if ic.heads == "linear":
        judged = held_out_judged(dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation,
                                                                                          top_k=ic.top_k)),
                                 path, "ilql")
        rows = [(r.prompt_ids, r.response_ids) for r in judged.rollouts]
        figures = judged.figures()
    else:
        _, _, held_out = policy_prompts(cfg)
        prompts = [p for p in held_out for _ in range(cfg.train.eval_samples)]
        tok = trainer.tokenizer
        replies, progress = [], Progress(f"ilql samples at beta {beta:g}", len(prompts), "responses")
        for start in range(0, len(prompts), 16):
            replies += decode(trainer.model, trainer.heads, [p.token_ids for p in prompts[start:start + 16]],
                              beta=beta, top_k=ic.top_k, temperature=temperature,
                              max_new_tokens=cfg.generation.max_new_tokens, eos_ids={tok.eos_token_id},
                              pad_id=trainer.pad_id)
            progress.advance(len(prompts[start:start + 16]))
        texts = [tok.decode(r, skip_special_tokens=True) for r in replies]
        gold = score_checked(make_scorer(cfg.train.gold_scorer), [p.text for p in prompts], texts)
        rows = [(p.token_ids, r) for p, r in zip(prompts, replies)]
        figures = held_out_figures(gold, [len(r) for r in replies],
                                   [bool(r) and r[-1] == tok.eos_token_id for r in replies])
    logprobs, top = perturbed_logprobs(trainer.model, trainer.heads, rows, beta=beta, temperature=temperature,
                                       pad_id=trainer.pad_id, autocast_dtype=ic.autocast)
    base = load_causal_lm(base_path, ic.dtype, ic.device)
    base_logprobs = token_logprobs(base, [p for p, _ in rows], [r for _, r in rows], pad_id=trainer.pad_id,
                                   temperature=temperature, autocast_dtype=ic.autocast)
    tokens = [t for _, r in rows for t in r]
    return {**figures,
            "eval/kl_mean": statistics.mean(sum(a) - sum(b) for a, b in zip(logprobs, base_logprobs)),
            "eval/top_prob_mean": statistics.mean(p for row in top for p in row),
            "eval/distinct_frac": len(set(tokens)) / max(len(tokens), 1)}
