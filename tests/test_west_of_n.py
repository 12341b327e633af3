"""West-of-N pair selection and its two filters, gold labelling of generated pairs and Best-of-N picks,
against values worked out by hand."""

import math

import numpy as np
import pytest

from cluster.pipeline import flip_labels, label_pairs, pick_best
from core.preferences import PreferencePair
from core.prompts import Prompt
from core.rollout import Rollout
from reward_server.west_of_n import Candidate, best_and_worst, preference_probability, quantile, select_pairs

pytestmark = pytest.mark.pure


def c(text, reward, logprob=-1.0):
    return Candidate(text=text, reward=reward, mean_logprob=logprob)


def test_best_and_worst_of_n_by_reward():
    best, worst = best_and_worst([c("x", 0.1), c("y", 0.9), c("z", -0.4), c("w", 0.2)], min_logprob=-math.inf)
    assert (best.text, worst.text) == ("y", "z")


def test_likelihood_filter_drops_unlikely_responses_before_picking():
    # "y" has the top reward but the policy finds it unlikely (mean log-prob -5 < -3): "w" wins instead
    best, worst = best_and_worst([c("x", 0.1), c("y", 0.9, -5.0), c("z", -0.4), c("w", 0.2)], min_logprob=-3.0)
    assert (best.text, worst.text) == ("w", "z")


@pytest.mark.parametrize("candidates", [
    [c("x", 0.1), c("y", 0.9, -9.0)],  # one left after the likelihood filter
    [c("x", 0.5), c("y", 0.5)],  # equal rewards: no preference
    [c("same", 0.1), c("same", 0.7)],  # equal texts
])
def test_no_pair_when_nothing_to_prefer(candidates):
    assert best_and_worst(candidates, min_logprob=-3.0) is None


def test_preference_probability_is_bradley_terry():
    assert preference_probability(1.0, 1.0) == 0.5
    assert preference_probability(2.0, 0.0) == pytest.approx(1 / (1 + math.exp(-2)))  # 0.8808


def test_quantile_matches_numpy():
    values = [0.3, 0.9, 0.5, 0.7, 0.6]
    for q in (0.0, 0.25, 0.5, 0.9, 1.0):
        assert quantile(values, q) == pytest.approx(np.quantile(values, q))


def test_confidence_filter_keeps_pairs_at_or_above_the_quantile():
    groups = [("p1", [c("a", 2.0), c("b", 0.0)]),  # margin 2.0 -> P = 0.881
              ("p2", [c("a", 0.5), c("b", 0.0)]),  # margin 0.5 -> P = 0.622
              ("p3", [c("a", 1.0), c("b", 0.0)]),  # margin 1.0 -> P = 0.731
              ("p4", [c("a", 0.1), c("b", 0.1)])]  # tie: no pair
    pairs, stats = select_pairs(groups, quantile_cut=0.5, min_logprob=-math.inf)
    # median of (0.881, 0.622, 0.731) is 0.731: p1 and p3 stay
    assert [p.prompt for p in pairs] == ["p1", "p3"]
    assert (pairs[0].chosen, pairs[0].rejected) == ("a", "b")
    assert stats["west_of_n/no_pair"] == 1 and stats["west_of_n/below_confidence"] == 1
    assert stats["west_of_n/confidence_threshold"] == pytest.approx(preference_probability(1.0, 0.0))


def test_filters_off_keeps_every_pair():
    groups = [("p1", [c("a", 2.0), c("b", 0.0, -9.0)]), ("p2", [c("a", 0.5), c("b", 0.0)])]
    pairs, stats = select_pairs(groups, quantile_cut=0.0, min_logprob=-math.inf)
    assert len(pairs) == 2 and stats["west_of_n/low_likelihood_responses"] == 0
    pairs, stats = select_pairs(groups, quantile_cut=0.0, min_logprob=-4.0)
    assert [p.prompt for p in pairs] == ["p2"] and stats["west_of_n/low_likelihood_responses"] == 1


class Lookup:
    """A labeller for the test: the score is given per response text."""

    def __init__(self, scores):
        self.scores = scores

    def score(self, prompts, responses):
        return [self.scores[r] for r in responses]


def rollout(text):
    return Rollout(prompt_index=0, prompt_ids=[1], response_ids=[2], text=text, logprobs=[-1.0], version=0,
                   worker="w", finished=True)


def test_label_pairs_prefers_the_higher_score_and_drops_ties():
    scores = {f"r{i}": float(i) for i in range(40)}
    scores["tie"] = 0.01
    prompts = [Prompt(i, f"prompt {i}", [1]) for i in range(21)]
    groups = [[rollout(f"r{2 * i + 1}"), rollout(f"r{2 * i}")] for i in range(20)] + [[rollout("r0"), rollout("tie")]]
    pairs, extra, ties = label_pairs(prompts, groups, Lookup(scores), min_margin=0.05)
    assert ties == 1 and len(pairs) == 20
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs[:2]] == [("prompt 0", "r1", "r0"), ("prompt 1", "r3", "r2")]
    assert extra[1] == {"chosen_score": 3.0, "rejected_score": 2.0, "flipped": False, "chosen_finished": True,
                        "rejected_finished": True}


def test_flip_labels_swaps_exactly_the_fraction_reproducibly():
    pairs = [PreferencePair(f"p{i}", f"good{i}", f"bad{i}") for i in range(20)]
    extra = [{"chosen_score": 1.0, "rejected_score": 0.0, "flipped": False} for _ in pairs]
    assert flip_labels(pairs, extra, 0.25, seed=0) == 5
    flipped = [i for i, e in enumerate(extra) if e["flipped"]]
    assert len(flipped) == 5
    for i, (pair, e) in enumerate(zip(pairs, extra)):
        assert (pair.chosen, pair.rejected) == ((f"bad{i}", f"good{i}") if e["flipped"] else (f"good{i}", f"bad{i}"))
        assert (e["chosen_score"] < e["rejected_score"]) == e["flipped"]
    again = [PreferencePair(f"p{i}", f"good{i}", f"bad{i}") for i in range(20)]
    again_extra = [{"chosen_score": 1.0, "rejected_score": 0.0, "flipped": False} for _ in again]
    flip_labels(again, again_extra, 0.25, seed=0)
    assert [i for i, e in enumerate(again_extra) if e["flipped"]] == flipped


def test_pick_best_looks_only_at_the_first_n():
    scores = [[0.1, 0.5, 0.9, 0.2], [0.7, 0.1, 0.3, 0.8]]
    assert pick_best(scores, 1) == [0, 0]
    assert pick_best(scores, 2) == [1, 0]
    assert pick_best(scores, 4) == [2, 3]
