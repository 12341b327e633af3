"""West-of-N pair selection (Pace et al. 2024, "West-of-N: Synthetic Preferences for Self-Improving
Reward Models", arXiv 2401.12086).

For an unlabelled prompt, N responses sampled from the policy are scored by the current reward model;
the best and the worst of them form a synthetic preference pair. Two filters from the paper keep the
pairs trustworthy: a confidence filter (keep pairs whose predicted preference probability
sigmoid(r_best - r_worst) is in the top quantiles) and an in-distribution filter (drop responses the
policy itself finds unlikely, whose reward-model scores are least reliable). Pure functions only;
sampling and scoring happen in `cluster/commands/west_of_n.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.preferences import PreferencePair


@dataclass
class Candidate:
    text: str  # a sampled response
    reward: float  # its score under the current reward model
    mean_logprob: float  # mean per-token log-prob under the policy that sampled it


def mean_logprob(rollout) -> float:
    """Mean per-token log-prob of a response (an `core.rollout.Rollout`) under the policy that sampled it."""
    return sum(rollout.logprobs) / max(1, len(rollout.logprobs))


def preference_probability(best: float, worst: float) -> float:
    """Bradley-Terry P(best > worst) = sigmoid(r_best - r_worst)."""
    return 1.0 / (1.0 + math.exp(-(best - worst)))


def best_and_worst(candidates: list[Candidate], min_logprob: float) -> tuple[Candidate, Candidate] | None:
    """The highest- and lowest-reward candidates among those with mean log-prob >= `min_logprob`;
    None when fewer than two remain or all remaining rewards are equal (no preference to learn)."""
    kept = [c for c in candidates if c.mean_logprob >= min_logprob]
    if len(kept) < 2:
        return None
    # max/min keep the first of equal rewards, so a fixed sample order gives a fixed pair
    best = max(kept, key=lambda c: c.reward)
    worst = min(kept, key=lambda c: c.reward)
    if best.reward == worst.reward or best.text == worst.text:
        return None
    return best, worst


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of `values` with linear interpolation (numpy's default)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def select_pairs(groups: list[tuple[object, list[Candidate]]], quantile_cut: float,
                 min_logprob: float) -> tuple[list[PreferencePair], dict]:
    """West-of-N pairs from (prompt, candidates) groups, after both filters; also counts of what was
    dropped. `quantile_cut` = 0 and `min_logprob` = -inf switch the filters off."""
    chosen: list[tuple[PreferencePair, float]] = []
    no_pair = 0
    for prompt, candidates in groups:
        picked = best_and_worst(candidates, min_logprob)
        if picked is None:
            no_pair += 1
            continue
        best, worst = picked
        chosen.append((PreferencePair(prompt=prompt, chosen=best.text, rejected=worst.text),
                       preference_probability(best.reward, worst.reward)))
    threshold = quantile([p for _, p in chosen], quantile_cut) if chosen and quantile_cut > 0 else -math.inf
    pairs = [pair for pair, p in chosen if p >= threshold]
    low = sum(c.mean_logprob < min_logprob for _, candidates in groups for c in candidates)
    stats = {"west_of_n/prompts": len(groups), "west_of_n/low_likelihood_responses": low,
             "west_of_n/no_pair": no_pair,
             "west_of_n/below_confidence": len(chosen) - len(pairs), "west_of_n/pairs": len(pairs),
             "west_of_n/confidence_threshold": threshold}
    return pairs, stats
