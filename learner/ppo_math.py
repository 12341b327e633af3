"""PPO math for RLHF: masked statistics, reward shaping, off-policy weights, GAE, losses, KL controllers.

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


def masked_whiten(x: Tensor, mask: Tensor) -> Tensor:
    """Normalise `x` to zero mean and unit variance over the real tokens of the whole batch.

    Statistics are pooled over the batch, not per row, as in OpenAI's lm-human-preferences and
    TRL (which uses the unbiased variance, as here). Padding comes out 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    return _zero_padding((x - mean) * torch.rsqrt(var + 1e-8), mask)


# --- KL to the reference ------------------------------------------------------------------------


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k1 = log pi - log pi_ref: the estimator of KL(pi || pi_ref) from tokens sampled from pi
    that Ziegler et al. 2019 and InstructGPT put in the reward; unbiased, negative on some tokens
    (Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 = r - 1 - log r with r = pi_ref / pi: Schulman's unbiased, always non-negative estimator of
    KL(pi || pi_ref) from tokens sampled from pi, the one GRPO puts in its loss (Shao et al. 2024, eq. 4)."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


# --- off-policy correction ---------------------------------------------------------------------
# Rollouts come from the behaviour policy mu: the policy version that the generation worker held (older
# than the learner's by up to train.max_staleness versions) as vLLM computes it (other kernels, maybe
# bf16). The learner's own log-probs at its current weights, before the update, are the proximal policy
# pi_prox. Decoupled PPO (Hilton et al. 2022, "Batch size-invariance for policy optimization") clips
# pi_theta / pi_prox as PPO does, and corrects for sampling from mu by weighting each token with
# pi_prox / mu, truncated at a cap as in IMPALA's V-trace (Espeholt et al. 2018, sec. 4.1) so that a
# rare token cannot blow up the variance; the TIS fix for vLLM/trainer mismatch (Yao et al. 2025) is the
# same weight with cap 2.


@torch.no_grad()
def truncated_importance_weights(prox_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor,
                                 cap: float) -> tuple[Tensor, dict[str, Tensor]]:
    """w_t = min(pi_prox(a_t) / mu(a_t), cap) per token, 0 on padding; no gradient. Inputs (B, T).
    Stats (detached 0-dim tensors over real tokens): mean, max and min of the untruncated weight, the
    fraction of tokens truncated, and the mean |log pi_prox - log mu| (the log-prob gap)."""
    log_w = _zero_padding(prox_logprobs - behaviour_logprobs, mask)
    raw = torch.exp(log_w)
    weights = _zero_padding(torch.clamp(raw, max=cap), mask)
    real = mask.bool()
    stats = {
        "is_weight_mean": masked_mean(raw, mask),
        "is_weight_max": raw[real].max() if real.any() else torch.ones(()),
        "is_weight_min": raw[real].min() if real.any() else torch.ones(()),
        "is_truncated_frac": masked_mean((raw > cap).to(raw.dtype), mask),
        "logprob_gap": masked_mean(log_w.abs(), mask),
    }
    return weights, stats


@torch.no_grad()
def weighted_kl(prox_logprobs: Tensor, ref_logprobs: Tensor, weights: Tensor, mask: Tensor) -> Tensor:
    """(B,) KL(pi_prox || pi_ref) of each response estimated from tokens sampled from mu: the sum over its
    tokens of w_t * k1_t. E_mu[(pi/mu) (log pi - log pi_ref)] = KL(pi || pi_ref) at every state, while the
    unweighted k1 averages log pi - log pi_ref under mu, another policy's tokens (and can even go negative)."""
    return (_zero_padding(weights * kl_k1(prox_logprobs, ref_logprobs), mask)).sum(-1)


# --- rewards and advantages --------------------------------------------------------------------


@torch.no_grad()
def shaped_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: a KL penalty on every real token plus the sequence score on the last one.

    r_t = -kl_coef * KL_t, and r_T += score, as in Ziegler et al. 2019 (eq. 2) and InstructGPT
    (Ouyang et al. 2022, eq. 2): the reward model judges only the whole response, while the penalty
    keeps each token near the reference policy. k1 is the estimator both papers use. `logprobs` are
    the proximal policy's; off-policy, the loss weights each token's advantage by w_t, which makes the
    expected penalty KL(pi_prox || pi_ref) (see `weighted_kl`). scores are (B,), the others (B, T).
    Returns (rewards, kl), both (B, T) and 0 on padding.
    """
    kl = _zero_padding(kl_k1(logprobs, ref_logprobs), mask)
    return token_rewards(scores, kl, mask, kl_coef), kl


@torch.no_grad()
def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """`shaped_rewards` from a per-token KL (B, T) already computed: -kl_coef * KL_t on every real token, the
    score (B,) added on the last one; 0 on padding."""
    rewards = -kl_coef * _zero_padding(kl, mask)
    # The last real token: the last column the mask holds (right padding puts it at length - 1; in a
    # conversation the environment's messages sit between the policy's tokens); an empty row gets no score.
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device).expand_as(mask)
    last = ((mask > 0) * positions).amax(dim=1, keepdim=True).clamp(min=1) - 1
    score = torch.where(mask.sum(dim=1) > 0, scores.to(rewards.dtype), 0.0).unsqueeze(1)
    return rewards.scatter_add(1, last, score)


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


# --- critic-free advantages --------------------------------------------------------------------
# `groups` (B,) says which rows answer the same prompt. RLOO and REINFORCE++ take the per-token rewards of
# `shaped_rewards` (the score on the last token, -kl_coef * KL_t on every token), as their papers put the KL
# penalty in the reward. GRPO normalises the scores alone: a group's KL differences are not a reward to be
# scaled to unit size (with tied scores they would be all its advantage), so the KL stays apart at its own
# coefficient, in the loss (the paper) or as its return added after the normalisation (`kl_penalty_returns`).


def _group_mean(x: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """(mean of x over each row's group, the group's size), both (B,)."""
    _, index, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=x.dtype, device=x.device).index_add_(0, index, x)
    size = counts.to(x.dtype)[index]
    return sums[index] / size, size


def _check_groups(groups: Tensor, estimator: str) -> None:
    sizes = torch.unique(groups, return_counts=True)[1]
    if (sizes < 2).any():
        raise ValueError(f"{estimator} compares the responses to one prompt with each other and needs at least 2 "
                         f"per prompt, got groups of {sorted(set(sizes.tolist()))}; set "
                         f"generation.samples_per_prompt >= 2")


@torch.no_grad()
def grpo_advantages(scores: Tensor, mask: Tensor, groups: Tensor, std_norm: bool = True,
                    eps: float = 1e-6) -> Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath, eq. 3 with outcome supervision): each response's score (B,) less
    its group's mean, divided by the group's standard deviation (unbiased, + eps) when `std_norm`. Dividing by
    the std weighs prompts whose responses hardly differ (nearly all good or all bad) as much as contested
    ones; Liu et al. 2025 (Dr. GRPO) drop it (`std_norm=False`). A group whose scores tie gets 0.
    Returns (B, T): the row's advantage on each of its real tokens (`mask` (B, T)), 0 on padding."""
    _check_groups(groups, "GRPO")
    mean, size = _group_mean(scores, groups)
    advantage = scores - mean
    if std_norm:
        var, _ = _group_mean(advantage ** 2, groups)
        advantage = advantage / (torch.sqrt(var * size / (size - 1)) + eps)
    return _zero_padding(advantage.unsqueeze(1).expand_as(mask).to(mask.dtype), mask)


@torch.no_grad()
def returns_to_go(rewards: Tensor, mask: Tensor) -> Tensor:
    """Each token's return with gamma = 1: the sum of the row's per-token rewards from it to the end (B, T),
    0 on padding."""
    return _zero_padding(rewards, mask).flip(1).cumsum(1).flip(1) * mask


@torch.no_grad()
def kl_penalty_returns(kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """-kl_coef * (the KL of this token and every later one of the row), (B, T): the KL penalty's share of each
    token's advantage when it is kept in the reward of an estimator that normalises the scores alone (as
    OpenRLHF adds it to GRPO's group-normalised scores). A token answers for the KL it and its successors
    cause, not for the tokens before it."""
    return returns_to_go(-kl_coef * kl, mask)


@torch.no_grad()
def rloo_advantages(rewards: Tensor, mask: Tensor, groups: Tensor) -> Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): each response's sequence reward less the mean of
    the other responses to the same prompt, an unbiased baseline (it does not depend on the response it
    judges). Returns (B, T): the row's advantage on each of its real tokens, 0 on padding."""
    _check_groups(groups, "RLOO")
    seq = _zero_padding(rewards, mask).sum(-1)
    mean, size = _group_mean(seq, groups)
    others = (mean * size - seq) / (size - 1)
    return _zero_padding((seq - others).unsqueeze(1).expand_as(mask).to(rewards.dtype), mask)


@torch.no_grad()
def reinforce_pp_advantages(rewards: Tensor, mask: Tensor) -> Tensor:
    """REINFORCE++ (Hu 2025): each token's return, the sum of the per-token rewards from it to the end
    (gamma = 1, so the KL penalty of every later token counts), normalised to mean 0, std 1 over the
    whole batch's tokens; no critic and no groups. Returns (B, T), 0 on padding."""
    return masked_whiten(returns_to_go(rewards, mask), mask)


# --- losses ------------------------------------------------------------------------------------


def _token_mean(per_token: Tensor, mask: Tensor, horizon: int | None) -> Tensor:
    return masked_mean(per_token, mask)


def _seq_mean_token_mean(per_token: Tensor, mask: Tensor, horizon: int | None) -> Tensor:
    return masked_mean(per_token, mask, dim=1).mean()


def _seq_mean_token_sum_norm(per_token: Tensor, mask: Tensor, horizon: int | None) -> Tensor:
    return _zero_padding(per_token, mask).sum() / (per_token.shape[0] * (horizon or per_token.shape[1]))


# How a loss weighs the tokens of a batch:
#   token_mean: the mean over all real tokens of the batch (every token weighs the same);
#   seq_mean_token_mean: each response's token mean, then the mean over responses (GRPO as published: a
#     token of a short response weighs more than one of a long response);
#   seq_mean_token_sum_norm: each response's token sum, over responses x `horizon` (the longest a response
#     may be; Dr. GRPO, Liu et al. 2025: a constant, so no length bias).
AGGREGATIONS = {"token_mean": _token_mean, "seq_mean_token_mean": _seq_mean_token_mean,
                "seq_mean_token_sum_norm": _seq_mean_token_sum_norm}


def aggregate(per_token: Tensor, mask: Tensor, mode: str = "token_mean", horizon: int | None = None) -> Tensor:
    """A loss from per-token terms (B, T), as `mode` (a key of AGGREGATIONS) weighs the tokens."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}: {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[mode](per_token, mask, horizon)


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float,
    weights: Tensor | None = None, agg: str = "token_mean", horizon: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), negated to be minimised; with `weights`, the
    decoupled form of Hilton et al. 2022.

    L = mean_t w_t * max(-A_t * rho_t, -A_t * clip(rho_t, 1 - clip, 1 + clip)), rho_t = pi / pi_old,
    averaged over all real tokens of the batch (or as `agg` says: `aggregate`). `old_logprobs` are the
    proximal policy's; `weights`
    (w_t = pi_prox / mu, truncated: `truncated_importance_weights`) correct for the tokens having been
    sampled from the behaviour policy mu; None means w_t = 1, on-policy PPO. The weight is positive, so
    it multiplies the max of both terms as it would each. All inputs (B, T). Stats are detached 0-dim
    tensors (reading them with .item() is left to the logger, to avoid a device sync here):
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
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * _zero_padding(weights, mask).detach()
    loss = aggregate(per_token, mask, agg, horizon)
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


# --- reward normalisation ----------------------------------------------------------------------


class RunningMoments:
    """Running mean and standard deviation of every score seen, for normalising a learned reward model's
    arbitrary scale (Ziegler et al. 2019 normalise their reward model to mean 0, std 1), which would
    otherwise make the KL coefficient's meaning depend on the reward model. Batches merge exactly
    (Chan et al. 1979's parallel variance), so the result does not depend on how scores were batched."""

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    def update(self, x: Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        x = x.double()
        batch_mean = x.mean().item()
        batch_m2 = ((x - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """Population standard deviation; 1 until two scores have been seen."""
        return (self.m2 / self.count) ** 0.5 if self.count > 1 else 1.0

    def normalise(self, x: Tensor) -> Tensor:
        return (x - self.mean) / max(self.std, 1e-6)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


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
