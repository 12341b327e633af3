"""Where a learner's reference log-probs come from (the KL penalty's pi_ref), one of three kinds:

- `rollouts`: the reference actor's (`reference.placement=actor`, actors/reference.py), brought by each rollout;
- `frozen`: a frozen copy of the initial policy in the learner's process (`reference.placement=learner`),
  sharded like the policy in a learner group;
- `base`: under LoRA, the policy itself with its adapters switched off.

A learner that holds the reference (`frozen` or `base`) computes the rollouts' reference log-probs in its
update's first pass over the batch, with the same forward as the policy's, and answers the evaluations'
reference calls as the reference actor would.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from core.forward import load_causal_lm, token_logprobs
from learner import distributed
from learner.distributed import PolicyWithValue
from learner.policy import Policy

if TYPE_CHECKING:
    from core.config import PPOConfig


def _whole_model(model: PolicyWithValue, *args):
    """PolicyWithValue's own forward (the FSDP root's, when sharded), as the `forward` of the shared helpers."""
    return model(*args)


class ReferenceSource:
    def __init__(self, kind: str, policy: Policy, model_path: str, cfg: PPOConfig, world_size: int):
        """`kind`: `rollouts`, `frozen` or `base` (module docstring); a frozen copy is loaded from `model_path`
        as `cfg` loads the policy."""
        self.kind, self.policy, self.autocast = kind, policy, cfg.autocast
        self.frozen = None
        if kind == "frozen":
            lm = load_causal_lm(model_path, cfg.dtype, cfg.device).eval().requires_grad_(False)
            self.frozen = PolicyWithValue(lm, None)
            if world_size > 1:
                distributed.shard(self.frozen, torch.device(cfg.device))

    @classmethod
    def of(cls, policy: Policy, model_path: str, cfg: PPOConfig, world_size: int, in_learner: bool):
        """The kind a learner's config asks for: `base` under LoRA, else `frozen` when the reference lives in
        the learner (`in_learner`), else `rollouts`."""
        kind = "base" if cfg.lora_rank else "frozen" if in_learner else "rollouts"
        return cls(kind, policy, model_path, cfg, world_size)

    @property
    def held(self) -> bool:
        """The reference model is in this learner (its log-probs are this learner's to compute)."""
        return self.kind != "rollouts"

    def computes(self, kl_coef: float) -> bool:
        """Whether the update computes the rollouts' reference log-probs: where the learner holds the reference
        and the KL penalty uses them (with `ppo.kl_coef` 0 nothing does, and the step reports no KL)."""
        return self.held and kl_coef > 0

    @contextlib.contextmanager
    def module(self):
        """The module that computes as the reference model, for the duration of the block: the frozen copy, or
        the policy with its adapters off."""
        if self.kind == "rollouts":
            raise RuntimeError("this learner holds no reference model (ppo.lora_rank = 0 and reference.placement "
                               "= actor): ask the reference actor")
        if self.frozen is not None:
            yield self.frozen
        else:
            with self.policy.lm.disable_adapter():
                yield self.policy.module

    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]], temperature: float
                 ) -> list[list[float]]:
        """The reference log-prob of every response token, one list per row (the reference actor's answer).
        Through the whole module (the FSDP root when sharded): every rank of a group calls it on the same rows."""
        if not prompt_ids:
            return []
        self.policy.lm.eval()
        with self.module() as reference:
            return token_logprobs(reference, prompt_ids, response_ids, pad_id=self.policy.pad_id,
                                  temperature=temperature, autocast_dtype=self.autocast, forward=_whole_model)
