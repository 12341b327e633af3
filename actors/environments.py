"""Example environments (core/environment.py), named by spec like any user's:
`environment.spec=python:actors.environments:ComplainingPerson`."""

from __future__ import annotations

import statistics
import zlib

from core.environment import Turn
from core.prompts import SETBACKS

FOLLOW_UP = "Thanks. But then {setback}. How am I supposed to see the bright side of that as well?"


class ComplainingPerson:
    """A person who answers each reply with another setback, `turns` complaints in all, and at the end judges
    the conversation by the gold scorer of the default job: the mean VADER compound sentiment of the
    policy's replies (each in [-1, 1]). The follow-up setbacks are those of the built-in prompts, the same ones
    for the same first prompt."""

    turns = 2

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()
        self.replies: list[str] = []
        self.setbacks: list[str] = []

    def reset(self, prompt: str) -> str:
        first = zlib.crc32(prompt.encode())
        self.setbacks = [SETBACKS[(first + 7 * k) % len(SETBACKS)] for k in range(1, self.turns)]
        self.replies = []
        return prompt

    def step(self, reply: str) -> Turn:
        self.replies.append(reply)
        if len(self.replies) < self.turns:
            setback = self.setbacks[len(self.replies) - 1]
            return Turn(message=FOLLOW_UP.format(setback=setback.replace("your ", "my ").replace("you ", "I ")))
        return Turn(reward=statistics.mean(self.analyzer.polarity_scores(r)["compound"] for r in self.replies),
                    done=True)
