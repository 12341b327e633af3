"""The prompt ledger: which prompt goes out next, and what became of every prompt handed out.

Every prompt handed out is a *draw* with a serial number. A draw is pending from the moment it is
issued until a batch that holds it is trained on, and it is trained on exactly once: when the work on
a draw is lost (its worker died or was removed, its rollouts went stale), the draw goes back to the
front of the queue and is issued again before any new prompt. The counters show it:
`prompts_drawn = prompts_trained + pending`, and `prompts_trained_twice` stays 0.

Prompts come in a seeded shuffle, reshuffled every epoch over the prompt set. The ledger's state (the
shuffle and every pending draw) goes into checkpoints, so a resumed job issues the same prompts as an
uninterrupted one. Plain Python: no Ray, no clocks.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, deque
from typing import NamedTuple

from core.prompts import Prompt

log = logging.getLogger(__name__)


class Draw(NamedTuple):
    number: int  # serial number of the draw, in the order drawn
    prompt: Prompt


class PromptLedger:
    def __init__(self, prompts: list[Prompt], seed: int = 0):
        self.prompts = prompts
        self.by_index = {p.index: p for p in prompts}
        self.rng = random.Random(seed)
        self.order: list[int] = []  # what is left of this epoch's shuffle; the next prompt is at the end
        self.epoch = 0
        self.next_number = 0
        self.pending: dict[int, Prompt] = {}  # draw number -> prompt: issued, not yet trained on
        self.requeue: deque[Draw] = deque()  # draws to issue again, oldest first, before any new one
        self.trained: Counter[int] = Counter()  # draw number -> times trained on (must stay <= 1)
        self.counters = {"prompts_drawn": 0, "prompts_reissued": 0, "prompts_trained": 0,
                         "prompts_trained_twice": 0}

    def draw(self, count: int) -> list[Draw]:
        """`count` draws: first those to be issued again, then the next prompts of the shuffle."""
        out = []
        while len(out) < count and self.requeue:
            out.append(self.requeue.popleft())
            self.counters["prompts_reissued"] += 1
        while len(out) < count:
            if not self.order:
                self.order = list(range(len(self.prompts)))
                self.rng.shuffle(self.order)
                self.epoch += 1
            draw = Draw(self.next_number, self.prompts[self.order.pop()])
            self.pending[draw.number] = draw.prompt
            out.append(draw)
            self.next_number += 1
            self.counters["prompts_drawn"] += 1
        return out

    def give_back(self, numbers: set[int]) -> None:
        """The work on the draws with these numbers was lost: issue them again, before any new prompt,
        oldest first. A draw that is no longer pending (trained on) is not issued again."""
        merged = {d.number: d for d in self.requeue}
        merged.update((n, Draw(n, self.pending[n])) for n in numbers if n in self.pending)
        self.requeue = deque(merged[n] for n in sorted(merged))

    def trained_on(self, numbers: set[int]) -> None:
        """The draws with these numbers are in a batch the learner takes: no longer pending."""
        for number in sorted(numbers):
            self.trained[number] += 1
            if self.trained[number] > 1:
                self.counters["prompts_trained_twice"] += 1
                log.error("prompt draw %d was trained on twice", number)
            self.pending.pop(number, None)
            self.counters["prompts_trained"] += 1

    def stats(self) -> dict:
        return {**self.counters, "prompts_pending": len(self.pending), "epoch": self.epoch}

    def state_dict(self) -> dict:
        """The data position: the shuffle's state and every draw not yet trained on (JSON-able)."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self.order), "epoch": self.epoch,
                "next_draw": self.next_number, "counters": dict(self.counters),
                "pending": [[number, p.index] for number, p in sorted(self.pending.items())]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved data position: the draws pending then are issued first, in draw order."""
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order, self.epoch, self.next_number = list(state["order"]), state["epoch"], state["next_draw"]
        self.counters.update(state["counters"])
        self.pending = {number: self.by_index[index] for number, index in state["pending"]}
        self.requeue = deque(Draw(n, p) for n, p in sorted(self.pending.items()))
