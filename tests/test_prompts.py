"""Prompt loading: files through `datasets`, the built-in set, the split, and errors naming bad rows."""

import json

import pytest

from cluster.models import prepare_tiny
from core.config import DataConfig
from core.prompts import PromptDataError, builtin_setbacks, load_prompts


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(prepare_tiny())


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_builtin_set_is_deterministic_and_split_is_disjoint(tokenizer):
    assert builtin_setbacks() == builtin_setbacks() and len(set(builtin_setbacks())) == len(builtin_setbacks())
    cfg = DataConfig(eval_size=40)
    train, evals = load_prompts(cfg, tokenizer)
    train2, evals2 = load_prompts(cfg, tokenizer)
    assert [p.text for p in evals] == [p.text for p in evals2] and len(evals) == 40
    assert not {p.text for p in train} & {p.text for p in evals}
    assert len(train) + len(evals) == len(builtin_setbacks())
    assert [p.index for p in train] == list(range(len(train)))


def test_chat_template_is_applied(tokenizer):
    train, _ = load_prompts(DataConfig(eval_size=1), tokenizer)
    decoded = tokenizer.decode(train[0].token_ids)
    assert "<|im_start|>user\n" + train[0].text in decoded
    assert decoded.endswith("<|im_start|>assistant\n")


def test_jsonl_with_custom_column_and_eval_file(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": f"question {i}?"} for i in range(5)])
    eval_path = write_jsonl(tmp_path / "e.jsonl", [{"q": "held out?"}])
    train, evals = load_prompts(DataConfig(path=path, prompt_column="q", eval_path=eval_path), tokenizer)
    assert [p.text for p in train] == [f"question {i}?" for i in range(5)]
    assert [p.text for p in evals] == ["held out?"]


def test_parquet_file(tmp_path, tokenizer):
    import datasets

    datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(4)]}).to_parquet(str(tmp_path / "p.parquet"))
    train, evals = load_prompts(DataConfig(path=str(tmp_path / "p.parquet"), eval_size=1), tokenizer)
    assert len(train) == 3 and len(evals) == 1


def test_empty_file_is_an_error(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PromptDataError, match="is empty"):
        load_prompts(DataConfig(path=str(tmp_path / "empty.jsonl")), tokenizer)


def test_missing_column_lists_the_columns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "hello"}] * 3)
    with pytest.raises(PromptDataError, match=r"no column 'prompt'.*\['text'\].*data.prompt_column"):
        load_prompts(DataConfig(path=path), tokenizer)


def test_bad_rows_are_reported_by_row_number(tmp_path, tokenizer):
    rows = [{"prompt": "fine"}, {"prompt": ""}, {"prompt": "fine too"}, {"prompt": "word " * 300}, {"prompt": "ok"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(PromptDataError) as err:
        load_prompts(DataConfig(path=path, eval_size=1, max_prompt_tokens=64), tokenizer)
    message = str(err.value)
    assert "2 of 5 rows" in message and "row 1: prompt is empty" in message
    assert "row 3: prompt is" in message and "max_prompt_tokens = 64" in message


def test_too_few_rows_to_split(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(PromptDataError, match="too few"):
        load_prompts(DataConfig(path=path, eval_size=2), tokenizer)
