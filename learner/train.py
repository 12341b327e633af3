"""The PPO training loop: generate -> score -> reference log-probs -> advantages -> update -> broadcast.

Generation, scoring and reference log-probs stream through `RolloutStream` (actors/buffer.py); the
loop below takes batches from it, runs the learner's update and broadcasts the new weights. With
`train.max_staleness` >= 1 the workers keep generating while the learner trains.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import ray

from actors.buffer import RolloutStream
from actors.prompts import Prompt, load_prompts
from cluster.launch import Roles, launch_roles, shutdown_roles, start_ray
from cluster.models import resolve_model
from learner.metrics import MemoryWatch, RunLogger
from reward_server.scorers import make_scorer, score_checked

log = logging.getLogger(__name__)


def train(cfg) -> dict:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    memory = MemoryWatch()
    model_path = resolve_model(cfg.model.path)
    train_prompts, eval_prompts = load_prompts(cfg.data, AutoTokenizer.from_pretrained(model_path))
    log.info("%d training prompts, %d held-out prompts from %s", len(train_prompts), len(eval_prompts),
             cfg.data.path)
    start_ray(cfg.train)
    roles = launch_roles(cfg, model_path)
    try:
        return _run(cfg, roles, train_prompts, eval_prompts, started, memory)
    finally:
        shutdown_roles(roles)
        memory.stop()


def _run(cfg, roles: Roles, train_prompts: list[Prompt], eval_prompts: list[Prompt], started: float,
         memory: MemoryWatch) -> dict:
    gold = make_scorer(cfg.train.gold_scorer)
    logger = RunLogger(cfg.train.output_dir, cfg.to_dict(), cfg.train.wandb_mode, cfg.train.wandb_project,
                       cfg.train.steps)
    stream = RolloutStream(roles.workers, roles.reference, roles.reward, train_prompts,
                           samples_per_prompt=cfg.generation.samples_per_prompt,
                           prompts_per_request=cfg.generation.prompts_per_request,
                           buffer_size=cfg.train.buffer_size, max_staleness=cfg.train.max_staleness,
                           seed=cfg.data.seed)
    before = evaluate(roles, eval_prompts, gold, cfg)
    logger.log(0, before)
    print(f"before training: held-out gold reward {before['eval/gold_reward_mean']:+.3f}, proxy reward "
          f"({cfg.reward.scorer}) {before['eval/proxy_reward_mean']:+.3f}, KL {before['eval/kl_mean']:.2f}", flush=True)
    batch_size = cfg.train.prompts_per_step * cfg.generation.samples_per_prompt
    overlap = cfg.train.max_staleness > 0
    after, samples, total_tokens = before, 0, 0
    train_start = time.perf_counter()
    for step in range(1, cfg.train.steps + 1):
        step_start = time.perf_counter()
        t = time.perf_counter()
        rollouts = stream.take(batch_size)
        wait_batch = time.perf_counter() - t

        t = time.perf_counter()
        stream.updating = True
        metrics = stream.wait(roles.learner.update.remote(rollouts))
        stream.updating = False
        stream.learner_version = metrics["version/learner"]
        update = time.perf_counter() - t

        # Published once into the object store; every worker loads the same object.
        weight_sync = stream.broadcast(stream.learner_version, roles.learner.weights.remote(), block=not overlap)

        lags = [stream.learner_version - 1 - r.version for r in rollouts]
        tokens = sum(len(r.response_ids) for r in rollouts)
        samples, total_tokens = samples + len(rollouts), total_tokens + tokens
        metrics.update(stream.stats())
        metrics.update({
            "version/lag_mean": statistics.mean(lags), "version/lag_max": max(lags),
            "timing/wait_batch": wait_batch, "timing/update": update, "timing/weight_sync": weight_sync,
            "timing/step": time.perf_counter() - step_start,
            "throughput/tokens_per_s": tokens / (time.perf_counter() - step_start),
        })
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            after = evaluate(roles, eval_prompts, gold, cfg)
            metrics.update(after)
        if step % cfg.train.sample_table_every == 0 or step == cfg.train.steps:
            logger.table("samples", ["step", "version", "response", "reward"],
                         [[step, r.version, r.text, r.score] for r in rollouts[:8]])
        logger.log(step, metrics)
        logger.progress(step, metrics)

    checkpoint = ray.get(roles.learner.save.remote(str(Path(cfg.train.output_dir) / "checkpoint")))
    elapsed = time.perf_counter() - train_start
    summary = {
        "steps": cfg.train.steps, "policy_version": stream.learner_version,
        "eval/gold_reward_before": before["eval/gold_reward_mean"],
        "eval/gold_reward_after": after["eval/gold_reward_mean"],
        "eval/gold_reward_gain": after["eval/gold_reward_mean"] - before["eval/gold_reward_mean"],
        "eval/proxy_reward_before": before["eval/proxy_reward_mean"],
        "eval/proxy_reward_after": after["eval/proxy_reward_mean"],
        "eval/kl_after": after["eval/kl_mean"],
        "samples_per_s": samples / elapsed, "tokens_per_s": total_tokens / elapsed,
        "train_minutes": elapsed / 60, "peak_memory_gib": memory.peak_gib(), "total_minutes": (time.perf_counter() - started) / 60,
        **{k: v for k, v in stream.stats().items() if not k.startswith("timing/")},
        "checkpoint": checkpoint,
    }
    logger.close(summary)
    print_summary(summary)
    return summary


def evaluate(roles: Roles, prompts: list[Prompt], gold, cfg) -> dict:
    """Held-out prompts sampled by the current policy, judged by the gold scorer and by the reward server
    (the proxy PPO optimises: a proxy that rises while gold falls is reward over-optimisation). KL is the
    sum over response tokens of log pi - log pi_ref (the policy's log-probs as vLLM sampled them)."""
    n = len(roles.workers)
    shards = [prompts[i::n] for i in range(n)]
    refs = [w.generate.remote([(p.index, p.token_ids) for p in shard], cfg.train.eval_samples,
                              cfg.train.eval_temperature)
            for w, shard in zip(roles.workers, shards) if shard]
    rollouts = [r for chunk in ray.get(refs) for r in chunk]
    rollouts = ray.get(roles.reference.ref_logprobs.remote(rollouts))
    texts = {p.index: p.text for p in prompts}
    prompt_texts, responses = [texts[r.prompt_index] for r in rollouts], [r.text for r in rollouts]
    proxy = roles.reward.score.remote(prompt_texts, responses)
    scores = score_checked(gold, prompt_texts, responses)
    kls = [sum(a - b for a, b in zip(r.logprobs, r.ref_logprobs)) for r in rollouts]
    return {"eval/gold_reward_mean": statistics.mean(scores),
            "eval/gold_reward_std": statistics.pstdev(scores),
            "eval/proxy_reward_mean": statistics.mean(proxy.result()),
            "eval/kl_mean": statistics.mean(kls),
            "eval/response_len": statistics.mean(len(r.response_ids) for r in rollouts),
            "eval/policy_version": min(r.version for r in rollouts)}


def print_summary(summary: dict) -> None:
    print("\n=== summary ===")
    for key, value in summary.items():
        print(f"{key:32s} {value:.4f}" if isinstance(value, float) else f"{key:32s} {value}")
