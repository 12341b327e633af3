"""The staleness metrics count tokens: a reply sampled across an in-flight weight update holds tokens of two
versions, and each token is as old as the version that sampled it."""

import pytest

from core.rollout import Rollout
from learner.train import version_lags

pytestmark = pytest.mark.pure


def rollout(version, tokens, token_versions=None):
    return Rollout(prompt_index=0, prompt_ids=[1], response_ids=[5] * tokens, text="", logprobs=[-1.0] * tokens,
                   version=version, worker="w", finished=True, token_versions=token_versions)


def test_lags_are_per_token_and_a_mixed_reply_counts_each_of_its_versions():
    # trained at version 5: a reply all of version 4 (lag 1, 2 tokens), one of versions 3 then 4 (lags 2, 2, 1, 1)
    rollouts = [rollout(4, 2), rollout(3, 4, [3, 3, 4, 4])]
    assert rollouts[1].versions() == [3, 3, 4, 4] and rollouts[0].versions() == [4, 4]
    assert version_lags(rollouts, 5) == {"version/lag_mean": 8 / 6, "version/lag_max": 2, "version/mixed_frac": 0.5}


def test_on_policy_replies_have_no_lag():
    assert version_lags([rollout(2, 3), rollout(2, 1)], 2) == {"version/lag_mean": 0.0, "version/lag_max": 0,
                                                                 "version/mixed_frac": 0.0}
