"""Multi-turn rollouts without Ray: the tokens between two replies are the chat template's own; what an
environment may return is checked and a bad answer named; and the estimators, the KL and the batch train on
the policy's tokens only when an environment's message sits between them (hand values)."""

import math

import pytest
import torch
from transformers import AutoTokenizer

from actors.conversation import next_turn_ids
from actors.environments import ComplainingPerson
from cluster.models import prepare_tiny
from core.config import ConfigError, build_config
from core.environment import EnvironmentFailure, Turn, checked_turn, load_environment
from core.prompts import encode
from core.rollout import Rollout, collate
from learner import ppo_math


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(prepare_tiny())


def test_turns_appended_to_sampled_tokens_are_the_templates_rendering_of_the_whole_conversation(tokenizer):
    conversation = [{"role": "user", "content": "My train was late."}, {"role": "assistant", "content": "Read!"},
                    {"role": "user", "content": "And then it rained."}, {"role": "assistant", "content": "Dance!"},
                    {"role": "user", "content": "And my bike broke."}]

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    built = encode([conversation[0]["content"]], tokenizer, 256)[0].token_ids  # the first prompt, as a worker does
    for reply, message in [("Read!", conversation[2]), ("Dance!", conversation[4])]:
        built += ids(reply) + [tokenizer.eos_token_id]  # a reply as sampled, ended by the policy itself
        built += next_turn_ids(tokenizer, message["content"], tokenizer.eos_token)
    whole = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert built == ids(whole)
    # a reply cut at the length limit did not sample its end-of-turn token: the template's closing comes first
    assert next_turn_ids(tokenizer, "Hm.", None)[0] == tokenizer.eos_token_id


@pytest.mark.parametrize("value,says", [
    ("fine", "returned str 'fine', not a core.environment.Turn"),
    (Turn(reward=math.nan, done=True), "the reward nan; a reward must be a finite number"),
    (Turn(message=" ", reward=0.0), "done=False with the message ' '"),
])
def test_a_malformed_step_is_named_with_its_environment_and_turn(value, says):
    with pytest.raises(EnvironmentFailure, match=f"environment E, turn 2: .*{says.replace('(', '.').replace(')', '.')}"):
        checked_turn(value, "environment E, turn 2")
    assert checked_turn(Turn("next", 0.5), "w").reward == 0.5


def test_an_environment_is_a_class_with_reset_and_step_refused_by_the_config_otherwise():
    assert load_environment("python:actors.environments:ComplainingPerson") is ComplainingPerson
    with pytest.raises(ValueError, match="not an environment class: it needs the methods reset"):
        load_environment("python:core.environment:checked_turn")
    with pytest.raises(ConfigError, match="environment.spec = 'python:nosuch:Env': cannot import module 'nosuch'"):
        build_config({"environment": {"spec": "python:nosuch:Env"}})
    with pytest.raises(ConfigError, match="Use a critic-free estimator"):
        build_config({"environment": {"spec": "python:actors.environments:ComplainingPerson"},
                      "ppo": {"advantage": "gae"}})


def test_the_example_person_complains_once_more_then_judges_the_replies_by_vader():
    person = ComplainingPerson()
    assert person.reset("My train was late.") == "My train was late."
    follow_up = person.step("What a chance to read!")
    assert not follow_up.done and follow_up.message.startswith("Thanks. But then my ")
    end = person.step("Wonderful, a great day!")
    assert end.done and end.message is None
    vader = person.analyzer.polarity_scores
    assert end.reward == pytest.approx((vader("What a chance to read!")["compound"]
                                        + vader("Wonderful, a great day!")["compound"]) / 2)


# Two conversations, 6 response columns: the policy's tokens (1) with the environment's message (0) between.
MASK = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0],
                     [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]])


def test_the_score_lands_on_the_last_token_the_policy_sampled_and_the_kl_on_its_tokens_only():
    kl = torch.full((2, 6), 0.5)
    rewards = ppo_math.token_rewards(torch.tensor([2.0, 3.0]), kl, MASK, kl_coef=0.1)
    expected = torch.tensor([[-0.05, -0.05, 0.0, 0.0, 1.95, 0.0],
                             [-0.05, 0.0, -0.05, 2.95, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    # REINFORCE++'s return of a token counts the rewards of the policy's later tokens, in later turns too
    returns = ppo_math.returns_to_go(rewards, MASK)
    torch.testing.assert_close(returns, torch.tensor([[1.85, 1.9, 0.0, 0.0, 1.95, 0.0],
                                                      [2.85, 0.0, 2.9, 2.95, 0.0, 0.0]]))
    weights = torch.ones(2, 6)
    torch.testing.assert_close(ppo_math.weighted_kl(torch.zeros(2, 6), torch.full((2, 6), -0.5), weights, MASK),
                               torch.tensor([1.5, 1.5]))  # 3 policy tokens x 0.5 each


def test_group_advantages_cover_the_policys_tokens_and_skip_the_environments():
    groups = torch.tensor([0, 0])
    grpo = ppo_math.grpo_advantages(torch.tensor([2.0, 3.0]), MASK, groups, std_norm=False)
    torch.testing.assert_close(grpo, torch.tensor([[-0.5, -0.5, 0.0, 0.0, -0.5, 0.0],
                                                   [0.5, 0.0, 0.5, 0.5, 0.0, 0.0]]))
    rewards = ppo_math.token_rewards(torch.tensor([2.0, 3.0]), torch.zeros(2, 6), MASK, kl_coef=0.1)
    rloo = ppo_math.rloo_advantages(rewards, MASK, groups)  # each less the other: -1 and +1
    torch.testing.assert_close(rloo, grpo * 2)


def test_a_batch_of_conversations_masks_the_environments_tokens():
    def rollout(mask):
        n = len(mask)
        return Rollout(prompt_index=0, prompt_ids=[1, 2], response_ids=list(range(10, 10 + n)), text="",
                       logprobs=[-1.0] * n, version=0, worker="w", finished=True, score=1.0, ref_logprobs=[-1.0] * n,
                       policy_mask=mask)

    batch = collate([rollout([1, 1, 0, 0, 1, 0]), rollout([1, 0, 1, 1])], pad_id=0)
    torch.testing.assert_close(batch.response_mask, torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0],
                                                                  [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]]))
    plain = collate([Rollout(prompt_index=0, prompt_ids=[1], response_ids=[5, 6], text="", logprobs=[-1.0] * 2,
                             version=0, worker="w", finished=True, score=1.0, ref_logprobs=[-1.0] * 2)], pad_id=0)
    torch.testing.assert_close(plain.response_mask, torch.tensor([[1.0, 1.0]]))
