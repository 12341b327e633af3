"""A PPO job (`rlhf train`) around the training loop of learner/train.py: the roles launched on Ray, the
control actor (`rlhf scale`, `rlhf status`), a graceful stop on SIGTERM (`ray job stop`) or Ctrl-C, a
fresh start of the roles from the last checkpoint when the learner's process dies, a diagnosis and a
non-zero exit when the job hangs, and the summary.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.nodes import lost
from actors.prompt_ledger import PromptLedger
from actors.rollout_stream import RolloutStream
from actors.watchdog import Hang, Watchdog
from actors.worker_pool import WorkersLost
from cluster import checkpoint
from cluster.control import ControlLink, start_control
from cluster.launch import Roles, describe_nodes, launch_roles, roles_by_node, shutdown_roles, start_ray
from cluster.models import resolve_model
from cluster.stacks import actor_stack
from core import storage
from core.config import RunConfig
from core.errors import JobHung
from core.monitoring import JobMetrics, MemoryWatch
from core.prompts import Prompt, load_prompts
from core.rollout_records import RolloutRecords, tokenizer_id
from learner.metrics import RunLogger
from learner.sft import encoded_demonstrations
from learner.train import Loop, evaluate, publish_weights, run_steps
from reward_server.client import RewardClient
from reward_server.ratings import Ladder, make_judge
from reward_server.scorers import make_scorer
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


def request_stop() -> bool:
    """SIGTERM to this process, as `ray job stop` sends, where a job here listens for it (GracefulStop): a stop
    requested after the job has ended would end the process itself. Returns whether it was sent."""
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
        return False
    os.kill(os.getpid(), signal.SIGTERM)
    return True


@dataclass
class Job:
    """What every attempt of one job shares (an attempt ends when the learner's process dies)."""

    cfg: RunConfig
    model_path: str
    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    ptx: list  # PPO-ptx demonstrations, encoded (prompt ids, reply ids)
    eval_demos: list  # held-out demonstrations whose perplexity each evaluation reports, encoded
    started: float  # time.perf_counter() at the start
    memory: MemoryWatch
    gauges: JobMetrics
    stop: GracefulStop
    tokenizer_id: str = ""  # the policy's tokenizer's fingerprint (core/rollout_records.py), for kept rollouts


def train(cfg: RunConfig) -> dict:
    """Run the PPO job the config describes; returns its summary."""
    from transformers import AutoTokenizer

    cfg.check_ppo_job()
    started, memory = time.perf_counter(), MemoryWatch()
    model_path = resolve_model(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_prompts, eval_prompts = load_prompts(cfg.data, tokenizer)
    log.info("%d training prompts, %d held-out prompts from %s", len(train_prompts), len(eval_prompts),
             cfg.data.path)
    ptx = encoded_demonstrations(cfg.ppo.ptx_path, cfg.sft, tokenizer) if cfg.ppo.ptx_coef > 0 else []
    eval_demos = encoded_demonstrations(cfg.train.eval_demos, cfg.sft, tokenizer) if cfg.train.eval_demos else []
    storage.check_writable(cfg.train.output_dir, "train.output_dir")
    resume = checkpoint.resume_from(cfg.train.resume, cfg.train.output_dir)
    start_ray(cfg.train)
    job = Job(cfg, model_path, train_prompts, eval_prompts, ptx, eval_demos, started, memory,
              JobMetrics(storage.basename(cfg.train.output_dir)), GracefulStop(),
              tokenizer_id(tokenizer) if cfg.train.keep_rollouts else "")
    try:
        for attempt in range(cfg.train.max_learner_restarts + 1):
            try:
                return _attempt(job, resume, attempt)
            except LearnerLost as exc:
                resume = checkpoint.resume_from("auto", cfg.train.output_dir)
                if attempt == cfg.train.max_learner_restarts:
                    raise RuntimeError(f"the learner died {attempt + 1} times (train.max_learner_restarts = "
                                       f"{cfg.train.max_learner_restarts}); last: {exc}") from exc
                log.warning("the learner died (%s); restarting the job's roles from %s", exc,
                            resume or "the initial policy")
    finally:
        job.stop.restore()
        memory.stop()
        job.gauges.close()


def _attempt(job: Job, resume: str | None, attempt: int) -> dict:
    """Launch the roles, run the steps left, stop the roles."""
    cfg = job.cfg
    watchdog = Watchdog(cfg.train.hang_timeout_s)
    roles = launch_roles(cfg, job.model_path, watchdog, ptx=job.ptx)
    link = ControlLink(start_control(), status=lambda: stream.status(), workers=lambda: len(roles.pool.workers),
                       scale_to=roles.pool.scale_to)
    loop, placed = None, roles_by_node(roles)
    try:
        log.info("roles by node:\n%s", describe_nodes(placed))
        gen = cfg.generation
        stream = RolloutStream(roles.pool, PromptLedger(job.train_prompts, cfg.data.seed),
                               None if cfg.reference_in_learner else roles.reference,
                               RewardClient(cfg.reward, APP_NAME, roles.reward),
                               samples_per_prompt=gen.samples_per_prompt, prompts_per_request=gen.prompts_per_request,
                               streaming=gen.streaming, conversations=cfg.conversations(),
                               buffer_size=cfg.train.buffer_size, max_staleness=cfg.train.max_staleness,
                               on_pump=link.poll)
        loop = _start_loop(job, roles, stream, resume)
        run_steps(loop, loop.step + 1)
        return _finish(job, loop, roles, attempt)
    except (RayActorError, RayTaskError) as exc:
        # A rank lost with its node can surface first as its peers' collective error (gloo: connection reset).
        if _alive(roles.learner):
            raise
        if loop is not None:
            loop.logger.abandon()
        gone = {node: names for node, names in placed.items() if node in lost(placed)}
        where = f"; lost with its node:\n{describe_nodes(gone)}" if gone else ""
        raise LearnerLost(f"{type(exc).__name__} at step {loop.step + 1 if loop else 1}{where}") from exc
    except Hang as exc:
        raise _report_hang(exc, job, roles, loop) from exc
    except WorkersLost as exc:
        raise JobHung(f"the job cannot go on: {exc}; {_last_checkpoint(job, roles, loop)}") from exc
    finally:
        ray.kill(link.actor)
        shutdown_roles(roles)


def _rollout_records(cfg, tokenizer: str, run_id: str | None, step: int) -> RolloutRecords | None:
    """`train.keep_rollouts`: the rollouts folder, without the parts of steps after `step` (trained again)."""
    if not cfg.train.keep_rollouts:
        return None
    run = storage.basename(cfg.train.output_dir) + (f"/{run_id}" if run_id else "")
    records = RolloutRecords(cfg.train.output_dir, run, cfg.model.path, tokenizer)
    if dropped := records.drop_after(step):
        print(f"rollouts of steps {dropped[0]}-{dropped[-1]} removed from {records.location}: "
              f"{'the run starts afresh' if step == 0 else f'they are trained again after step {step}'}", flush=True)
    return records


def _start_loop(job: Job, roles: Roles, stream: RolloutStream, resume: str | None) -> Loop:
    """The loop at its start: from a checkpoint (the workers get its weights), or from the initial policy
    with the held-out figures before training."""
    cfg = job.cfg
    meta = {}
    if resume is not None:
        meta = checkpoint.restore(resume, roles.learner, stream, cfg.reward.scorer)
        publish_weights(stream, roles.learner, block=True)  # every worker starts from the initial policy
    logger = RunLogger(cfg.train.output_dir, cfg.to_dict(), cfg.train.wandb_mode, cfg.train.wandb_project,
                       cfg.train.steps, resume_id=meta.get("wandb_id"), first_step=meta.get("step", 0) + 1)

    def save_checkpoint(step: int, watchdog: Watchdog = stream.watchdog) -> str:
        path = checkpoint.save(roles.learner, stream.ledger, step, cfg.train.output_dir, cfg.train.keep_checkpoints,
                               watchdog, {"before": loop.before, "after": loop.after, "wandb_id": logger.run_id,
                                          "reward": cfg.reward.scorer})
        logger.checkpoint(path, step)
        return path

    loop = Loop(cfg, stream, roles.learner, roles.reference, job.eval_prompts, make_scorer(cfg.train.gold_scorer),
                logger, save_checkpoint, eval_demos=job.eval_demos, ladder=_ladder(cfg, job.eval_prompts),
                stop_requested=lambda: job.stop.requested is not None, record=job.gauges.record,
                records=_rollout_records(cfg, job.tokenizer_id, logger.run_id, meta.get("step", 0)),
                step=meta.get("step", 0))
    if resume is not None:
        loop.before, loop.after = meta["before"], meta.get("after", meta["before"])
        print(f"resumed from {resume} (step {meta['step']}, policy version {stream.learner_version})", flush=True)
        return loop
    loop.before = loop.after = evaluate(loop)
    logger.log(0, loop.before)
    print(f"before training: held-out gold reward {loop.before['eval/gold_reward_mean']:+.3f}, proxy reward "
          f"({cfg.reward.scorer}) {loop.before['eval/proxy_reward_mean']:+.3f}, KL {loop.before['eval/kl_mean']:.2f}",
          flush=True)
    return loop


def _ladder(cfg: RunConfig, eval_prompts: list[Prompt]) -> Ladder | None:
    """With `train.elo`, the ladder each evaluation's policy joins (its responses judged by `elo.judge`)."""
    if not cfg.train.elo:
        return None
    return Ladder(make_judge(cfg.elo.judge, cfg.train.gold_scorer, cfg.reward.scorer), [p.text for p in eval_prompts])


def _alive(learner) -> bool:
    try:
        ray.get(learner.get_version(), timeout=30)
        return True
    except (RayActorError, GetTimeoutError):
        return False


def _report_hang(hang: Hang, job: Job, roles: Roles, loop: Loop | None) -> JobHung:
    """Write the stuck roles' Python stacks to the run directory and print them; checkpoint where the
    learner still answers. Returns the error the job exits with."""
    cfg = job.cfg
    name = f"hang-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    out = storage.join(cfg.train.output_dir, name)
    stacks = "\n\n".join(f"=== {role} ===\n{actor_stack(role)}" for role in hang.roles)
    storage.Location(cfg.train.output_dir).write_text(name, f"{hang}\n\n{stacks}\n")
    print(f"\nthe job is stuck: {hang}\n\n{stacks}", file=sys.stderr, flush=True)
    if "learner" in hang.roles:
        saved = "no checkpoint: the learner is one of the stuck roles"
        if loop is not None:
            loop.logger.abandon()
    else:
        saved = _last_checkpoint(job, roles, loop)
    return JobHung(f"the job is stuck: {hang}. Their Python stacks are in {out}; {saved}")


def _last_checkpoint(job: Job, roles: Roles, loop: Loop | None) -> str:
    """A checkpoint of the policy where the learner still answers, for a job that cannot go on; says which
    (or why none) for the job's last message."""
    saved = "no checkpoint: the job stopped before its first step"
    if loop is not None:
        # A fresh deadline: the job's own watchdog may still hold stuck calls.
        watchdog = Watchdog(job.cfg.train.hang_timeout_s)
        try:
            version = watchdog.get(roles.learner.get_version(), "learner", "get_version")
            path = loop.save_checkpoint(version, watchdog)
            saved = f"checkpoint of policy version {version} in {path} (train.resume=auto continues from it)"
        except (Hang, RayActorError) as exc:
            saved = f"no checkpoint: the learner did not answer ({type(exc).__name__})"
        loop.logger.abandon()
    return saved


def _finish(job: Job, loop: Loop, roles: Roles, restarts: int) -> dict:
    """The final model (`output_dir/checkpoint`), the summary, and the run's close."""
    cfg, stream = job.cfg, loop.stream
    final = stream.watchdog.get(loop.learner.save(storage.join(cfg.train.output_dir, "checkpoint")),
                                "learner", "save")
    seconds = max(loop.seconds, 1e-9)
    summary = {
        "steps": loop.step, "policy_version": stream.learner_version, "stopped_by": job.stop.requested or "",
        "eval/gold_reward_before": loop.before["eval/gold_reward_mean"],
        "eval/proxy_reward_before": loop.before["eval/proxy_reward_mean"],
        **_after_training(loop.before, loop.after),
        "samples_per_s": loop.samples / seconds, "tokens_per_s": loop.tokens / seconds,
        "train_minutes": loop.seconds / 60, "peak_memory_gib": job.memory.peak_gib(),
        "total_minutes": (time.perf_counter() - job.started) / 60,
        **stream.stats(), **stream.reward.counters,
        "worker_recovery_s": stream.pool.recoveries, "workers_joined": stream.pool.joined,
        "learner_restarts": restarts, "checkpoint": final, "roles_by_node": roles_by_node(roles),
    }
    if loop.ladder is not None and len(loop.ladder.names) > 1:
        with storage.staged(storage.join(cfg.train.output_dir, "elo")) as elo_dir:
            printed, _ = loop.ladder.write(str(elo_dir), cfg.elo.bootstrap, cfg.elo.seed)
        print(f"\nheld-out ratings of this run's evaluations ({cfg.train.output_dir}/elo/ratings.png):\n{printed}")
    loop.logger.close(summary)
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
            "eval/after_policy_version": after["eval/policy_version"],
            **({"eval/demo_perplexity_before": before["eval/demo_perplexity"],
                "eval/demo_perplexity_after": after["eval/demo_perplexity"]} if "eval/demo_perplexity" in after else {})}


def print_summary(summary: dict) -> None:
    print("\n=== summary ===")
    for key, value in summary.items():
        print(f"{key:32s} {value:.4f}" if isinstance(value, float) else f"{key:32s} {value}")
