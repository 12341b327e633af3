"""PPO math for RLHF: masked statistics, KL estimators, reward shaping, GAE, losses, KL controllers.

Pure functions of tensors; torch is the only import. Shape conventions throughout:
B rows (one sampled response each), T response-token positions, right-padded, V vocabulary size.
`mask` is a (B, T) float tensor, 1.0 on real response tokens and 0.0 on padding; it is the only
thing that says which positions are real, so padding may hold anything (even inf or NaN) and
never reaches a result.
"""

from __future__ import annotations

import torch
from torch import Tensor


# --- masked statistics -------------------------------------------------------------------------


def _zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    # torch.where rather than x * mask: padding may hold inf or NaN (e.g. log-probs of pad tokens),
    # and inf * 0 = NaN would leak into every sum.
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the positions where `mask` is 1: over all of them, or along `dim`."""
    x = _zero_padding(x, mask)
    mask = mask.to(x.dtype).expand_as(x)
    # An all-padding selection (an empty row) gives 0 instead of NaN, which would poison a loss.
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1.0)
    return x.sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over the real tokens of the whole batch."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if not unbiased:
        return var
    n = mask.sum()
    if n < 2:
        raise ValueError(
            f"masked_var(unbiased=True) needs at least 2 real tokens, got {int(n.item())}; "
            "pass unbiased=False or a larger batch"
        )
    return var * n / (n - 1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise `x` to zero mean and unit variance over the real tokens of the whole batch.

    Statistics are pooled over the batch, not per row, as in OpenAI's lm-human-preferences and
    TRL (which uses the unbiased variance, as here). With `shift_mean=False` the mean is kept and
    only the scale changes: lm-human-preferences whitens rewards this way so that their sign still
    means better or worse than nothing. Padding comes out 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_padding(whitened, mask)


# --- KL estimators -----------------------------------------------------------------------------
# Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi, after Schulman,
# "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html), with r = pi_ref / pi.


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = -log r: unbiased but high variance, and negative on some tokens."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = (log r)^2 / 2: biased, low variance, never negative."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = (r - 1) - log r: unbiased, low variance, never negative (log r <= r - 1)."""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token KL(pi || pi_ref) by the named estimator ("k1", "k2" or "k3"); same shape as inputs."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


# --- rewards and advantages --------------------------------------------------------------------


@torch.no_grad()
def shaped_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: a KL penalty on every real token plus the sequence score on the last one.

    r_t = -kl_coef * KL_t, and r_T += score, as in Ziegler et al. 2019 (eq. 2) and InstructGPT
    (Ouyang et al. 2022, eq. 2): the reward model judges only the whole response, while the penalty
    keeps each token near the reference policy. k1 is the estimator both papers use. scores are
    (B,), the others (B, T). Returns (rewards, kl), both (B, T) and 0 on padding.
    """
    kl = _zero_padding(kl_k1(logprobs, ref_logprobs), mask)
    rewards = -kl_coef * kl
    lengths = mask.sum(dim=1).long()
    # Right padding puts the last real token at length - 1; an empty row has none and gets no score.
    last = (lengths - 1).clamp(min=0).unsqueeze(1)
    score = torch.where(lengths > 0, scores.to(rewards.dtype), 0.0).unsqueeze(1)
    rewards = rewards.scatter_add(1, last, score)
    return rewards, kl


# Advantages and returns are targets: a gradient through them would let the value head move its own
# regression target, so they are computed without autograd.
@torch.no_grad()
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eqs. 11-16) over right-padded rows.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, computed from
    the end of each row backwards. The response ends the episode, so V and A after the last real
    token are 0, wherever that token falls in the row. Returns (advantages, returns), both (B, T),
    with returns = advantages + values (the lambda-return, the value head's target); 0 on padding.
    """
    rewards = _zero_padding(rewards, mask)
    values = _zero_padding(values, mask)
    advantages = torch.zeros_like(rewards)
    # With r = V = 0 on padding, every padding delta and advantage is 0, so the last real token of
    # each row sees V_{t+1} = A_{t+1} = 0: the episode boundary needs no per-row length bookkeeping.
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = delta + gamma * lam * next_advantage
        next_value = values[:, t]
        next_advantage = advantages[:, t]
    returns = _zero_padding(advantages + values, mask)
    return advantages, returns


# --- losses ------------------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), negated to be minimised.

    L = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - clip, 1 + clip)), rho_t = pi / pi_old,
    averaged over all real tokens of the batch. All inputs (B, T). Stats are detached 0-dim tensors
    (reading them with .item() is left to the logger, to avoid a device sync here):
      clip_frac: fraction of tokens whose clipped term is the larger, i.e. carries no gradient;
      approx_kl: k3 estimate of KL(pi_old || pi) on the tokens sampled from pi_old;
      ratio_mean: mean of rho_t.
    """
    # Zeroing the log-ratio on padding (rather than masking afterwards) keeps exp() of garbage
    # from producing inf there, whose gradient would be NaN even behind a mask.
    log_ratio = _zero_padding(logprobs - old_logprobs, mask)
    advantages = _zero_padding(advantages, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    # The max is the pessimistic bound: clipping removes the incentive to move rho outside
    # [1 - clip, 1 + clip] but never hides a loss that got worse.
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            # k3 with samples from pi_old and r = pi / pi_old: (r - 1) - log r.
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: 0.5 * mean_t max((V - R)^2, (V_clip - R)^2), over real tokens.

    V_clip = V_old + clamp(V - V_old, -clip, clip), the value-function clipping of OpenAI baselines'
    PPO2 (see also Engstrom et al. 2020, "Implementation Matters", sec. 3), which keeps one update
    from moving the value far from the one that produced the advantages. All inputs (B, T).
    Stats: clip_frac, the fraction of tokens where the clipped term is the larger.
    """
    values = _zero_padding(values, mask)
    old_values = _zero_padding(old_values, mask)
    returns = _zero_padding(returns, mask)
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats


# --- distributions over the vocabulary ---------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) along the last axis: (..., V) -> (...).

    H = logsumexp(z) - sum_i p_i z_i, which never exponentiates an unshifted logit. Computed in the
    dtype of `logits`; upcast bf16 logits first where precision matters.
    """
    # A logit of -inf (a token masked out of the vocabulary) has p = 0 and contributes nothing,
    # but 0 * -inf = NaN; the most negative finite value gives the same distribution without it.
    logits = logits.clamp(min=torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] for each position: logits (..., V), labels (...) -> (...).

    log_softmax subtracts the row max before anything is rounded; the cheaper
    logit[label] - logsumexp(logits) subtracts two large, separately rounded numbers and loses
    digits (badly so in bf16). Labels must be valid token ids everywhere, padding included (use the
    pad id there, not -100). Computed in the dtype of `logits`; memory is one (..., V) tensor.
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


# --- KL coefficient controllers ----------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient beta; `update` is a no-op, so it can stand where Adaptive does."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019, sec. 2.2.

    e = clip(KL / target - 1, -0.2, 0.2) and beta <- beta * (1 + e * n_steps / horizon): a
    proportional controller that drives the observed KL toward `target`, the clip bounding how far
    one noisy KL estimate can move beta. `n_steps` is the number of samples (episodes) behind
    `current_kl`, so `horizon` is measured in samples too.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if init_kl_coef <= 0:
            raise ValueError(f"init_kl_coef must be > 0 for an adaptive controller, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}; use FixedKLController for no target")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    # Only beta evolves; target and horizon come from the run config, so a resumed run may change them.
    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def make_kl_controller(
    kl_coef: float, target: float, horizon: int
) -> FixedKLController | AdaptiveKLController:
    """Adaptive controller starting at `kl_coef` when `target` > 0, else a fixed coefficient."""
    if target > 0:
        return AdaptiveKLController(kl_coef, target, horizon)
    return FixedKLController(kl_coef)
