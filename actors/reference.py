"""Frozen reference model: the initial policy, kept unchanged, giving per-token log-probs for the KL penalty."""

from __future__ import annotations

import logging
import os
import warnings

import ray
import torch

from actors.rollout import Rollout, pad_tokens, response_forward
from learner.ppo_math import logprobs_from_logits

log = logging.getLogger(__name__)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _restarted_actor() -> bool:
    """Whether this process is a Ray actor that Ray started again after its process died."""
    context = ray.get_runtime_context() if ray.is_initialized() else None
    if not (context and context.get_actor_id()):
        return False
    with warnings.catch_warnings():  # Ray's property reads its own deprecated `actor_id`
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(context.was_current_actor_reconstructed)


class ReferenceModel:
    def __init__(self, model_path: str, cfg, temperature: float = 1.0, micro_batch: int = 16):
        from transformers import AutoModelForCausalLM

        if _restarted_actor():
            log.warning("reference model restarted by Ray after its process died; the calls it lost run again")
        torch.set_num_threads(cfg.threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(cfg.dtype)).to(cfg.device)
        self.model.eval().requires_grad_(False)
        self.pad_id = self.model.config.pad_token_id or 0
        self.device = cfg.device
        self.temperature = temperature
        self.micro_batch = micro_batch

    def pid(self) -> int:
        return os.getpid()

    @torch.no_grad()
    def ref_logprobs(self, rollouts: list[Rollout]) -> list[Rollout]:
        """Attach the reference log-prob of every response token to each rollout."""
        for start in range(0, len(rollouts), self.micro_batch):
            chunk = rollouts[start:start + self.micro_batch]
            input_ids, attention_mask, response_ids, _ = pad_tokens(chunk, self.pad_id)
            logits, _ = response_forward(self.model, input_ids.to(self.device), attention_mask.to(self.device),
                                         response_ids.shape[1], self.temperature)
            lp = logprobs_from_logits(logits, response_ids.to(self.device)).float().cpu()
            for i, r in enumerate(chunk):
                r.ref_logprobs = lp[i, :len(r.response_ids)].tolist()
        return rollouts

