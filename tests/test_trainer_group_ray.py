"""A policy stage on two ranks (learner/trainer_group.py) with the tiny model: FSDP2 shards the model and ILQL's
heads over two Ray actors joined by gloo, each takes its share of a batch, and the gradient they make together
is the one-process gradient of the whole batch, for replies of different lengths and a batch that does not
split evenly."""

from functools import partial

import pytest
import torch

from core.config import ILQLConfig
from learner.ilql import ILQLTrainer
from learner.learner_group import all_answers
from learner.trainer_group import _named_parameters, start_ranks, stop_ranks

pytestmark = pytest.mark.ray


def test_two_ranks_make_the_whole_batchs_gradient(ray_session):
    from cluster.models import prepare_tiny

    path = str(prepare_tiny())
    cfg = ILQLConfig(heads="linear", autocast="none", threads=1, num_learners=2)  # MLP: tests/test_ilql_ray.py
    # three replies of 2, 5 and 3 tokens: rank 0 takes the first and the third (5 tokens), rank 1 the second (5)
    batch = [([1, 5, 9], [20, 21], 1.0), ([1, 6], [22, 23, 24, 25, 2], -0.5), ([1, 7, 7], [30, 31, 2], 0.25)]
    local = ILQLTrainer(path, cfg)
    with torch.no_grad():  # heads that are not zero, so that every part of the loss has a gradient
        for p in local.heads.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    local.heads.sync_targets(1.0)
    ranks = start_ranks(partial(ILQLTrainer, path, cfg), cfg)
    try:
        all_answers([rank.load_full_state.remote(local.full_state()) for rank in ranks])
        grouped = all_answers([rank.gradients.remote(batch) for rank in ranks])[0]
        last = all_answers([rank.gradients.remote(batch[:1]) for rank in ranks])[0]  # rank 1 has no example
    finally:
        stop_ranks(ranks)

    def gradients(examples):
        local.optimizer.zero_grad(set_to_none=True)
        local.backward(examples)
        return {name: p.grad for name, p in _named_parameters(local) if p.grad is not None}

    for ours, theirs in [(gradients(batch), grouped), (gradients(batch[:1]), last)]:
        assert set(ours) == set(theirs) and any("heads.qs" in name for name in ours)
        for name, grad in ours.items():
            torch.testing.assert_close(theirs[name], grad, atol=2e-6, rtol=1e-4, msg=name)
