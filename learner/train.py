"""The PPO training loop: generate -> score -> reference log-probs -> advantages -> update -> broadcast.

Generation, scoring and reference log-probs stream through `RolloutStream` (actors/buffer.py); the
loop below takes batches from it, runs the learner's update and broadcasts the new weights. With
`train.max_staleness` >= 1 the workers keep generating while the learner trains.

Around the loop: resumable checkpoints every `train.checkpoint_every` steps (cluster/checkpoint.py), a
graceful stop on SIGTERM (`ray job stop`) or Ctrl-C, and, if the learner's process dies, a fresh start of
the roles from the last checkpoint. Worker failures and membership changes are the stream's business.
"""

from __future__ import annotations

import logging
import signal
import statistics
import threading
import time
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from actors.buffer import RolloutStream
from actors.prompts import Prompt, load_prompts
from cluster import checkpoint
from cluster.checkpoint import resume_from
from cluster.control import start_control
from cluster.launch import Roles, launch_roles, launch_worker, shutdown_roles, start_ray
from cluster.models import resolve_model
from cluster.monitoring import JobMetrics
from learner.metrics import MemoryWatch, RunLogger
from reward_server.client import RewardClient
from reward_server.scorers import make_scorer, score_checked
from reward_server.server import APP_NAME

log = logging.getLogger(__name__)


class LearnerLost(RuntimeError):
    """The learner's process died; the job continues from the last checkpoint."""


class GracefulStop:
    """SIGTERM (`ray job stop`) or Ctrl-C: finish the step in progress, write a checkpoint, stop.
    A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"{self.requested} received: stopping after the step in progress, with a checkpoint", flush=True)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg) -> dict:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    memory = MemoryWatch()
    model_path = resolve_model(cfg.model.path)
    train_prompts, eval_prompts = load_prompts(cfg.data, AutoTokenizer.from_pretrained(model_path))
    log.info("%d training prompts, %d held-out prompts from %s", len(train_prompts), len(eval_prompts),
             cfg.data.path)
    resume = resume_from(cfg.train.resume, cfg.train.output_dir)
    start_ray(cfg.train)
    stop, metrics_out = GracefulStop(), JobMetrics(Path(cfg.train.output_dir).name)
    try:
        for attempt in range(cfg.train.max_learner_restarts + 1):
            roles, stream = launch_roles(cfg, model_path), None
            try:
                stream = make_stream(cfg, roles, model_path, train_prompts)
                return _run(cfg, roles, stream, eval_prompts, started, memory, metrics_out, resume, stop, attempt)
            except LearnerLost as exc:
                resume = checkpoint.resume_from("auto", cfg.train.output_dir)
                if attempt == cfg.train.max_learner_restarts:
                    raise RuntimeError(f"the learner died {attempt + 1} times (train.max_learner_restarts = "
                                       f"{cfg.train.max_learner_restarts}); last: {exc}") from exc
                log.warning("the learner died (%s); restarting the job's roles from %s", exc,
                            resume or "the initial policy")
            finally:
                if stream is not None:
                    roles.workers = list(stream.workers.values())
                    ray.kill(stream.control)
                shutdown_roles(roles)
    finally:
        stop.restore()
        memory.stop()
        metrics_out.close()


def make_stream(cfg, roles: Roles, model_path: str, train_prompts: list[Prompt]) -> RolloutStream:
    gen = cfg.generation
    stream = RolloutStream(roles.workers, roles.reference, RewardClient(cfg.reward, APP_NAME, roles.reward),
                           train_prompts, samples_per_prompt=gen.samples_per_prompt,
                           prompts_per_request=gen.prompts_per_request, buffer_size=cfg.train.buffer_size,
                           max_staleness=cfg.train.max_staleness, seed=cfg.data.seed,
                           spawn=lambda i: launch_worker(cfg, model_path, i))
    stream.control = start_control()
    if gen.autoscale_max_workers:
        stream.autoscale_bounds = (gen.autoscale_min_workers, gen.autoscale_max_workers)
    return stream


def _alive(actor) -> bool:
    try:
        ray.get(actor.get_version.remote(), timeout=30)
        return True
    except (RayActorError, ray.exceptions.GetTimeoutError):
        return False


def _run(cfg, roles: Roles, stream: RolloutStream, eval_prompts: list[Prompt], started: float,
         memory: MemoryWatch, metrics_out: JobMetrics, resume, stop: GracefulStop, restarts: int) -> dict:
    gold = make_scorer(cfg.train.gold_scorer)
    first_step, meta = 1, {}
    if resume is not None:
        meta = checkpoint.restore(resume, roles.learner, stream)
        first_step = meta["step"] + 1
        # every worker starts from the initial policy: give them the checkpoint's weights first
        stream.broadcast(stream.learner_version, roles.learner.weights.remote(), block=True)
    logger = RunLogger(cfg.train.output_dir, cfg.to_dict(), cfg.train.wandb_mode, cfg.train.wandb_project,
                       cfg.train.steps, resume_id=meta.get("wandb_id"), first_step=first_step)
    if resume is None:
        before = evaluate(roles, stream, eval_prompts, gold, cfg)
        logger.log(0, before)
        print(f"before training: held-out gold reward {before['eval/gold_reward_mean']:+.3f}, proxy reward "
              f"({cfg.reward.scorer}) {before['eval/proxy_reward_mean']:+.3f}, KL {before['eval/kl_mean']:.2f}",
              flush=True)
    else:
        before = meta["before"]
        print(f"resumed from {resume} (step {meta['step']}, policy version {stream.learner_version})", flush=True)
    batch_size = cfg.train.prompts_per_step * cfg.generation.samples_per_prompt
    overlap = cfg.train.max_staleness > 0
    after, samples, total_tokens, step = meta.get("after", before), 0, 0, first_step - 1
    train_start = time.perf_counter()

    def save_checkpoint(step: int) -> Path:
        path = checkpoint.save(roles.learner, stream, step, cfg.train.output_dir, cfg.train.keep_checkpoints,
                               {"before": before, "after": after, "wandb_id": logger.run_id})
        logger.checkpoint(path, step)
        return path

    for step in range(first_step, cfg.train.steps + 1):
        try:
            metrics, rollouts = _step(cfg, roles, stream, overlap, batch_size)
        except RayActorError as exc:
            if _alive(roles.learner):
                raise
            logger.abandon()
            raise LearnerLost(f"{type(exc).__name__} at step {step}") from exc
        tokens = sum(len(r.response_ids) for r in rollouts)
        samples, total_tokens = samples + len(rollouts), total_tokens + tokens
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            after = evaluate(roles, stream, eval_prompts, gold, cfg)
            metrics.update(after)
        if step % cfg.train.sample_table_every == 0 or step == cfg.train.steps:
            logger.table("samples", ["step", "version", "response", "reward"],
                         [[step, r.version, r.text, r.score] for r in rollouts[:8]])
        logger.log(step, metrics, jsonl_only={"batch/prompt_indices": [r.prompt_index for r in rollouts]})
        metrics_out.record(metrics)
        logger.progress(step, metrics)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or stop.requested:
            try:
                save_checkpoint(step)
            except RayActorError as exc:
                logger.abandon()
                raise LearnerLost(f"{type(exc).__name__} while writing the checkpoint of step {step}") from exc
        if stop.requested:
            break
    return _finish(cfg, roles, stream, logger, memory, stop, step, before, after, samples, total_tokens,
                   started, train_start, restarts)


def _step(cfg, roles: Roles, stream: RolloutStream, overlap: bool, batch_size: int) -> tuple[dict, list]:
    """Take a batch, update the learner on it, broadcast the new weights; the step's metrics."""
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

    # Published once into the object store; every worker loads the same object. The learner answering
    # the next call means the weights are there (its calls run in order): no worker is sent a lost object.
    weights = roles.learner.weights.remote()
    ray.get(roles.learner.get_version.remote())
    weight_sync = stream.broadcast(stream.learner_version, weights, block=not overlap)

    lags = [stream.learner_version - 1 - r.version for r in rollouts]
    tokens = sum(len(r.response_ids) for r in rollouts)
    metrics.update(stream.stats())
    metrics.update(stream.reward.counters)
    metrics.update({
        "version/lag_mean": statistics.mean(lags), "version/lag_max": max(lags),
        "timing/wait_batch": wait_batch, "timing/update": update, "timing/weight_sync": weight_sync,
        "timing/step": time.perf_counter() - step_start,
        "throughput/tokens_per_s": tokens / (time.perf_counter() - step_start),
    })
    return metrics, rollouts


def _finish(cfg, roles: Roles, stream: RolloutStream, logger: RunLogger, memory: MemoryWatch, stop: GracefulStop,
            step: int, before: dict, after: dict, samples: int, total_tokens: int, started: float,
            train_start: float, restarts: int) -> dict:
    """The final model (`output_dir/checkpoint`), the summary, and the run's close."""
    final = ray.get(roles.learner.save.remote(str(Path(cfg.train.output_dir) / "checkpoint")))
    elapsed = time.perf_counter() - train_start
    summary = {
        "steps": step, "policy_version": stream.learner_version, "stopped_by": stop.requested or "",
        "eval/gold_reward_before": before["eval/gold_reward_mean"],
        "eval/proxy_reward_before": before["eval/proxy_reward_mean"],
        **_after_training(before, after),
        "samples_per_s": samples / elapsed, "tokens_per_s": total_tokens / elapsed,
        "train_minutes": elapsed / 60, "peak_memory_gib": memory.peak_gib(), "total_minutes": (time.perf_counter() - started) / 60,
        **{k: v for k, v in stream.stats().items() if not k.startswith("timing/")},
        **stream.reward.counters,
        "worker_recovery_s": stream.recoveries, "workers_joined": stream.joined, "learner_restarts": restarts,
        "checkpoint": final,
    }
    logger.close(summary)
    print_summary(summary)
    return summary


def _after_training(before: dict, after: dict) -> dict:
    """The summary's held-out figures after training, and the policy version they were measured at. A run
    stopped before its first evaluation after `before` has none: it says so rather than repeat `before`."""
    if after["eval/policy_version"] == before["eval/policy_version"]:
        return {"eval/after": "not measured: stopped before the first evaluation (train.eval_every)"}
    return {"eval/gold_reward_after": after["eval/gold_reward_mean"],
            "eval/gold_reward_gain": after["eval/gold_reward_mean"] - before["eval/gold_reward_mean"],
            "eval/proxy_reward_after": after["eval/proxy_reward_mean"],
            "eval/kl_after": after["eval/kl_mean"],
            "eval/after_policy_version": after["eval/policy_version"]}


def evaluate(roles: Roles, stream: RolloutStream, prompts: list[Prompt], gold, cfg) -> dict:
    """Held-out prompts sampled by the current policy, judged by the gold scorer and by the reward server
    (the proxy PPO optimises: a proxy that rises while gold falls is reward over-optimisation). KL is the
    sum over response tokens of log pi - log pi_ref (the policy's log-probs as vLLM sampled them)."""
    rollouts = stream.generate_now([(p.index, p.token_ids) for p in prompts], cfg.train.eval_samples,
                                   cfg.train.eval_temperature)
    rollouts = ray.get(roles.reference.ref_logprobs.remote(rollouts))
    texts = {p.index: p.text for p in prompts}
    prompt_texts, responses = [texts[r.prompt_index] for r in rollouts], [r.text for r in rollouts]
    proxy = stream.reward.submit(prompt_texts, responses)
    scores = score_checked(gold, prompt_texts, responses)
    kls = [sum(a - b for a, b in zip(r.logprobs, r.ref_logprobs)) for r in rollouts]
    return {"eval/gold_reward_mean": statistics.mean(scores),
            "eval/gold_reward_std": statistics.pstdev(scores),
            "eval/proxy_reward_mean": statistics.mean(stream.reward.result(proxy)),
            "eval/kl_mean": statistics.mean(kls),
            "eval/response_len": statistics.mean(len(r.response_ids) for r in rollouts),
            "eval/policy_version": min(r.version for r in rollouts)}


def print_summary(summary: dict) -> None:
    print("\n=== summary ===")
    for key, value in summary.items():
        print(f"{key:32s} {value:.4f}" if isinstance(value, float) else f"{key:32s} {value}")
