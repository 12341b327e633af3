"""The whole job on Ray with the tiny model and real vLLM: two generation workers, the reward server,
the reference actor and the learner run several PPO steps; policy versions advance, the staleness
bound holds, and the checkpoint loads in transformers."""

import json

import pytest

from core.config import load_config
from tests.helpers import TINY, run

pytestmark = pytest.mark.ray

# the third: the learner holds the reference and takes the workers' log-probs for its own (no forward
# pass of its own before the update, no reference actor, no reference stage)
# the fourth: a new version reaches the workers while their requests are in flight
@pytest.mark.parametrize("staleness,options", [
    (0, ()), (1, ()),
    (0, ("reference.placement=learner", "ppo.advantage=reinforce_pp", "ppo.old_logprobs=behaviour")),
    (1, ("generation.inflight_updates=true",))])
def test_ppo_steps_advance_versions_within_the_staleness_bound(ray_session, tmp_path, staleness, options):
    # evaluated at another temperature than sampled at: the reference is scored at the evaluation's
    summary, steps = run(tmp_path, "train.steps=4", f"train.max_staleness={staleness}", "train.eval_temperature=0.7",
                         *options)
    assert summary["policy_version"] == 4
    updates = [s for s in steps if s["step"] > 0]
    assert [s["version/learner"] for s in updates] == [1, 2, 3, 4]
    assert all(s["version/lag_max"] <= staleness for s in updates)
    if staleness == 0:
        assert all(s["version/lag_mean"] == 0 for s in updates)
    # every batch is full, scored and penalised: a real update ran on it, with the off-policy weights
    assert all(s["learner/tokens"] > 0 and s["loss/total"] == s["loss/total"] for s in updates)
    assert all(0 < s["offpolicy/is_weight_mean"] < 10 and s["offpolicy/logprob_gap"] >= 0 for s in updates)
    # the step's three blocks and the stream's stages, wall-clock
    for s in updates:
        assert s["timing/take"] + s["timing/update"] + s["timing/publish"] <= s["timing/step"] + 1e-6
        assert 0 <= s["timing/generate"] <= s["timing/step"] and 0 <= s["timing/score"] <= s["timing/step"]
        assert 0 <= s["timing/reference"] <= s["timing/step"] and 0 <= s["version/mixed_frac"] <= 1
        if staleness == 0:  # each step waits for its own rollouts
            assert (s["timing/reference"] > 0) == ("reference.placement=learner" not in options)
    # running ahead (staleness 1), a step may train on rollouts scored during the one before
    assert sum(s["timing/generate"] for s in updates) > 0 and sum(s["timing/score"] for s in updates) > 0
    reference_time = sum(s["timing/reference"] for s in updates)
    assert (reference_time > 0) == ("reference.placement=learner" not in options)
    # before training the policy is the reference: both float32 here, at the same temperature, so KL ~ 0
    assert abs(steps[0]["eval/kl_mean"]) < 0.05
    assert "eval/gold_reward_mean" in steps[0] and "eval/gold_reward_mean" in updates[-1]
    # the proxy is the reward server's score of the same held-out samples: VADER here, so equal to gold
    assert steps[0]["eval/proxy_reward_mean"] == pytest.approx(steps[0]["eval/gold_reward_mean"])
    assert summary["stream/rollouts_scored"] >= 4 * 8


def test_checkpoint_loads_in_transformers_and_vllm(ray_session, tmp_path):
    import ray
    from transformers import AutoModelForCausalLM

    from actors.generation import GenerationWorker

    summary, _ = run(tmp_path, "train.steps=1")
    model = AutoModelForCausalLM.from_pretrained(summary["checkpoint"])
    assert model.config.model_type == "llama"
    cfg = load_config(TINY)
    worker = ray.remote(GenerationWorker).remote("checkpoint", summary["checkpoint"], cfg.generation)
    assert ray.get(worker.generate.remote([(0, [1, 2, 3])], 1))[0].response_ids
    ray.kill(worker)
    assert (tmp_path / "checkpoint" / "value_head.pt").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["policy_version"] == 1
