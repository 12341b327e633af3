"""Unit tests for learner/ppo_math.py against values worked out by hand in the comments.

Padding positions deliberately hold large, inf or NaN values: a result that depends on them fails.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from core.forward import logprobs_from_logits
from learner.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    aggregate,
    entropy_from_logits,
    gae,
    grpo_advantages,
    kl_k1,
    kl_k3,
    kl_penalty_returns,
    make_kl_controller,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    reinforce_pp_advantages,
    returns_to_go,
    rloo_advantages,
    shaped_rewards,
    truncated_importance_weights,
    value_loss,
    weighted_kl,
)

pytestmark = pytest.mark.pure

NAN, INF = float("nan"), float("inf")


def t(values):
    return torch.tensor(values, dtype=torch.float32)


# Two rows of lengths 3 and 1.
MASK_3_1 = t([[1, 1, 1], [1, 0, 0]])


# --- masked statistics -------------------------------------------------------------------------


def test_masked_mean_over_all_and_along_dims_ignores_padding():
    x = t([[1, 2, 3], [4, NAN, INF]])
    # Real tokens 1, 2, 3, 4: mean 10 / 4 = 2.5.
    assert_close(masked_mean(x, MASK_3_1), t(2.5))
    # Rows: (1 + 2 + 3) / 3 = 2 and 4 / 1 = 4.
    assert_close(masked_mean(x, MASK_3_1, dim=1), t([2.0, 4.0]))
    # Columns: (1 + 4) / 2 = 2.5, 2 / 1 = 2, 3 / 1 = 3.
    assert_close(masked_mean(x, MASK_3_1, dim=0), t([2.5, 2.0, 3.0]))


def test_masked_mean_of_empty_row_is_zero_not_nan():
    x = t([[1, 2], [NAN, NAN]])
    mask = t([[1, 1], [0, 0]])
    # Row 0: 3 / 2 = 1.5; row 1 has no real token.
    assert_close(masked_mean(x, mask, dim=1), t([1.5, 0.0]))


def test_masked_var_biased_and_unbiased():
    x = t([[1, 2, 3], [4, 100, -50]])
    # Mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5 over n = 4 tokens.
    # Biased 5 / 4 = 1.25; unbiased 5 / 3.
    assert_close(masked_var(x, MASK_3_1, unbiased=False), t(1.25))
    assert_close(masked_var(x, MASK_3_1), t(5.0 / 3.0))


def test_masked_var_unbiased_needs_two_tokens():
    with pytest.raises(ValueError, match="at least 2 real tokens"):
        masked_var(t([[1.0, 2.0]]), t([[1, 0]]))


def test_masked_whiten_pools_real_tokens_of_the_batch_and_zeroes_padding():
    x = t([[1, 2, 3], [4, 100, -50]])
    # Mean 2.5, unbiased variance 5 / 3, so whitened = (x - 2.5) * sqrt(3 / 5) = (x - 2.5) * 0.7745967:
    # -1.5 -> -1.1618950, -0.5 -> -0.3872983, 0.5 -> 0.3872983, 1.5 -> 1.1618950.
    expected = t([[-1.1618950, -0.3872983, 0.3872983], [1.1618950, 0.0, 0.0]])
    assert_close(masked_whiten(x, MASK_3_1), expected)


# --- KL to the reference and off-policy weights -----------------------------------------------


def test_kl_k1_is_the_log_ratio():
    assert_close(kl_k1(t([-1.0, -2.0]), t([-2.0, -1.0])), t([1.0, -1.0]))


def test_truncated_importance_weights_and_their_stats():
    mask = t([[1, 1, 1, 0]])
    prox = t([[-1.0, -2.0, -0.5, NAN]])
    behaviour = t([[-1.5, -1.0, -0.5, INF]])
    weights, stats = truncated_importance_weights(prox, behaviour, mask, cap=1.5)
    # log w = prox - behaviour = [0.5, -1.0, 0.0]; w = [e^0.5, e^-1, 1] = [1.6487213, 0.3678794, 1.0];
    # truncated at 1.5: [1.5, 0.3678794, 1.0]; padding 0.
    assert_close(weights, t([[1.5, 0.3678794, 1.0, 0.0]]))
    # untruncated mean (1.6487213 + 0.3678794 + 1) / 3 = 1.0055336; max and min; 1 of 3 truncated;
    # mean |log w| = (0.5 + 1 + 0) / 3 = 0.5
    assert_close(stats["is_weight_mean"], t(1.0055336))
    assert_close(stats["is_weight_max"], t(1.6487213))
    assert_close(stats["is_weight_min"], t(0.3678794))
    assert_close(stats["is_truncated_frac"], t(1.0 / 3.0))
    assert_close(stats["logprob_gap"], t(0.5))
    assert not weights.requires_grad


def test_weighted_kl_recovers_the_kl_of_the_policy_from_another_policys_samples():
    """One step over a 3-token vocabulary: pi = [0.7, 0.2, 0.1], pi_ref = [0.4, 0.4, 0.2], and the tokens
    were sampled from mu = [0.2, 0.3, 0.5]. Each row is one sampled token; averaging a row's estimate under
    mu (weights mu) is the estimator's expectation."""
    pi, ref, mu = t([0.7, 0.2, 0.1]), t([0.4, 0.4, 0.2]), t([0.2, 0.3, 0.5])
    lp, ref_lp, mu_lp = pi.log()[:, None], ref.log()[:, None], mu.log()[:, None]  # (3 rows, 1 token)
    mask = torch.ones(3, 1)
    # True KL(pi || ref) = 0.7 ln(0.7/0.4) + 0.2 ln(0.5) + 0.1 ln(0.5) = 0.3917310 - 0.2079442 = 0.1837869.
    true_kl = 0.1837869
    # Unweighted k1 averages log pi - log ref under mu: 0.2 * 0.5596158 - 0.8 * 0.6931472 = -0.4425946.
    unweighted = weighted_kl(lp, ref_lp, mask, mask)
    assert_close((mu * unweighted).sum(), t(-0.4425946))
    # Weighted by pi / mu = [3.5, 0.6666667, 0.2] (cap above 3.5): exactly the true KL.
    weights, _ = truncated_importance_weights(lp, mu_lp, mask, cap=10.0)
    assert_close((mu * weighted_kl(lp, ref_lp, weights, mask)).sum(), t(true_kl))
    # Truncated at 2, the first weight is 2: 0.2 * 2 * 0.5596158 - (0.3 * 0.6666667 + 0.5 * 0.2) * 0.6931472
    # = 0.2238463 - 0.2079442 = 0.0159022: biased, but with a bounded weight.
    weights, _ = truncated_importance_weights(lp, mu_lp, mask, cap=2.0)
    assert_close((mu * weighted_kl(lp, ref_lp, weights, mask)).sum(), t(0.0159022))


def test_weighted_kl_sums_each_response_over_its_real_tokens():
    mask = t([[1, 1, 0], [1, 0, 0]])
    lp, ref_lp = t([[-1.0, -2.0, NAN], [-0.5, INF, 0.0]]), t([[-2.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    weights = t([[2.0, 0.5, NAN], [1.0, NAN, NAN]])
    # row 0: 2 * 1 + 0.5 * (-1) = 1.5; row 1: 1 * 0.5 = 0.5
    assert_close(weighted_kl(lp, ref_lp, weights, mask), t([1.5, 0.5]))


# --- shaped rewards ----------------------------------------------------------------------------


def test_shaped_rewards_penalise_kl_and_put_score_on_last_real_token():
    mask = t([[1, 1, 1], [1, 1, 0]])
    logprobs = t([[-1.0, -2.0, -0.5], [-0.3, -1.2, 5.0]])
    ref_logprobs = t([[-1.5, -1.0, -0.5], [-0.1, -1.0, -9.0]])
    scores = t([2.0, -1.0])
    rewards, kl = shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # k1 = logp - ref: row 0 [0.5, -1.0, 0.0]; row 1 [-0.2, -0.2, pad].
    assert_close(kl, t([[0.5, -1.0, 0.0], [-0.2, -0.2, 0.0]]))
    # -0.1 * kl: row 0 [-0.05, 0.1, 0.0], + score 2.0 on t=2 -> [-0.05, 0.1, 2.0];
    # row 1 [0.02, 0.02, pad], + score -1.0 on t=1 (its last real token) -> [0.02, -0.98, 0].
    assert_close(rewards, t([[-0.05, 0.1, 2.0], [0.02, -0.98, 0.0]]))


def test_shaped_rewards_give_an_empty_row_no_score():
    mask = t([[1, 0], [0, 0]])
    zeros = torch.zeros(2, 2)
    rewards, _ = shaped_rewards(t([3.0, 7.0]), zeros, zeros, mask, kl_coef=0.1)
    # Row 0 has one real token, which takes its score; row 1 has none, so 7.0 lands nowhere.
    assert_close(rewards, t([[3.0, 0.0], [0.0, 0.0]]))


# --- GAE ---------------------------------------------------------------------------------------


def test_gae_two_rows_of_different_lengths():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    mask = t([[1, 1, 1], [1, 1, 0]])
    rewards = t([[0.0, 0.0, 1.0], [0.1, 0.5, 9.0]])
    values = t([[0.5, 0.4, 0.2], [0.3, 0.6, 7.0]])
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    # Row 0 (length 3), V after t=2 is 0:
    #   t=2: delta = 1 + 0.9*0 - 0.2 = 0.8;              A = 0.8
    #   t=1: delta = 0 + 0.9*0.2 - 0.4 = -0.22;          A = -0.22 + 0.72*0.8 = 0.356
    #   t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14;          A = -0.14 + 0.72*0.356 = 0.11632
    # Row 1 (length 2), V after t=1 is 0, the padding's 9.0 and 7.0 are ignored:
    #   t=1: delta = 0.5 + 0.9*0 - 0.6 = -0.1;           A = -0.1
    #   t=0: delta = 0.1 + 0.9*0.6 - 0.3 = 0.34;         A = 0.34 + 0.72*(-0.1) = 0.268
    assert_close(advantages, t([[0.11632, 0.356, 0.8], [0.268, -0.1, 0.0]]))
    # returns = A + V: row 0 [0.61632, 0.756, 1.0]; row 1 [0.568, 0.5, 0 on padding].
    assert_close(returns, t([[0.61632, 0.756, 1.0], [0.568, 0.5, 0.0]]))


def test_gae_of_a_row_does_not_depend_on_how_much_padding_follows_it():
    rewards = t([[0.1, 0.5, 0.0, 0.0, 0.0]])
    values = t([[0.3, 0.6, 5.0, -5.0, 2.0]])
    long_mask = t([[1, 1, 0, 0, 0]])
    short_adv, short_ret = gae(rewards[:, :2], values[:, :2], long_mask[:, :2], 0.9, 0.8)
    long_adv, long_ret = gae(rewards, values, long_mask, 0.9, 0.8)
    # Same row as row 1 above: A = [0.268, -0.1].
    assert_close(short_adv, t([[0.268, -0.1]]))
    assert_close(long_adv, t([[0.268, -0.1, 0.0, 0.0, 0.0]]))
    assert_close(long_ret[:, :2], short_ret)


def test_gae_with_lambda_zero_is_the_one_step_td_error():
    # lam = 0: A_t = delta_t = r_t + gamma * V_{t+1} - V_t, gamma = 0.5.
    rewards = t([[1.0, 2.0]])
    values = t([[4.0, 6.0]])
    advantages, _ = gae(rewards, values, t([[1, 1]]), gamma=0.5, lam=0.0)
    # t=0: 1 + 0.5*6 - 4 = 0; t=1: 2 + 0.5*0 - 6 = -4.
    assert_close(advantages, t([[0.0, -4.0]]))


def test_gae_outputs_carry_no_gradient():
    values = t([[0.5, 0.4]]).requires_grad_()
    advantages, returns = gae(t([[0.0, 1.0]]), values, t([[1, 1]]), 0.9, 0.8)
    assert not advantages.requires_grad and not returns.requires_grad


# --- critic-free advantages --------------------------------------------------------------------

# Five responses: rows 0-2 answer one prompt (group 7), rows 3-4 another (group 3). Per-token rewards as
# shaped_rewards gives them (KL penalties, the score on the last token); padding holds NaN.
GROUP_REWARDS = t([[-0.1, -0.1, 1.2], [0.5, NAN, NAN], [2.0, NAN, NAN], [-0.5, -0.5, NAN], [0.0, 0.0, NAN]])
GROUP_MASK = t([[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]])
GROUPS = torch.tensor([7, 7, 7, 3, 3])
# sequence rewards (row sums): 1.0, 0.5, 2.0, -1.0, 0.0


def per_row(advantages: list[float]) -> torch.Tensor:
    """Each row's advantage on its real tokens, 0 on padding."""
    return t(advantages).unsqueeze(1) * GROUP_MASK


GROUP_SCORES = t([1.0, 0.5, 2.0, -1.0, 0.0])


def test_grpo_subtracts_the_group_mean_and_divides_by_the_group_std_when_asked():
    # group 7: mean 3.5 / 3; group 3: mean -0.5
    plain = grpo_advantages(GROUP_SCORES, GROUP_MASK, GROUPS, std_norm=False)
    assert_close(plain, per_row([-1 / 6, -2 / 3, 5 / 6, -0.5, 0.5]))
    # unbiased std: group 7 sqrt((1/36 + 16/36 + 25/36) / 2) = sqrt(7/12); group 3 sqrt(0.5)
    normed = grpo_advantages(GROUP_SCORES, GROUP_MASK, GROUPS, std_norm=True, eps=0.0)
    s7, s3 = (7 / 12) ** 0.5, 0.5 ** 0.5
    assert_close(normed, per_row([-1 / 6 / s7, -2 / 3 / s7, 5 / 6 / s7, -0.5 / s3, 0.5 / s3]))


def test_grpo_gives_a_tied_group_no_advantage_whatever_its_kl_and_keeps_the_kl_at_its_own_scale():
    """Scores 1, 1, 1, 1 with KL 0.2, 0.1, 0.0, 0.3 nats a token: normalising score - beta * KL would turn the
    KL differences into advantages of unit size; the scores alone tie, so the score advantage is 0 and only the
    penalty's return, beta times the KL to come, remains."""
    mask = torch.ones(4, 2)
    tied = grpo_advantages(t([1.0, 1.0, 1.0, 1.0]), mask, torch.tensor([0, 0, 0, 0]))
    assert_close(tied, torch.zeros(4, 2))
    kl = t([[0.2, 0.2], [0.1, 0.1], [0.0, 0.0], [0.3, 0.3]])
    assert_close(kl_penalty_returns(kl, mask, 0.05), -0.05 * t([[0.4, 0.2], [0.2, 0.1], [0.0, 0.0], [0.6, 0.3]]))
    # a mixed group by hand: scores 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3)
    mixed = grpo_advantages(t([1.0, 0.0, 0.0, 1.0]), mask, torch.tensor([0, 0, 0, 0]), eps=0.0)
    a = 0.5 / (1 / 3) ** 0.5
    assert_close(mixed, t([[a, a], [-a, -a], [-a, -a], [a, a]]))


def test_returns_to_go_sum_each_rows_rewards_from_each_token_to_its_end():
    assert_close(returns_to_go(GROUP_REWARDS, GROUP_MASK),
                 t([[1.0, 1.1, 1.2], [0.5, 0, 0], [2.0, 0, 0], [-1.0, -0.5, 0], [0.0, 0.0, 0]]))


def test_kl_k3_is_r_minus_1_minus_log_r_and_zero_where_the_policies_agree():
    # log pi = log 0.5, log pi_ref = log 0.25: r = 0.5, k3 = -0.5 + log 2
    assert kl_k3(t([math.log(0.5), -1.0]), t([math.log(0.25), -1.0])).tolist() == \
        pytest.approx([-0.5 + math.log(2.0), 0.0])


def test_rloo_subtracts_the_mean_of_the_other_responses_to_the_same_prompt():
    expected = [1.0 - (0.5 + 2.0) / 2, 0.5 - (1.0 + 2.0) / 2, 2.0 - (1.0 + 0.5) / 2, -1.0 - 0.0, 0.0 + 1.0]
    assert_close(rloo_advantages(GROUP_REWARDS, GROUP_MASK, GROUPS), per_row(expected))


def test_group_estimators_need_two_responses_per_prompt():
    for estimator in (grpo_advantages, rloo_advantages):
        with pytest.raises(ValueError, match=r"needs at least 2 per prompt, got groups of \[1, 2\]; set "
                                             r"generation.samples_per_prompt >= 2"):
            rewards = GROUP_SCORES[:3] if estimator is grpo_advantages else GROUP_REWARDS[:3]
            estimator(rewards, GROUP_MASK[:3], torch.tensor([7, 7, 3]))


def test_reinforce_pp_whitens_each_tokens_return_over_the_batch():
    # returns to the end of each row: 1.0 1.1 1.2 | 0.5 | 2.0 | -1.0 -0.5 | 0.0 0.0
    returns = t([1.0, 1.1, 1.2, 0.5, 2.0, -1.0, -0.5, 0.0, 0.0])
    whitened = (returns - returns.mean()) / (returns.var() + 1e-8).sqrt()
    expected = torch.zeros(5, 3)
    expected[GROUP_MASK.bool()] = whitened
    assert_close(reinforce_pp_advantages(GROUP_REWARDS, GROUP_MASK), expected)


# --- policy loss -------------------------------------------------------------------------------


def _policy_batch():
    # Ratios pi / pi_old of 1.5, 0.5, 1.1, 0.7 in row 0 and 1.3 in row 1 (one real token);
    # the padding ratio e^50 and advantage 1e6 would dominate anything they leaked into.
    mask = t([[1, 1, 1, 1], [1, 0, 0, 0]])
    old_logprobs = torch.full((2, 4), -1.0)
    ratios = t([[1.5, 0.5, 1.1, 0.7], [1.3, 1.0, 1.0, 1.0]])
    logprobs = old_logprobs + torch.log(ratios)
    logprobs[1, 1] = 49.0
    advantages = t([[1.0, 1.0, -2.0, -1.0], [-1.0, 1e6, 0.0, 0.0]])
    return logprobs, old_logprobs, advantages, mask


def test_loss_aggregation_weighs_tokens_as_each_mode_says():
    per_token = t([[1.0, 2.0, 3.0], [10.0, NAN, NAN]])  # rows of 3 and 1 tokens
    assert aggregate(per_token, MASK_3_1, "token_mean").item() == pytest.approx(16 / 4)
    assert aggregate(per_token, MASK_3_1, "seq_mean_token_mean").item() == pytest.approx((2.0 + 10.0) / 2)
    assert aggregate(per_token, MASK_3_1, "seq_mean_token_sum_norm", horizon=8).item() == pytest.approx(16 / (2 * 8))
    with pytest.raises(ValueError, match="unknown loss aggregation 'sum'"):
        aggregate(per_token, MASK_3_1, "sum")


def test_policy_loss_clipped_surrogate_and_stats():
    logprobs, old_logprobs, advantages, mask = _policy_batch()
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip=0.2)
    # Per token, unclipped = -A * r, clipped = -A * clamp(r, 0.8, 1.2), loss term = max of the two:
    #   r=1.5, A=+1: -1.5 vs -1.2 -> -1.2 (clipped is larger)
    #   r=0.5, A=+1: -0.5 vs -0.8 -> -0.5
    #   r=1.1, A=-2:  2.2 vs  2.2 ->  2.2 (inside the range, a tie, not counted as clipped)
    #   r=0.7, A=-1:  0.7 vs  0.8 ->  0.8 (clipped is larger)
    #   r=1.3, A=-1:  1.3 vs  1.2 ->  1.3
    # mean = (-1.2 - 0.5 + 2.2 + 0.8 + 1.3) / 5 = 2.6 / 5 = 0.52
    assert_close(loss, t(0.52))
    # 2 of 5 tokens take the clipped term.
    assert_close(stats["clip_frac"], t(0.4))
    # (1.5 + 0.5 + 1.1 + 0.7 + 1.3) / 5 = 5.1 / 5 = 1.02
    assert_close(stats["ratio_mean"], t(1.02))
    # k3 of KL(old || new) per token, (r - 1) - ln r:
    #   0.5 - 0.4054651 = 0.0945349;  -0.5 + 0.6931472 = 0.1931472;  0.1 - 0.0953102 = 0.0046898;
    #  -0.3 + 0.3566749 = 0.0566749;   0.3 - 0.2623643 = 0.0376357;  sum 0.3866826, / 5 = 0.0773365
    assert_close(stats["approx_kl"], t(0.0773365))
    assert all(not v.requires_grad for v in stats.values())


def test_policy_loss_gradient_vanishes_on_clipped_tokens_and_padding():
    logprobs, old_logprobs, advantages, mask = _policy_batch()
    logprobs.requires_grad_()
    loss, _ = policy_loss(logprobs, old_logprobs, advantages, mask, clip=0.2)
    loss.backward()
    # d(-A r)/d logp = -A r on unclipped tokens, divided by the 5 real tokens; 0 where clipped:
    #   r=1.5 clipped: 0;  r=0.5, A=1: -0.5/5 = -0.1;  r=1.1, A=-2: 2.2/5 = 0.44;
    #   r=0.7 clipped: 0;  r=1.3, A=-1: 1.3/5 = 0.26;  padding: 0.
    assert_close(logprobs.grad, t([[0.0, -0.1, 0.44, 0.0], [0.26, 0.0, 0.0, 0.0]]))


def test_decoupled_policy_loss_weights_each_tokens_term():
    logprobs, old_logprobs, advantages, mask = _policy_batch()
    logprobs.requires_grad_()
    weights = t([[2.0, 1.0, 0.5, 1.0], [0.25, NAN, NAN, NAN]])
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip=0.2, weights=weights)
    # The terms of the test above, [-1.2, -0.5, 2.2, 0.8 | 1.3], times the weights:
    # -2.4 - 0.5 + 1.1 + 0.8 + 0.325 = -0.675, over 5 real tokens = -0.135
    assert_close(loss, t(-0.135))
    assert_close(stats["clip_frac"], t(0.4))  # the clipping is of pi / pi_old, as without weights
    loss.backward()
    # Unclipped tokens: w * (-A r) / 5: -0.5 / 5 = -0.1; 0.5 * 2.2 / 5 = 0.22; 0.25 * 1.3 / 5 = 0.065.
    assert_close(logprobs.grad, t([[0.0, -0.1, 0.22, 0.0], [0.065, 0.0, 0.0, 0.0]]))


def test_policy_loss_at_the_old_policy_is_minus_the_mean_advantage():
    mask = t([[1, 1, 0]])
    logprobs = t([[-1.0, -2.0, NAN]])
    # ratio 1 everywhere: loss = -(3 + 1) / 2 = -2, nothing clipped, approx_kl 0.
    loss, stats = policy_loss(logprobs, logprobs, t([[3.0, 1.0, NAN]]), mask, clip=0.2)
    assert_close(loss, t(-2.0))
    assert_close(stats["clip_frac"], t(0.0))
    assert_close(stats["approx_kl"], t(0.0))
    assert_close(stats["ratio_mean"], t(1.0))


# --- value loss --------------------------------------------------------------------------------


def test_value_loss_clips_the_value_update():
    mask = t([[1, 1, 1], [1, 0, 0]])
    values = t([[1.5, 1.5, -0.1], [-1.0, 50.0, 50.0]])
    old_values = t([[1.0, 1.0, 0.0], [0.0, -50.0, -50.0]])
    returns = t([[2.0, 1.0, 0.5], [-2.0, 0.0, 0.0]])
    loss, stats = value_loss(values, old_values, returns, mask, clip=0.2)
    # v_clip = old + clamp(v - old, -0.2, 0.2); terms (v - R)^2 vs (v_clip - R)^2:
    #   v=1.5, old=1, R=2:    v_clip=1.2;  0.25 vs 0.64 -> 0.64 (clipped is larger)
    #   v=1.5, old=1, R=1:    v_clip=1.2;  0.25 vs 0.04 -> 0.25
    #   v=-0.1, old=0, R=0.5: v_clip=-0.1; 0.36 vs 0.36 -> 0.36 (a tie)
    #   v=-1, old=0, R=-2:    v_clip=-0.2; 1.00 vs 3.24 -> 3.24 (clipped is larger)
    # loss = 0.5 * (0.64 + 0.25 + 0.36 + 3.24) / 4 = 0.5 * 1.1225 = 0.56125
    assert_close(loss, t(0.56125))
    assert_close(stats["clip_frac"], t(0.5))


def test_value_loss_gradient_flows_only_through_unclipped_terms():
    values = t([[1.5, 1.5]]).requires_grad_()
    loss, _ = value_loss(values, t([[1.0, 1.0]]), t([[2.0, 1.0]]), t([[1, 1]]), clip=0.2)
    loss.backward()
    # Token 0 takes the clipped term, constant in v: 0. Token 1: d/dv 0.5 * (v - R)^2 / 2 tokens
    # = (1.5 - 1) / 2 = 0.25.
    assert_close(values.grad, t([[0.0, 0.25]]))


# --- distributions over the vocabulary ---------------------------------------------------------


def test_entropy_of_uniform_is_log_vocab_size_even_for_huge_logits():
    # V = 5: H = ln 5 = 1.6094379; shifting every logit by 1000 changes nothing but would overflow exp.
    logits = torch.stack([torch.zeros(5), torch.full((5,), 1000.0)])
    assert_close(entropy_from_logits(logits), t([1.6094379, 1.6094379]))


def test_entropy_of_a_known_distribution_and_of_a_masked_vocabulary():
    # p = [1/2, 1/4, 1/4]: H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2 = 1.0397208.
    skewed = torch.log(t([0.5, 0.25, 0.25]))
    # One logit at -inf leaves a uniform pair: H = ln 2 = 0.6931472.
    masked = t([0.0, 0.0, -INF])
    assert_close(entropy_from_logits(torch.stack([skewed, masked])), t([1.0397208, 0.6931472]))


def test_logprobs_from_logits_gathers_log_softmax_at_labels():
    # Position 0: logits ln[1, 1, 2] -> p = [1/4, 1/4, 1/2], label 2 -> ln 1/2 = -0.6931472.
    # Position 1: logits all 0 -> p = 1/3 each, label 0 -> ln 1/3 = -1.0986123.
    # Position 2: logits all 1000 (would overflow exp) -> p = 1/3 each, label 1 -> -1.0986123.
    logits = torch.stack(
        [torch.log(t([1.0, 1.0, 2.0])), torch.zeros(3), torch.full((3,), 1000.0)]
    ).unsqueeze(0)
    labels = torch.tensor([[2, 0, 1]])
    assert_close(logprobs_from_logits(logits, labels), t([[-0.6931472, -1.0986123, -1.0986123]]))


# --- reward normalisation ---------------------------------------------------------------------


def test_running_moments_merge_batches_exactly_and_normalise():
    moments = RunningMoments()
    assert moments.std == 1.0  # nothing seen: normalising leaves scores as they are
    moments.update(t([1.0, 2.0, 3.0]))
    moments.update(t([4.0, 5.0]))
    # 1..5: mean 3, population variance (4 + 1 + 0 + 1 + 4) / 5 = 2, std 1.4142136
    assert moments.count == 5 and moments.mean == pytest.approx(3.0)
    assert moments.std == pytest.approx(1.4142136)
    assert_close(moments.normalise(t([3.0, 5.0])), t([0.0, 1.4142136]))
    at_once = RunningMoments()
    at_once.update(t([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert at_once.std == pytest.approx(moments.std) and at_once.mean == pytest.approx(moments.mean)
    resumed = RunningMoments()
    resumed.load_state_dict(moments.state_dict())
    assert (resumed.count, resumed.mean, resumed.std) == (moments.count, moments.mean, moments.std)


# --- KL controllers ----------------------------------------------------------------------------


def test_adaptive_kl_controller_moves_toward_target_by_the_exact_multiplier():
    # target 6, horizon 10000, n_steps 256, so mult = 1 + e * 0.0256.
    up = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    up.update(current_kl=9.0, n_steps=256)
    # e = clip(9/6 - 1 = 0.5, -0.2, 0.2) = 0.2; mult = 1.00512; beta = 0.100512
    assert_close(up.value, 0.100512)

    down = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    down.update(current_kl=3.0, n_steps=256)
    # e = clip(3/6 - 1 = -0.5) = -0.2; mult = 0.99488; beta = 0.099488
    assert_close(down.value, 0.099488)

    near = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    near.update(current_kl=6.6, n_steps=256)
    # e = 6.6/6 - 1 = 0.1, inside the clip; mult = 1.00256; beta = 0.100256
    assert_close(near.value, 0.100256)

    near.update(current_kl=6.6, n_steps=256)
    # Multiplicative: 0.100256 * 1.00256 = 0.1005126554
    assert_close(near.value, 0.1005126554)


def test_kl_controller_state_round_trips():
    first = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    first.update(current_kl=9.0, n_steps=256)
    resumed = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    resumed.load_state_dict(first.state_dict())
    assert resumed.value == first.value
    first.update(current_kl=3.0, n_steps=256)
    resumed.update(current_kl=3.0, n_steps=256)
    assert resumed.value == first.value

    fixed = FixedKLController(0.05)
    fixed.load_state_dict({"value": 0.2})
    assert fixed.state_dict() == {"value": 0.2}


def test_fixed_kl_controller_ignores_updates():
    fixed = FixedKLController(0.05)
    fixed.update(current_kl=100.0, n_steps=256)
    assert fixed.value == 0.05


def test_make_kl_controller_picks_adaptive_only_with_a_target():
    adaptive = make_kl_controller(0.1, target=6.0, horizon=10000)
    assert isinstance(adaptive, AdaptiveKLController) and adaptive.value == 0.1
    fixed = make_kl_controller(0.1, target=0.0, horizon=10000)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.1


def test_adaptive_kl_controller_rejects_bad_settings():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10000)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=6.0, horizon=0)
