"""Multi-turn environments: what a user implements so that a rollout is a conversation, not one reply.

An environment is a Python class with two methods, plain or `async`:

    class MyEnvironment:
        def reset(self, prompt: str) -> str:
            '''A new conversation about one of the job's prompts: the first message the policy answers.'''
        def step(self, reply: str) -> Turn:
            '''The policy's reply (text) -> the next message, or done, and the reward for this turn.'''

The config names it `environment.spec = python:<module>:<Class>`; a generation worker makes one instance
per conversation (no arguments), so the instance may keep the conversation's state. The rewards of a
conversation's turns add up to its score. This is Gymnasium's reset/step and OpenEnv's StepResult, cut to
what a conversation needs: text in, text out, a reward, done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.config_fields import ConfigError
from core.specs import load_function

SPEC_PREFIX = "python:"


@dataclass
class Turn:
    """What `step` returns: the environment's next message (None when `done`), the reward of the reply just
    given (0 until the end, for a judgement at the end only), and whether the conversation is over."""

    message: str | None = None
    reward: float = 0.0
    done: bool = False


@dataclass
class Conversations:
    """What a generation worker needs to hold conversations: the environment (`environment.spec`), at most
    `max_turns` replies, `timeout_s` for each of the environment's answers, and the data's system prompt."""

    spec: str
    max_turns: int = 4
    timeout_s: float = 60.0
    system_prompt: str = ""


class EnvironmentFailure(RuntimeError):
    """An environment raised, returned something that is not a Turn, took too long, or never finished a
    conversation. The message names the environment and the turn; the conversation is dropped and its prompt
    issued again."""


def load_environment(spec: str) -> type:
    """The environment class of `python:<module>:<Class>`, imported and checked for reset and step."""
    if not spec.startswith(SPEC_PREFIX):
        raise ValueError(f"an environment is named python:<module>:<Class>, not {spec!r}")
    cls = load_function(spec.removeprefix(SPEC_PREFIX))
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if not isinstance(cls, type) or missing:
        raise ValueError(f"{spec!r} is not an environment class: it needs the methods reset(prompt) and step(reply)"
                         + (f" (missing {', '.join(missing)})" if missing else ""))
    return cls


def check_environment(spec: str, field: str) -> None:
    """Refuse a spec that names no usable environment class, naming the config `field`."""
    if not spec:
        return
    try:
        load_environment(spec)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"{field} = {spec!r}: {e}") from None


def checked_turn(value, where: str) -> Turn:
    """`value` as a Turn, or an EnvironmentFailure that says what is wrong with it (`where`: the environment
    and the turn)."""
    if not isinstance(value, Turn):
        raise EnvironmentFailure(f"{where}: step returned {type(value).__name__} {value!r:.80}, not a "
                                 f"core.environment.Turn(message, reward, done)")
    if not isinstance(value.reward, (int, float)) or not math.isfinite(value.reward):
        raise EnvironmentFailure(f"{where}: step returned the reward {value.reward!r}; a reward must be a finite "
                                 f"number")
    if not value.done and not (isinstance(value.message, str) and value.message.strip()):
        raise EnvironmentFailure(f"{where}: step returned done=False with the message {value.message!r}; a "
                                 f"conversation that goes on needs a non-empty next message")
    return value
