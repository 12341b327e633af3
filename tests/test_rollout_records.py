"""Kept rollouts (`train.keep_rollouts`) and scored replies read back: parts whole or absent, a resumed job's
later parts removed, bad rows named, token ids of another tokenizer refused by name."""

import json

import pytest

from core.rollout_records import RolloutDataError, RolloutRecords, load_scored, tokenizer_id

pytestmark = pytest.mark.pure

COLUMNS = ("prompt", "response", "reward")


def rows(step, n=2):
    return [{"prompt": f"p{step}.{i}", "response": f"r{step}.{i}", "reward": step + i / 10, "version": step - 1,
             "prompt_ids": [1, 2], "response_ids": [3, step, i]} for i in range(n)]


def load(path, tokenizer="tok-a", on_bad_row="error"):
    return load_scored(str(path), COLUMNS, tokenizer, on_bad_row, "ilql.on_bad_row")


def test_parts_read_back_in_step_order_by_the_loader_and_by_datasets(tmp_path):
    import datasets

    records = RolloutRecords(str(tmp_path), "run-a", "some-model", "tok-a")
    for step in (2, 1, 10):
        records.write(step, rows(step))
    assert records.steps() == [1, 2, 10]
    assert not list((tmp_path / "rollouts").glob(".*"))  # no temporary file left behind
    replies, problems = load(tmp_path / "rollouts")
    assert problems == []
    assert [(r.prompt, r.reward, r.response_ids) for r in replies][:3] == [
        ("p1.0", 1.0, [3, 1, 0]), ("p1.1", 1.1, [3, 1, 1]), ("p2.0", 2.0, [3, 2, 0])]
    assert [r.row for r in replies] == list(range(6))
    ds = datasets.load_dataset("json", data_dir=str(tmp_path / "rollouts"), split="train")
    assert len(ds) == 6 and {"run", "step", "version", "model", "tokenizer"} <= set(ds.column_names)
    assert set(ds["run"]) == {"run-a"} and sorted(set(ds["step"])) == [1, 2, 10]


def test_a_resumed_job_drops_the_parts_it_trains_again(tmp_path):
    records = RolloutRecords(str(tmp_path), "run-a", "m", "tok-a")
    for step in range(1, 6):
        records.write(step, rows(step))
    assert records.drop_after(3) == [4, 5]
    records.write(4, rows(4, n=1))  # trained again after the resume, on other rollouts
    assert records.steps() == [1, 2, 3, 4]
    replies, _ = load(tmp_path / "rollouts")
    assert [r.prompt for r in replies] == ["p1.0", "p1.1", "p2.0", "p2.1", "p3.0", "p3.1", "p4.0"]
    assert records.drop_after(0) == [1, 2, 3, 4] and records.steps() == []


def test_bad_rows_are_named_together_or_skipped(tmp_path):
    path = tmp_path / "scored.jsonl"
    bad = [{"prompt": "a", "response": "fine", "reward": 0.5},
           {"prompt": "b", "response": "", "reward": 0.5},
           {"prompt": "c", "response": "no reward", "reward": None},
           {"prompt": "d", "response": "nan", "reward": float("nan")},
           {"prompt": "", "response": "no prompt", "reward": 1.0},
           {"prompt": "f", "response": "fine too", "reward": -1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(RolloutDataError) as err:
        load(path)
    message = str(err.value)
    for line in ("row 1: response is empty", "row 2: no reward", "row 3: reward is nan, not finite",
                 "row 4: prompt is empty", "ilql.on_bad_row=skip"):
        assert line in message
    assert "row 0" not in message and "row 5" not in message
    replies, problems = load(path, on_bad_row="skip")
    assert [(r.row, r.reward) for r in replies] == [(0, 0.5), (5, -1.0)] and len(problems) == 4
    assert replies[0].response_ids is None  # text only: tokenised by the reader


def test_a_missing_column_names_the_fields_to_set(tmp_path):
    path = tmp_path / "scored.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b", "score": 1.0}) + "\n")
    with pytest.raises(RolloutDataError, match="no column 'reward'.*ilql.prompt_column"):
        load(path)


def test_token_ids_of_another_tokenizer_are_refused_by_name(tmp_path):
    RolloutRecords(str(tmp_path), "run-a", "other-model", "tok-b").write(1, rows(1))
    with pytest.raises(RolloutDataError, match="'other-model' \\(tokenizer tok-b\\).*this model's tokenizer is tok-a"):
        load(tmp_path / "rollouts", tokenizer="tok-a")


def test_a_folder_without_parts_is_refused(tmp_path):
    with pytest.raises(RolloutDataError, match="without rollout parts"):
        load(tmp_path)


class Vocab:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)


def test_the_tokenizer_fingerprint_follows_the_vocabulary_not_the_directory():
    a, same, other = Vocab({"a": 0, "b": 1}), Vocab({"b": 1, "a": 0}), Vocab({"a": 1, "b": 0})
    assert tokenizer_id(a) == tokenizer_id(same) != tokenizer_id(other)


def scored_file(tmp_path, rows_):
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(dict(zip(("prompt", "response", "reward", "finished"), row))) + "\n"
                            for row in rows_))
    return path


def test_filtered_sft_keeps_each_prompts_best_share_and_dpo_pairs_its_best_with_its_worst(tmp_path):
    from core.rollout_records import best_against_worst, best_share

    data = [("a", "a1", 0.1, True), ("b", "b1", 0.9, True), ("a", "a2", 0.7, False), ("a", "a3", -0.4, True),
            ("a", "a4", 0.3, True), ("b", "b2", 0.92, True), ("c", "c1", 0.5, True),
            ("d", "same", 0.2, True), ("d", "same", 0.6, True)]
    replies, _ = load(scored_file(tmp_path, data))
    assert [r.response for r in best_share(replies, 0.25)] == ["a2", "b2", "c1", "same"]  # at least one each
    assert [r.response for r in best_share(replies, 0.5)] == ["a2", "a4", "b2", "c1", "same"]
    assert len(best_share(replies, 1.0)) == len(data)
    pairs = best_against_worst(replies, min_margin=0.05)
    # b's two replies differ by less than the margin, c has one, d's are the same text: a's pair only
    assert [(p.prompt, p.chosen, p.rejected, p.chosen_finished, p.rejected_finished) for p in pairs] == [
        ("a", "a2", "a3", False, True)]
    assert [p.chosen for p in best_against_worst(replies, min_margin=0.0)] == ["a2", "b2"]


def test_the_sft_and_preference_readers_take_scored_replies(tmp_path):
    from cluster.pipeline import load_pair_sets
    from core.config import build_config
    from core.preferences import PreferenceDataError
    from learner.sft import _load_logged

    data = [(f"p{i}", f"reply {i}.{j}", j / 4 + i / 100, j != 1) for i in range(10) for j in range(4)]
    path = scored_file(tmp_path, data)
    cfg = build_config(overrides=[f"sft.path={path}", "sft.best_fraction=0.25", f"preferences.path={path}",
                                  "preferences.form=scored", "preferences.eval_fraction=0.2"])
    demos = _load_logged(str(path), cfg.sft)
    assert [(d.prompt, d.response) for d in demos] == [(f"p{i}", f"reply {i}.3") for i in range(10)]
    train, held = load_pair_sets(cfg.preferences)
    assert len(train) == 8 and len(held) == 2
    assert all(p.chosen.endswith(".3") and p.rejected.endswith(".0") for p in train + held)
    ties = build_config(overrides=[f"preferences.path={path}", "preferences.form=scored", "preferences.min_margin=1"])
    with pytest.raises(PreferenceDataError, match="min_margin = 1.0"):
        load_pair_sets(ties.preferences)
