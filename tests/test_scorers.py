"""Scorers in-process: VADER, an importable function, a tiny random reward model, and the checks
that keep a bad reward out of training."""

import math
import re

import pytest

from reward_server.scorers import (
    FunctionScorer,
    RewardModelScorer,
    ScoringError,
    VaderScorer,
    make_scorer,
    score_checked,
)

CHEERFUL = "What a wonderful idea, I love it and you will do great!"
SAD = "That is terrible, I am so sorry, everything is awful and sad."


def length_reward(prompts, responses):
    """A function scorer for the tests: longer responses earn more."""
    return [float(len(r)) for r in responses]


def test_vader_rewards_cheer_and_ignores_the_prompt():
    scorer = VaderScorer()
    happy, sad = scorer.score(["my bike was stolen"] * 2, [CHEERFUL, SAD])
    assert happy > 0.5 and sad < -0.5
    assert scorer.score([SAD], [CHEERFUL]) == scorer.score(["a lovely day"], [CHEERFUL])


def test_function_scorer_calls_the_named_function():
    scorer = make_scorer("python:tests.test_scorers:length_reward")
    assert isinstance(scorer, FunctionScorer)
    assert scorer.score(["p", "q"], ["ab", "abcd"]) == [2.0, 4.0]


@pytest.mark.parametrize("spec, error, words", [
    ("vaderr", ValueError, "python:<module>:<function>"),
    ("model:", ValueError, "model:<dir>"),
    ("python:no_colon_here", ValueError, "module.path:function"),
    ("python:tests.test_scorers:no_such_function", ValueError, "no function"),
    ("python:no_such_module_xyz:f", ImportError, "Python path"),
    ("model:/no/such/reward/model", FileNotFoundError, "save_pretrained"),
])
def test_make_scorer_explains_a_bad_spec(spec, error, words):
    with pytest.raises(error, match=re.escape(words)):
        make_scorer(spec)


class _Returns:
    def __init__(self, values):
        self.values = values

    def score(self, prompts, responses):
        return self.values


class _Raises:
    def score(self, prompts, responses):
        raise ZeroDivisionError("boom")


PROMPTS = ["first prompt", "second prompt " + "x" * 100]
RESPONSES = ["first response", "second response"]


def test_score_checked_passes_finite_numbers_as_floats():
    assert score_checked(_Returns([1, 0.5]), PROMPTS, RESPONSES) == [1.0, 0.5]


@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.3", None])
def test_score_checked_names_the_item_with_a_bad_reward(bad):
    with pytest.raises(ScoringError) as info:
        score_checked(_Returns([0.1, bad]), PROMPTS, RESPONSES, first_index=10)
    message = str(info.value)
    assert "item 11" in message and "second response" in message
    assert PROMPTS[1][:60] in message and PROMPTS[1][:61] not in message


def test_score_checked_reports_a_scorer_that_raises():
    with pytest.raises(ScoringError, match="_Raises.*ZeroDivisionError: boom"):
        score_checked(_Raises(), PROMPTS, RESPONSES)


def test_score_checked_rejects_the_wrong_number_of_rewards():
    with pytest.raises(ScoringError, match="1 rewards for 2 items"):
        score_checked(_Returns([0.1]), PROMPTS, RESPONSES)


# --- a tiny random reward model, built offline ----------------------------------------------

WORDS = ("my bike was stolen i lost keys the a and what wonderful idea love it you will do great "
         "that is terrible am so sorry everything awful sad user assistant < > / hello").split()


def save_tiny_reward_model(directory, *, pad_token: bool, chat_template: bool) -> str:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[UNK]", "[PAD]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[EOS]",
                                        pad_token="[PAD]" if pad_token else None)
    if chat_template:
        tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} "
                                   "{% endfor %}[EOS]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, num_labels=1, initializer_range=0.3,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module", params=[(True, True), (False, False)],
                ids=["pad+template", "no-pad,no-template"])
def reward_model_dir(request, tmp_path_factory):
    pad_token, chat_template = request.param
    return save_tiny_reward_model(tmp_path_factory.mktemp("rm"), pad_token=pad_token,
                                  chat_template=chat_template)


def test_reward_model_gives_one_deterministic_finite_reward_per_pair(reward_model_dir):
    scorer = make_scorer(f"model:{reward_model_dir}")
    assert isinstance(scorer, RewardModelScorer)
    prompts, responses = ["my bike was stolen"] * 3, [CHEERFUL, SAD, "hello"]
    first = scorer.score(prompts, responses)
    assert len(first) == 3 and all(isinstance(r, float) and math.isfinite(r) for r in first)
    assert scorer.score(prompts, responses) == first
    assert max(first) - min(first) > 1e-3, "different responses should get different rewards"


def test_reward_model_reward_does_not_depend_on_padding(reward_model_dir):
    scorer = RewardModelScorer(reward_model_dir, batch_size=8)
    alone = scorer.score(["i lost my keys"], ["so sorry"])[0]
    long_response = " ".join(["what a wonderful idea"] * 8)
    batched = scorer.score(["i lost my keys", "hello"], ["so sorry", long_response])
    assert batched[0] == pytest.approx(alone, abs=1e-4)


def test_reward_model_truncates_inputs_longer_than_the_model(reward_model_dir):
    scorer = RewardModelScorer(reward_model_dir)
    very_long = " ".join(["hello"] * 500)  # far past max_position_embeddings = 64
    assert all(math.isfinite(r) for r in scorer.score(["hello", "hello"], [very_long, "hi"]))
