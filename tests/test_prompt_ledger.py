"""The prompt ledger without Ray: every prompt drawn is trained on exactly once, lost work is issued again
before anything new (oldest first), epochs reshuffle, and the data position survives a checkpoint."""

import json

import pytest

from actors.prompt_ledger import PromptLedger
from core.prompts import Prompt

pytestmark = pytest.mark.pure

PROMPTS = [Prompt(index=i, text=f"prompt {i}", token_ids=[1, i + 2]) for i in range(10)]


def numbers(draws):
    return [d.number for d in draws]


def assert_balanced(ledger):
    c = ledger.counters
    assert c["prompts_drawn"] == c["prompts_trained"] + len(ledger.pending)
    assert c["prompts_trained_twice"] == 0


def test_draws_are_numbered_and_an_epoch_is_a_shuffle_of_every_prompt():
    ledger = PromptLedger(PROMPTS, seed=3)
    first = ledger.draw(10)
    assert numbers(first) == list(range(10))
    assert sorted(d.prompt.index for d in first) == list(range(10))  # each prompt once per epoch
    assert [d.prompt.index for d in first] != list(range(10))  # in a shuffled order
    second = ledger.draw(10)
    assert ledger.epoch == 2 and sorted(d.prompt.index for d in second) == list(range(10))
    assert [d.prompt.index for d in second] != [d.prompt.index for d in first]  # reshuffled
    assert [d.prompt.index for d in PromptLedger(PROMPTS, seed=3).draw(10)] == [d.prompt.index for d in first]


def test_lost_work_is_issued_again_first_oldest_first_and_counted():
    ledger = PromptLedger(PROMPTS)
    a, b, c = ledger.draw(2), ledger.draw(2), ledger.draw(2)
    ledger.give_back({d.number for d in c})
    ledger.give_back({d.number for d in a})
    again = ledger.draw(5)
    assert numbers(again) == numbers(a) + numbers(c) + [6]  # draws 0, 1, 4, 5 again, then a new one
    assert [d.prompt for d in again[:4]] == [d.prompt for d in a + c]
    assert ledger.counters["prompts_reissued"] == 4 and ledger.counters["prompts_drawn"] == 7
    ledger.trained_on(set(numbers(again)) | set(numbers(b)))
    assert not ledger.pending
    assert_balanced(ledger)


def test_a_draw_trained_on_is_not_issued_again_and_training_twice_is_counted():
    ledger = PromptLedger(PROMPTS)
    draws = ledger.draw(3)
    ledger.trained_on({0, 1})
    ledger.give_back({0, 1, 2})  # 0 and 1 are done: only 2 goes out again
    assert numbers(ledger.draw(1)) == [2]
    ledger.trained_on({2})
    assert_balanced(ledger)
    ledger.trained_on({1})
    assert ledger.counters["prompts_trained_twice"] == 1
    assert len(draws) == 3


def test_the_data_position_survives_a_checkpoint():
    """A resumed ledger issues the pending draws first, then the same prompts as an uninterrupted one."""
    ledger = PromptLedger(PROMPTS, seed=1)
    ledger.draw(4)
    ledger.trained_on({0, 2})
    state = json.loads(json.dumps(ledger.state_dict()))  # what a checkpoint writes
    expected = [(d.number, d.prompt.index) for d in ledger.draw(12)]

    resumed = PromptLedger(PROMPTS, seed=99)  # the seed is restored with the shuffle's state
    resumed.load_state_dict(state)
    assert sorted(resumed.pending) == [1, 3]
    got = resumed.draw(12)
    assert [[d.number, d.prompt.index] for d in got[:2]] == state["pending"]
    assert [(d.number, d.prompt.index) for d in got[2:]] == expected[:10]
    assert resumed.counters["prompts_drawn"] == ledger.counters["prompts_drawn"] - 2
    resumed.trained_on({d.number for d in got})
    assert_balanced(resumed)
