"""Conversations with an environment, on a real generation worker (tiny model, vLLM, Ray): every turn kept
as the token ids the policy saw and sampled, its own tokens marked, scored by the environment; an
environment that raises, answers wrongly or never ends is named with its turn; and a job of conversations
trains, issuing again the prompt of a conversation that failed."""

import pytest
import ray

from actors.conversation import next_turn_ids
from actors.environments import ComplainingPerson
from actors.generation import GenerationWorker
from cluster.models import prepare_tiny
from core.config import build_config
from core.environment import Conversations, EnvironmentFailure, Turn
from tests.helpers import LOGPROB_TOL, max_gap, run

pytestmark = pytest.mark.ray

PERSON = "python:actors.environments:ComplainingPerson"


class RaisesOnSecondTurn:
    def reset(self, prompt):
        self.turn = 0
        return prompt

    def step(self, reply):
        self.turn += 1
        if self.turn == 2:
            raise KeyError("no such mood")
        return Turn("go on")


class NeverDone:
    def reset(self, prompt):
        return prompt

    async def step(self, reply):  # an async environment works alike
        return Turn("and another thing")


class AnswersText:
    def reset(self, prompt):
        return prompt

    def step(self, reply):
        return "a plain string"


class FailsFirstConversation(ComplainingPerson):
    """The first conversation a worker process holds fails on its first reply; the others go as the person's."""
    failed = False

    def step(self, reply):
        if not FailsFirstConversation.failed:
            FailsFirstConversation.failed = True
            raise RuntimeError("lost my train of thought")
        return super().step(reply)


@pytest.fixture(scope="module")
def worker(ray_session):
    cfg = build_config({"generation": {"dtype": "float32", "kv_cache_gib": 0.25, "max_model_len": 256,
                                       "threads": 1, "max_new_tokens": 8}})
    actor = ray.remote(GenerationWorker).options(num_cpus=1).remote("talker", str(prepare_tiny()), cfg.generation)
    yield actor
    ray.kill(actor)


def test_a_conversation_keeps_every_turn_as_the_tokens_the_policy_saw_and_marks_its_own(worker):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepare_tiny())
    prompts = [(3, "My train was late."), (5, "It rained all weekend.")]
    rollouts = ray.get(worker.converse.remote(prompts, 2, Conversations(PERSON, max_turns=3)))
    assert [r.prompt_index for r in rollouts] == [3, 3, 5, 5]
    for r, (_, text) in zip(rollouts, [p for p in prompts for _ in range(2)]):
        # replay the person on the replies the policy gave: the same follow-up and the same judgement
        person, (first, second) = ComplainingPerson(), r.text.split("\n\n")
        person.reset(text)
        follow_up = person.step(first)
        assert person.step(second).reward == pytest.approx(r.score) and r.finished
        ends = r.mask().index(0)  # the policy's first reply, then the person's message, then its second reply
        ended = tokenizer.decode(r.response_ids[ends - 1:ends]) if ends < 8 else None  # stopped before the limit
        between = next_turn_ids(tokenizer, follow_up.message, ended)
        assert r.response_ids[ends:ends + len(between)] == between
        assert r.mask() == [1] * ends + [0] * len(between) + [1] * (len(r.response_ids) - ends - len(between))
        assert all(lp == 0.0 for lp, m in zip(r.logprobs, r.mask()) if not m)
    # the engine, given the whole conversation, gives the policy's tokens the log-probs they were sampled with
    scored = ray.get(worker.score_logprobs.remote([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts]))
    assert max_gap([[lp for lp, m in zip(r.logprobs, r.mask()) if m] for r in rollouts],
                   [[lp for lp, m in zip(s, r.mask()) if m] for r, s in zip(rollouts, scored)]) < LOGPROB_TOL


@pytest.mark.parametrize("environment,says", [
    ("RaisesOnSecondTurn", r"RaisesOnSecondTurn, turn 2: KeyError: 'no such mood'"),
    ("NeverDone", r"NeverDone: the conversation was not done after 3 turns \(environment.max_turns\)"),
    ("AnswersText", r"AnswersText, turn 1: step returned str 'a plain string', not a core.environment.Turn"),
])
def test_an_environment_that_fails_is_named_with_the_turn(worker, environment, says):
    spec = f"python:tests.test_conversations_ray:{environment}"
    with pytest.raises(EnvironmentFailure, match=says) as failure:
        ray.get(worker.converse.remote([(0, "My train was late.")], 1, Conversations(spec, max_turns=3)))
    assert f"environment {spec}" in str(failure.value)


def test_a_job_of_conversations_trains_and_issues_a_failed_conversations_prompt_again(ray_session, tmp_path):
    summary, steps = run(tmp_path, "train.steps=2", "generation.samples_per_prompt=2", "ppo.advantage=grpo",
                         "environment.spec=python:tests.test_conversations_ray:FailsFirstConversation",
                         "environment.max_turns=2")
    assert summary["policy_version"] == 2
    assert summary["stream/environment_failures"] >= 1 and summary["stream/prompts_trained_twice"] == 0
    updates = [s for s in steps if s["step"] > 0]
    assert all(s["learner/tokens"] > 0 and s["loss/total"] == s["loss/total"] for s in updates)
    # judged by the environment: gold and proxy are its rewards, VADER means in [-1, 1]
    assert -1 <= steps[0]["eval/gold_reward_mean"] <= 1
    assert steps[0]["eval/gold_reward_mean"] == steps[0]["eval/proxy_reward_mean"]
