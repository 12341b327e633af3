"""Ratings by hand: Bradley-Terry on the Elo scale, its bootstrap intervals, the win-rate matrix."""

import math

import numpy as np
import pytest

from reward_server.ratings import bootstrap_intervals, bradley_terry, win_rates

pytestmark = pytest.mark.pure


def test_two_players_rating_gap_is_the_log_odds_of_their_record():
    matches = [(0, 1, 0.0)] * 3 + [(0, 1, 1.0)]  # player 1 won 3 of 4
    ratings = bradley_terry(matches, 2, prior=0.0)
    assert ratings[0] == 1000.0
    assert ratings[1] - ratings[0] == pytest.approx(400 * math.log10(3), abs=1e-6)


def test_consistent_records_give_additive_gaps_whatever_the_order():
    # 1 beats 0 at odds 3:1, 2 beats 1 at odds 3:1 and 0 at 9:1: Bradley-Terry's gaps add up
    matches = [(1, 0, 1.0)] * 3 + [(1, 0, 0.0)] + [(2, 1, 1.0)] * 3 + [(2, 1, 0.0)] + \
              [(2, 0, 1.0)] * 9 + [(2, 0, 0.0)]
    gap = 400 * math.log10(3)
    for order in (matches, matches[::-1]):
        assert bradley_terry(order, 3, prior=0.0) == pytest.approx([1000, 1000 + gap, 1000 + 2 * gap], abs=1e-4)


def test_a_probability_judge_counts_shares_and_an_unbeaten_player_stays_finite():
    assert bradley_terry([(0, 1, 0.75)] * 4, 2, prior=0.0)[1] == pytest.approx(1000 - 400 * math.log10(3))
    unbeaten = bradley_terry([(0, 1, 1.0)] * 5, 2)
    assert np.isfinite(unbeaten).all() and unbeaten[1] < 1000 - 400


def test_win_rates_and_bootstrap_intervals():
    matches = [(0, 1, 1.0), (0, 1, 0.0), (1, 0, 0.5), (0, 2, 1.0)]
    rates = win_rates(matches, 3)
    assert rates[0, 1] == pytest.approx(0.5) and rates[1, 0] == pytest.approx(0.5) and rates[0, 2] == 1.0
    assert math.isnan(rates[1, 2])
    lots = [(1, 0, 1.0)] * 60 + [(1, 0, 0.0)] * 20
    low, high = bootstrap_intervals(lots, 2, rounds=100)[1]
    point = bradley_terry(lots, 2)[1]
    assert low < point < high and 1050 < low and high < 1350  # 3:1 odds is 191 points above the anchor
    assert bootstrap_intervals(lots, 2, rounds=100)[0] == pytest.approx([1000, 1000])  # the anchor


def test_judges_decide_matches_and_a_bad_pairwise_answer_is_named(tmp_path, monkeypatch):
    import sys

    from reward_server.ratings import make_judge, play
    from reward_server.scorers import ScoringError

    prompts = ["My bus was late.", "It rained."]
    responses = [["Awful.", "Lovely rain!"], ["A calm moment, wonderful.", "Sad."], ["Fine.", "Fine."]]
    matches = play(prompts, responses, make_judge("gold", gold="vader", reward="vader"))
    # VADER: player 1 wins prompt 0 against 0 and 2, player 0 wins prompt 1 against 1, ties are halves
    assert [(i, j) for i, j, _ in matches] == [(0, 1), (0, 1), (0, 2), (0, 2), (1, 2), (1, 2)]
    assert [s for _, _, s in matches] == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert len(play(prompts, responses, make_judge("vader", "vader", "vader"), against=2)) == 4

    (tmp_path / "judges.py").write_text("def longer(prompt, a, b):\n    return float(len(a) > len(b))\n"
                                        "def broken(prompt, a, b):\n    return 1.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("judges", None)
    assert [s for *_, s in play(prompts, responses[:2], make_judge("pairwise:judges:longer", "vader", "vader"))] == \
        [0.0, 1.0]
    with pytest.raises(ScoringError, match=r"pairwise judge judges:broken returned 1.5 for match 0 .* in \[0, 1\]"):
        play(prompts, responses[:2], make_judge("pairwise:judges:broken", "vader", "vader"))


def test_a_lone_policy_is_at_the_anchor():
    assert bradley_terry([], 1).tolist() == [1000.0]
