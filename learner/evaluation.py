"""The one held-out evaluation of a policy's replies, shared by the PPO job's evaluations (learner/train.py)
and the pipeline's before-and-after comparisons (`rlhf sft`, `rlhf dpo`): `train.eval_samples` samples of
each held-out prompt at `train.eval_temperature`, each judged by the gold scorer (or, in a job of conversations,
as many conversations, each judged by its environment)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from actors.worker_pool import WorkerPool, sample
from core.environment import Conversations
from core.prompts import Prompt
from core.rollout import Rollout
from reward_server.scorers import Scorer, score_checked


@dataclass
class HeldOut:
    groups: list[list[Rollout]]  # each held-out prompt's samples, in the prompts' order
    prompt_texts: list[str]  # the prompt of each sample, flat
    gold: list[float]  # the gold scorer's score of each sample, flat

    @property
    def rollouts(self) -> list[Rollout]:
        return [r for group in self.groups for r in group]

    def figures(self) -> dict[str, float]:
        rollouts = self.rollouts
        return held_out_figures(self.gold, [len(r.response_ids) for r in rollouts], [r.finished for r in rollouts])


def held_out_figures(gold: list[float], lengths: list[int], finished: list[bool]) -> dict[str, float]:
    """The held-out figures of judged samples: their gold scores, reply lengths and whether each finished."""
    return {"eval/gold_reward_mean": statistics.mean(gold), "eval/gold_reward_std": statistics.pstdev(gold),
            "eval/response_len": statistics.mean(lengths), "eval/finished_frac": statistics.mean(finished)}


def kl_per_reply(rollouts: list[Rollout], ref_logprobs: list[list[float]]) -> list[float]:
    """Each reply's KL to the reference: the sum over the policy's tokens of log pi - log pi_ref (the rollout's
    log-probs are those vLLM sampled with)."""
    return [sum((a - b) * m for a, b, m in zip(r.logprobs, ref, r.mask())) for r, ref in zip(rollouts, ref_logprobs)]


def judge_held_out(pool: WorkerPool, prompts: list[Prompt], gold: Scorer, samples: int, temperature: float,
                   label: str = "evaluation", conversations: Conversations | None = None) -> HeldOut:
    """`samples` replies to each held-out prompt from the pool's policy, at `temperature`, judged by `gold`; with
    `conversations`, `samples` conversations about each, judged by their environment."""
    groups = sample(pool, prompts, samples, temperature, label=label, conversations=conversations)
    prompt_texts = [p.text for p, group in zip(prompts, groups) for _ in group]
    rollouts = [r for g in groups for r in g]
    if conversations is not None:
        return HeldOut(groups, prompt_texts, [r.score for r in rollouts])
    return HeldOut(groups, prompt_texts, score_checked(gold, prompt_texts, [r.text for r in rollouts]))
