"""The advantage estimators by name (`ppo.advantage`), each turning a batch's scores and per-token KL into
(advantages, value targets), both (B, T). The math is in learner/ppo_math.py; this table says which of its
functions each estimator is and how the KL penalty reaches it.

`kl_coef` is the KL penalty's coefficient in the reward: the controller's beta with `ppo.kl_in=reward`, 0 with
`ppo.kl_in=loss` (the learner then adds beta * KL to the loss instead, and the rewards are the scores alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from torch import Tensor

from learner import ppo_math

if TYPE_CHECKING:
    from core.config import PPOConfig


def gae(scores: Tensor, kl: Tensor, kl_coef: float, values: Tensor, mask: Tensor, groups: Tensor,
        cfg: PPOConfig) -> tuple[Tensor, Tensor]:
    """GAE on the KL-shaped per-token rewards with the value head's values; whitened over the batch."""
    rewards = ppo_math.token_rewards(scores, kl, mask, kl_coef)
    advantages, returns = ppo_math.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = ppo_math.masked_whiten(advantages, mask)
    return advantages, returns


def grpo(scores: Tensor, kl: Tensor, kl_coef: float, values: Tensor, mask: Tensor, groups: Tensor,
         cfg: PPOConfig) -> tuple[Tensor, Tensor]:
    """The group-normalised scores, then the KL penalty's return at its own scale."""
    advantages = ppo_math.grpo_advantages(scores, mask, groups, cfg.grpo_std_norm)
    advantages = advantages + ppo_math.kl_penalty_returns(kl, mask, kl_coef)
    return advantages, advantages.new_zeros(advantages.shape)


def rloo(scores: Tensor, kl: Tensor, kl_coef: float, values: Tensor, mask: Tensor, groups: Tensor,
         cfg: PPOConfig) -> tuple[Tensor, Tensor]:
    """Leave-one-out baseline of the KL-penalised sequence reward (Ahmadian et al. 2024)."""
    advantages = ppo_math.rloo_advantages(ppo_math.token_rewards(scores, kl, mask, kl_coef), mask, groups)
    return advantages, advantages.new_zeros(advantages.shape)


def reinforce_pp(scores: Tensor, kl: Tensor, kl_coef: float, values: Tensor, mask: Tensor, groups: Tensor,
                 cfg: PPOConfig) -> tuple[Tensor, Tensor]:
    """REINFORCE++: the returns of the KL-shaped rewards, whitened over the batch."""
    advantages = ppo_math.reinforce_pp_advantages(ppo_math.token_rewards(scores, kl, mask, kl_coef), mask)
    return advantages, advantages.new_zeros(advantages.shape)


Estimator = Callable[..., tuple[Tensor, Tensor]]
ESTIMATORS: dict[str, Estimator] = {"gae": gae, "grpo": grpo, "rloo": rloo, "reinforce_pp": reinforce_pp}
