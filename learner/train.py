"""The PPO training loop: take a batch -> update -> publish, step after step, with held-out evaluations and
checkpoints.

Generation and scoring (and the reference log-probs, where a reference actor computes them) happen chunk by
chunk in the rollout stream (actors/rollout_stream.py), which `take` drives. The learner's `update`
(learner/learner.py) does the rest; in the default job (GRPO, the reference in the learner) its first pass
gives the proximal policy's and the reference's log-probs, then the group-normalised scores and the KL
penalty make the advantages and the clipped minibatch steps follow. With `train.max_staleness` >= 1 the
workers go on generating while the learner trains. The job around the
loop (launching the roles, restarts, signals, hangs, the summary) is cluster/job.py.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from actors.rollout_stream import RolloutStream
from core.prompts import Prompt
from core.rollout import Rollout
from core.rollout_records import RolloutRecords
from learner.evaluation import judge_held_out, kl_per_reply
from learner.metrics import RunLogger
from reward_server.ratings import Ladder
from reward_server.scorers import Scorer


class StepTimer:
    """Wall-clock seconds of named blocks of one step (`timing/<name>`), and of the whole step."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"timing/{name}"] = time.perf_counter() - start

    def total(self) -> float:
        return time.perf_counter() - self.start


def ppo_step(stream: RolloutStream, learner, batch_size: int, overlap: bool) -> tuple[dict, list[Rollout]]:
    """One PPO iteration, three timed blocks; returns its metrics and the rollouts it trained on."""
    stream.lap_stage_times()  # the stages' busy time counts from here: work between steps is not this step's
    timer = StepTimer()
    with timer("take"):  # generate -> score + reference log-probs, chunk by chunk, in the stream
        rollouts = stream.take(batch_size)
    with timer("update"), stream.training():
        metrics = stream.wait(learner.update(rollouts), "learner", "update")
    with timer("publish"):
        publish_weights(stream, learner, block=not overlap)

    tokens = sum(len(r.response_ids) for r in rollouts)
    metrics.update({**timer.seconds, **stream.lap_stage_times(), **stream.stats(), **stream.reward.counters,
                    **version_lags(rollouts, stream.learner_version - 1),
                    "timing/step": timer.total(), "throughput/tokens_per_s": tokens / timer.total()})
    return metrics, rollouts


def version_lags(rollouts: list[Rollout], trained_at: int) -> dict[str, float]:
    """How many versions behind the policy that trained on them (`trained_at`) the rollouts' tokens were
    sampled, counted per token (a reply sampled across an in-flight update holds tokens of several versions):
    the mean and the largest lag, and the fraction of replies whose tokens are of more than one version."""
    lags = [trained_at - v for r in rollouts for v in r.versions()]
    return {"version/lag_mean": statistics.mean(lags) if lags else 0.0, "version/lag_max": max(lags, default=0),
            "version/mixed_frac": sum(r.token_versions is not None for r in rollouts) / len(rollouts)}


def publish_weights(stream: RolloutStream, learner, block: bool) -> None:
    """The learner's weights, published once into the object store in buckets, loaded by every worker."""
    weights = learner.publish()
    # Its answer (the buckets' list) comes once every bucket is in the object store: no worker is sent a
    # lost object, and no second call to the learner is needed to know it.
    stream.wait(weights, "learner", "publish")
    stream.publish(weights, block)


@dataclass
class Loop:
    """What the training loop works with, and how far it has got."""

    cfg: object  # the RunConfig
    stream: RolloutStream
    learner: object  # the learner group (learner/learner_group.py)
    reference: object  # the reference model's actor handle
    eval_prompts: list[Prompt]
    gold: Scorer  # the held-out evaluation's judge
    logger: RunLogger
    save_checkpoint: Callable[..., Path]  # (step[, watchdog]) -> a resumable checkpoint written after the step
    eval_demos: list  # held-out demonstrations, encoded: each evaluation reports the policy's perplexity on them
    ladder: Ladder | None  # train.elo: every evaluation's policy, rated against the earlier ones
    stop_requested: Callable[[], bool]  # SIGTERM or Ctrl-C: stop after this step, with a checkpoint
    record: Callable[[dict], None]  # sets the job's Ray gauges from a step's metrics
    records: RolloutRecords | None = None  # train.keep_rollouts: where each step's rollouts are written
    before: dict = field(default_factory=dict)  # held-out figures before training
    after: dict = field(default_factory=dict)  # the latest held-out figures
    step: int = 0  # the last step done
    samples: int = 0  # rollouts trained on by this process
    tokens: int = 0  # their response tokens
    seconds: float = 0.0  # time this process spent in the loop


def run_steps(loop: Loop, first_step: int) -> None:
    """Steps `first_step`..`train.steps`, or until a stop is requested."""
    train = loop.cfg.train
    batch_size = train.prompts_per_step * loop.cfg.generation.samples_per_prompt
    start = time.perf_counter()
    for step in range(first_step, train.steps + 1):
        metrics, rollouts = ppo_step(loop.stream, loop.learner, batch_size, overlap=train.max_staleness > 0)
        loop.step, loop.samples = step, loop.samples + len(rollouts)
        loop.tokens += sum(len(r.response_ids) for r in rollouts)
        last = step == train.steps
        if step % train.eval_every == 0 or last:
            loop.after = evaluate(loop)
            metrics.update(loop.after)
        if step % train.sample_table_every == 0 or last:
            loop.logger.table("samples", ["step", "version", "response", "reward"],
                              [[step, r.version, r.text, r.score] for r in rollouts[:8]])
        loop.logger.log(step, metrics, jsonl_only={"batch/prompt_indices": [r.prompt_index for r in rollouts]})
        if loop.records is not None:
            loop.records.write(step, kept_rows(loop.stream, rollouts))
        loop.record(metrics)
        loop.logger.progress(step, metrics)
        if step % train.checkpoint_every == 0 or last or loop.stop_requested():
            loop.save_checkpoint(step)
        if loop.stop_requested():
            break
    loop.seconds += time.perf_counter() - start


def kept_rows(stream: RolloutStream, rollouts: list[Rollout]) -> list[dict]:
    """The rows `train.keep_rollouts` writes for a step's rollouts (core/rollout_records.py)."""
    rows = []
    for r in rollouts:
        row = {"prompt": stream.ledger.by_index[r.prompt_index].text, "response": r.text, "reward": r.score,
               "version": r.version, "prompt_index": r.prompt_index, "finished": r.finished,
               "prompt_ids": r.prompt_ids, "response_ids": r.response_ids}
        if r.policy_mask is not None:  # a conversation: the environment's messages are inside the response
            row["policy_mask"] = r.policy_mask
        rows.append(row)
    return rows


def evaluate(loop: Loop) -> dict:
    """Held-out prompts sampled by the current policy, judged by the gold scorer and by the reward server
    (the proxy PPO optimises: a proxy that rises while gold falls is reward over-optimisation); in a job of
    conversations, judged by their environment. KL is the sum over the policy's response tokens of
    log pi - log pi_ref, both at the evaluation's sampling temperature (vLLM's log-probs are of the
    distribution it sampled from)."""
    train, stream = loop.cfg.train, loop.stream
    held_out = judge_held_out(stream.pool, loop.eval_prompts, loop.gold, train.eval_samples, train.eval_temperature,
                              conversations=stream.conversations)
    rollouts, responses = held_out.rollouts, [r.text for r in held_out.rollouts]
    # a conversation's proxy is its environment's judgement, which is the gold one too
    proxy = held_out.gold if stream.conversations else stream.reward.submit(held_out.prompt_texts, responses)
    ref_logprobs = stream.watchdog.get(
        loop.reference.ref_logprobs.remote([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts],
                                           train.eval_temperature), "reference", "ref_logprobs")
    kls = kl_per_reply(rollouts, ref_logprobs)
    demos = {}
    if loop.eval_demos:  # the alignment tax: how much less likely the policy finds demonstrated replies
        demos = stream.wait(loop.learner.perplexity(loop.eval_demos), "learner", "perplexity")
        demos = {"eval/demo_nll": demos["eval/loss"], "eval/demo_perplexity": demos["eval/perplexity"]}
    if loop.ladder is not None:  # its first response to each held-out prompt plays the earlier policies'
        demos["eval/elo"] = loop.ladder.add(f"step {loop.step}", loop.step, [g[0].text for g in held_out.groups],
                                            "this run")
    return {**demos, **held_out.figures(),
            "eval/proxy_reward_mean": statistics.mean(proxy if stream.conversations else stream.reward.result(proxy)),
            "eval/kl_mean": statistics.mean(kls),
            "eval/policy_version": min(r.version for r in rollouts)}
