"""Frozen reference model: the initial policy, kept unchanged, giving per-token log-probs for the KL penalty.

It computes exactly as the learner computes its own log-probs (the learner's weight dtype and autocast,
float32 LM head, the same forward in core/forward.py), so that at the start of training, when the
policy still is the reference, the KL estimate is 0 rather than the gap between two kinds of arithmetic.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import TYPE_CHECKING

import torch

from core.forward import load_causal_lm, token_logprobs

if TYPE_CHECKING:
    from core.config import ReferenceConfig

log = logging.getLogger(__name__)


def _restarted_actor() -> bool:
    """Whether this process is a Ray actor that Ray started again after its process died."""
    ray = sys.modules.get("ray")  # an actor has imported Ray; a process without Ray is no actor
    context = ray.get_runtime_context() if ray and ray.is_initialized() else None
    if not (context and context.get_actor_id()):
        return False
    with warnings.catch_warnings():  # Ray's property reads its own deprecated `actor_id`
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(context.was_current_actor_reconstructed)


class ReferenceModel:
    def __init__(self, model_path: str, cfg: ReferenceConfig, *, dtype: str, autocast: str, temperature: float = 1.0,
                 micro_batch: int = 16):
        """`cfg` is the run's ReferenceConfig (device, threads); `dtype` and `autocast` are the learner's
        (`ppo.dtype`, `ppo.autocast`); `temperature` is the sampling temperature of the rollouts."""
        if _restarted_actor():
            log.warning("reference model restarted by Ray after its process died; the calls it lost run again")
        torch.set_num_threads(cfg.threads)
        self.model = load_causal_lm(model_path, dtype, cfg.device)
        self.model.eval().requires_grad_(False)
        self.pad_id = self.model.config.pad_token_id or 0
        self.autocast = autocast
        self.temperature = temperature
        self.micro_batch = micro_batch

    def ref_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]],
                     temperature: float | None = None) -> list[list[float]]:
        """The reference log-prob of every response token, one list per row, at the rollouts' sampling
        temperature (or `temperature`: an evaluation sampled at another one)."""
        if not prompt_ids:
            return []
        return token_logprobs(self.model, prompt_ids, response_ids, pad_id=self.pad_id,
                              temperature=temperature or self.temperature, autocast_dtype=self.autocast,
                              micro_batch=self.micro_batch)

    def pid(self) -> int:
        """This actor's process id (the fault tests kill it)."""
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()
