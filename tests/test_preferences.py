"""Preference pairs: both layouts read through `datasets`, bad rows named by row number, writing, splitting."""

import json

import pytest

from core.preferences import (
    PreferenceDataError,
    PreferencePair,
    conversation,
    load_preferences,
    split_pairs,
    write_preferences,
)

pytestmark = pytest.mark.pure


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def hh(*turns):
    """HH-RLHF text from alternating human/assistant turns."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def test_explicit_round_trip_keeps_message_prompts_and_extra_columns(tmp_path):
    dialogue = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How was the train?"}]
    pairs = [PreferencePair("Tell me about rain.", "It was refreshing.", "It was awful."),
             PreferencePair(dialogue, "Lovely, thanks.", "Late again.")]
    path = tmp_path / "out" / "pairs.jsonl"
    write_preferences(path, pairs, extra=[{"gold_chosen": 0.9}, {"gold_chosen": 0.7}])

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {"prompt": "Tell me about rain.", "chosen": "It was refreshing.", "rejected": "It was awful.",
                       "gold_chosen": 0.9}
    assert rows[1]["prompt"] == dialogue
    loaded = load_preferences(str(path))
    assert [(p.prompt, p.chosen, p.rejected) for p in loaded.pairs] == [(p.prompt, p.chosen, p.rejected)
                                                                        for p in pairs]
    assert [p.row for p in loaded.pairs] == [0, 1] and loaded.skipped == []


def test_parquet_with_custom_column_names(tmp_path):
    import datasets

    path = str(tmp_path / "p.parquet")
    datasets.Dataset.from_dict({"q": ["a?", "b?"], "good": ["yes", "sure"], "bad": ["no", "never"]}).to_parquet(path)
    pairs = load_preferences(path, prompt_column="q", chosen_column="good", rejected_column="bad").pairs
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("a?", "yes", "no"), ("b?", "sure", "never")]


def test_hh_text_single_turn_prompt_is_a_string(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": hh("My bus was late.", "A chance to read!"),
                                                 "rejected": hh("My bus was late.", "Buses are the worst.")}])
    [pair] = load_preferences(path, form="conversation").pairs
    assert pair == PreferencePair("My bus was late.", "A chance to read!", "Buses are the worst.", row=0)


def test_hh_text_multi_turn_prompt_is_the_shared_dialogue(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": hh("Hi", "Hello!", "It rained.", "Plants loved it."),
                                                 "rejected": hh("Hi", "Hello!", "It rained.", "Miserable.")}])
    [pair] = load_preferences(path, form="conversation").pairs
    assert pair.prompt == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "It rained."}]
    assert (pair.chosen, pair.rejected) == ("Plants loved it.", "Miserable.")
    assert conversation(pair.prompt, pair.chosen)[-2:] == [{"role": "user", "content": "It rained."},
                                                           {"role": "assistant", "content": "Plants loved it."}]


def test_message_list_conversations(tmp_path):
    def dialogue(reply):
        return [{"role": "user", "content": "I lost my keys."}, {"role": "assistant", "content": reply}]

    path = write_jsonl(tmp_path / "m.jsonl", [{"chosen": dialogue("A good walk anyway!"),
                                                "rejected": dialogue("Bad luck.")}])
    [pair] = load_preferences(path, form="conversation").pairs
    assert (pair.prompt, pair.chosen, pair.rejected) == ("I lost my keys.", "A good walk anyway!", "Bad luck.")
    assert conversation(pair.prompt, pair.chosen) == dialogue("A good walk anyway!")


def test_missing_column_names_it_and_the_config_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(PreferenceDataError, match=r"lacks the column\(s\) 'prompt'") as err:
        load_preferences(path, on_bad_row="skip")
    assert "question" in str(err.value) and "preferences.prompt_column" in str(err.value)


BAD_ROWS = [
    {"prompt": "ok", "chosen": "good", "rejected": "bad"},  # row 0 good
    {"prompt": "ok", "chosen": None, "rejected": "bad"},  # row 1 missing value
    {"prompt": "", "chosen": "good", "rejected": "bad"},  # row 2 empty
    {"prompt": "ok", "chosen": "good", "rejected": "bad"},  # row 3 good
    {"prompt": "ok", "chosen": "  \n", "rejected": "bad"},  # row 4 whitespace
    {"prompt": "ok", "chosen": "same", "rejected": "same"},  # row 5 identical
]


def test_bad_rows_are_all_reported_by_row_number(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", BAD_ROWS)
    with pytest.raises(PreferenceDataError) as err:
        load_preferences(path)
    message = str(err.value)
    assert "4 of 6 rows" in message and "preferences.on_bad_row=skip" in message
    for reason in ["row 1: chosen is missing", "row 2: prompt is empty", "row 4: chosen is empty",
                   "row 5: chosen and rejected replies are identical"]:
        assert reason in message
    assert "row 0" not in message and "row 3" not in message


def test_skip_keeps_good_rows_and_lists_the_rest(tmp_path):
    loaded = load_preferences(write_jsonl(tmp_path / "p.jsonl", BAD_ROWS), on_bad_row="skip")
    assert [p.row for p in loaded.pairs] == [0, 3]
    assert [s.split(":")[0] for s in loaded.skipped] == ["row 1", "row 2", "row 4", "row 5"]


def test_conversations_without_shared_prefix_are_bad_rows(tmp_path):
    rows = [{"chosen": hh("Hi", "Hello"), "rejected": hh("Hi", "Hey")},
            {"chosen": hh("My cake fell.", "Trifle!"), "rejected": hh("My bread fell.", "Oh no.")},
            {"chosen": hh("Hi", "Hello", "Bye"), "rejected": hh("Hi", "Hey")}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(PreferenceDataError, match="row 1: chosen and rejected dialogues differ") as err:
        load_preferences(path, form="conversation")
    assert "row 2: chosen does not end with an assistant turn" in str(err.value)
    loaded = load_preferences(path, form="conversation", on_bad_row="skip")
    assert [p.row for p in loaded.pairs] == [0] and len(loaded.skipped) == 2


def test_more_than_ten_bad_rows_are_summarised(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 13
                       + [{"prompt": "p", "chosen": "x", "rejected": "y"}])
    with pytest.raises(PreferenceDataError, match=r"\.\.\. and 3 more") as err:
        load_preferences(path)
    assert "row 9:" in str(err.value) and "row 10:" not in str(err.value)


def test_no_usable_rows_unknown_mode_and_empty_file_are_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(PreferenceDataError, match="none of its 1 rows"):
        load_preferences(path, on_bad_row="skip")
    with pytest.raises(ValueError, match="on_bad_row"):
        load_preferences(path, on_bad_row="drop")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PreferenceDataError, match="is empty"):
        load_preferences(str(tmp_path / "empty.jsonl"))


def test_split_is_deterministic_and_disjoint():
    pairs = [PreferencePair(f"p{i}", "a", "b", row=i) for i in range(20)]
    train, evals = split_pairs(pairs, 0.25, seed=3)
    assert (train, evals) == split_pairs(pairs, 0.25, seed=3)
    assert len(evals) == 5 and len(train) == 15
    assert sorted(p.row for p in train + evals) == list(range(20))
    assert split_pairs(pairs, 0.25, seed=4)[1] != evals
    with pytest.raises(PreferenceDataError, match="preferences.eval_fraction = 0.1"):
        split_pairs(pairs[:3], 0.1, seed=0)
    with pytest.raises(PreferenceDataError, match="sft.eval_fraction = 0.1"):  # the field of the stage that split
        split_pairs(pairs[:3], 0.1, seed=0, field="sft.eval_fraction")
