"""Scorers: turn (prompt, response) pairs into one scalar reward each.

Three kinds, picked by the `reward.scorer` spec (see `make_scorer`):
- `vader`: VADER sentiment of the response, the demo's gold "human judge";
- `model:<dir>`: a Hugging Face sequence-classification reward model with a scalar head;
- `python:<module>:<function>`: any importable function of (prompts, responses).

`score_checked` is how the server calls a scorer: it refuses to pass on a reward that is not a
finite number, because one NaN reward silently poisons every PPO update after it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol, Sequence

from core.specs import load_function, parse_scorer


class Scorer(Protocol):
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One reward per (prompt, response) pair, in order."""
        ...


class ScoringError(RuntimeError):
    """A scorer raised, returned the wrong number of rewards, or returned a reward that is not a
    finite number."""


class VaderScorer:
    """VADER compound sentiment of the response, in [-1, 1]; the prompt is ignored.

    VADER is a lexicon-and-rules sentiment model (Hutto & Gilbert, 2014). It stands in for the
    human judge of the demo: the policy is rewarded for cheerful replies to everyday setbacks.
    """

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float(self._analyzer.polarity_scores(r)["compound"]) for r in responses]

    def __repr__(self) -> str:
        return "VaderScorer()"


_NEGATIVE_WORDS: set[str] | None = None


def no_negative_word(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """1.0 for a response with no word that VADER's lexicon rates negative, else 0.0: a binary reward on the
    demo's task (`reward.scorer=python:reward_server.scorers:no_negative_word`), where the samples of one
    prompt often tie, as verifiable rewards' do."""
    global _NEGATIVE_WORDS
    if _NEGATIVE_WORDS is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _NEGATIVE_WORDS = {word for word, valence in SentimentIntensityAnalyzer().lexicon.items() if valence < 0}
    words = lambda text: {w.strip(".,!?;:\"'()").lower() for w in text.split()}  # noqa: E731
    return [0.0 if words(r) & _NEGATIVE_WORDS else 1.0 for r in responses]


class RewardModelScorer:
    """A Hugging Face `AutoModelForSequenceClassification` with one output (a scalar head), read
    from a local directory, scoring the conversation [user: prompt, assistant: response] written
    with the tokenizer's chat template, or the pair (prompt, response) when it has none."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 32):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"reward model directory {path!r} does not exist; `model:<dir>` needs a local "
                f"directory written by save_pretrained (model and tokenizer)")
        self.path = path
        self.device = device
        self.batch_size = batch_size
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # float32 on CPU: reduced precision there is slow and makes a reward depend on which
        # other responses share its batch. On GPU keep the checkpoint's own dtype.
        dtype = torch.float32 if device == "cpu" else "auto"
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{path} has a classification head with {self.model.config.num_labels} outputs; "
                f"a reward model needs exactly one (num_labels=1)")
        self.model.to(device).eval()

        configure_padding(self.tokenizer, self.model, path)
        self.max_length = _max_length(self.tokenizer, self.model.config)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        rewards: list[float] = []
        with self._torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                end = start + self.batch_size
                rewards.extend(conversation_rewards(self.model, self.tokenizer, prompts[start:end],
                                                    responses[start:end], self.max_length, self.device).tolist())
        return rewards

    def __repr__(self) -> str:
        return f"RewardModelScorer({self.path!r})"


def configure_padding(tokenizer, model, path: str = "") -> None:
    """Padding that a scalar-head reward model reads correctly; trainer and scorer both use it."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {path} has neither a pad nor an eos token; "
                             f"set tokenizer.pad_token and save it again")
        tokenizer.pad_token = tokenizer.eos_token
    # The classification head reads the hidden state of the last token that is not
    # `config.pad_token_id`, so the model and the tokenizer must agree on the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    # Right padding keeps every real token at the position it had when scored alone, which
    # models with absolute position embeddings need; the truncated end is the response's.
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"


def encode_conversations(tokenizer, prompts: list, responses: list[str], max_length: int):
    """The conversations [user: prompt, assistant: response] as padded token ids; a prompt may also be
    the list of messages before the final reply. Training and scoring must encode identically."""
    from core.preferences import conversation

    common = dict(padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    if tokenizer.chat_template is None:
        # The tokenizer's sentence-pair form: encoder reward models (e.g. OpenAssistant's
        # DeBERTa ones) are trained on (question, answer) pairs with a separator between.
        return tokenizer([p if isinstance(p, str) else p[-1]["content"] for p in prompts], responses, **common)
    texts = [tokenizer.apply_chat_template(conversation(p, r), tokenize=False) for p, r in zip(prompts, responses)]
    # The template writes its own special tokens (BOS, turn markers); adding them again
    # would change the text the model was trained on.
    return tokenizer(texts, add_special_tokens=False, **common)


POOLINGS = ("last", "mean")


def conversation_rewards(model, tokenizer, prompts: list, responses: list[str], max_length: int, device):
    """(B,) float32 reward of each conversation, pooled as `model.config.reward_pooling` says:
    - `last` (the default, and any model saved without the field): the scalar head on the last real
      token, transformers' own sequence-classification pooling;
    - `mean`: the head on every response token, averaged. A linear head makes this the head applied to
      the mean response state: a per-token score summed like a lexicon, which needs far fewer pairs
      when the judge rewards what the words say (on SmolLM2 a linear probe of the last-token state was at
      chance on 256 VADER-labelled pairs, of layer 20's mean-pooled states 0.65)."""
    batch = encode_conversations(tokenizer, prompts, responses, max_length)
    pooling = getattr(model.config, "reward_pooling", "last")
    if pooling == "last":
        return model(**{k: v.to(device) for k, v in batch.items()}).logits[:, 0].float()
    if pooling != "mean" or not hasattr(model, "score"):
        raise ValueError(f"reward_pooling = {pooling!r} in the model's config: use one of {POOLINGS}; `mean` "
                         f"needs a decoder model whose scalar head is `score` (got {type(model).__name__})")
    mask = response_mask(tokenizer, prompts, batch["attention_mask"]).to(device)  # (B, T) 1 on response tokens
    hidden = model.base_model(input_ids=batch["input_ids"].to(device),
                              attention_mask=batch["attention_mask"].to(device)).last_hidden_state  # (B, T, H)
    per_token = model.score(hidden)[..., 0].float()  # (B, T) reward of each position
    return (per_token * mask).sum(1) / mask.sum(1)


def response_mask(tokenizer, prompts: list, attention_mask):
    """(B, T) 1 where the token belongs to the final reply (its end-of-turn marker included), else 0: the
    conversation's tokens after the prompt as the chat template writes it with the assistant header."""
    from core.preferences import conversation

    mask = attention_mask.clone()
    for i, prompt in enumerate(prompts):
        if tokenizer.chat_template is None:
            continue  # sentence-pair encoders: every token counts
        header = tokenizer.apply_chat_template(conversation(prompt, "")[:-1], tokenize=False,
                                               add_generation_prompt=True)
        mask[i, :len(tokenizer(header, add_special_tokens=False).input_ids)] = 0
    if (mask.sum(1) == 0).any():
        row = int((mask.sum(1) == 0).nonzero()[0])
        raise ValueError(f"conversation {row} has no response token left after truncating to the reward model's "
                         f"longest input; shorten the prompt or raise rm.max_length")
    return mask


def _max_length(tokenizer, config) -> int:
    """The longest input the model accepts: the tokenizer's limit or the position table's,
    whichever is smaller (tokenizers without a limit report a huge sentinel)."""
    limits = [tokenizer.model_max_length, getattr(config, "max_position_embeddings", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**8]
    if not limits:
        raise ValueError("cannot tell the reward model's longest input: neither the tokenizer's "
                         "model_max_length nor config.max_position_embeddings is set")
    return min(limits)


class FunctionScorer:
    """Any importable function `f(prompts, responses) -> sequence of floats`, named
    `module.path:function` (e.g. `my_rewards:length_reward`)."""

    def __init__(self, spec: str):
        self.spec = spec
        self._function = load_function(spec)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return list(self._function(prompts, responses))

    def __repr__(self) -> str:
        return f"FunctionScorer({self.spec!r})"


def make_scorer(spec: str, device: str = "cpu") -> Scorer:
    """Build the scorer named by a `reward.scorer` spec (core/specs.py)."""
    kind, argument = parse_scorer(spec)
    if kind == "model":
        return RewardModelScorer(argument, device=device)
    if kind == "python":
        return FunctionScorer(argument)
    return VaderScorer()


def score_checked(scorer: Scorer, prompts: Sequence[str], responses: Sequence[str],
                  first_index: int = 0) -> list[float]:
    """Score with `scorer` and check the rewards; never turns a failure into a reward.

    `first_index` is the index of `prompts[0]` in the caller's request, so that an error names
    the item the caller sent.
    """
    prompts, responses = list(prompts), list(responses)
    if not prompts:
        return []
    try:
        raw = scorer.score(prompts, responses)
        raw = list(raw)
    except Exception as e:
        raise ScoringError(f"{scorer!r} failed on {len(prompts)} items "
                           f"({first_index}..{first_index + len(prompts) - 1}): "
                           f"{type(e).__name__}: {e}") from e
    if len(raw) != len(prompts):
        raise ScoringError(f"{scorer!r} returned {len(raw)} rewards for {len(prompts)} items; a "
                           f"scorer must return one reward per (prompt, response) pair")
    rewards = []
    for i, value in enumerate(raw):
        reward = _as_float(value)
        if reward is None or not math.isfinite(reward):
            raise ScoringError(f"{scorer!r} returned {value!r} for item {first_index + i} "
                               f"(prompt {prompts[i][:60]!r}, response {responses[i][:60]!r}); "
                               f"a reward must be a finite number")
        rewards.append(reward)
    return rewards


def _as_float(value) -> float | None:
    """The value as a float, or None when it is not a number (a string or a bool is not)."""
    if isinstance(value, (str, bytes, bool)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
