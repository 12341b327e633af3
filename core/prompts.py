"""Prompts: loaded through `datasets`, checked row by row, chat template applied, split for evaluation.

The built-in set (`builtin:setbacks`) asks for a sentence or two about an everyday setback. Such
requests draw answers whose sentiment is about neutral from the initial policy, so a reward for
looking on the bright side has something to teach; generic everyday prompts already draw cheerful
answers and leave little to learn.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import InputError

if TYPE_CHECKING:
    from core.config import DataConfig

BUILTIN_SETBACKS = "builtin:setbacks"

SETBACKS = [
    "your train was delayed by an hour", "it rained all weekend", "you waited in a long queue at the post office",
    "your phone battery died in the middle of the day", "you missed the last bus home",
    "your flight was cancelled", "you spilled coffee on your shirt before a meeting",
    "the bakery had sold out of your favourite bread", "you got a flat tyre on the way to work",
    "your parcel arrived a week late", "you locked yourself out of your flat",
    "your laptop crashed and you lost an hour of work", "you caught a cold on your holiday",
    "the restaurant lost your booking", "you burnt the dinner you were cooking for friends",
    "your umbrella broke in the wind", "you were stuck in a traffic jam for two hours",
    "the washing machine flooded the kitchen", "you forgot your friend's birthday",
    "your bike was stolen from outside the station", "the internet went down all evening",
    "you failed your driving test", "the concert you wanted to see was sold out",
    "your neighbours held a loud party all night", "you dropped your phone and cracked the screen",
    "you missed your connecting train", "the heating broke during a cold week",
    "your picnic was ruined by wasps", "you lost your keys on a walk", "your football team lost the final",
    "a pipe burst in your bathroom", "you overslept and missed a job interview",
    "the shop refused to refund a broken kettle", "you got a parking ticket",
    "your coffee machine stopped working", "the lift in your building was out of order for a week",
    "your cake collapsed in the oven", "your holiday photos were deleted by accident",
    "your package was delivered to the wrong address", "you sprained your ankle before a race",
    "your new shoes gave you blisters", "the library book you wanted was already on loan",
    "you queued for an hour and the tickets ran out", "your plants died while you were away",
    "your car would not start on a frosty morning", "the ferry was cancelled because of a storm",
    "you were charged twice for the same order", "your presentation file would not open",
    "the power went out during your favourite show", "your suitcase was lost at the airport",
    "you got caught in a downpour without a coat", "the cafe forgot your order",
    "your printer jammed before an important deadline", "the swimming pool was closed for repairs",
    "your friend cancelled plans at the last minute", "you stepped in a deep puddle on the way to work",
    "the supermarket was out of milk", "you waited all day for a repair man who never came",
    "your train seat reservation was given to someone else", "your ice cream fell on the pavement",
]

REQUESTS = [
    "Describe in one or two sentences how it went when {s}.",
    "In a sentence or two, tell me about a day when {s}.",
    "Write one or two sentences about the time {s}.",
    "Briefly recount, in two sentences at most, what happened when {s}.",
    "Tell me in one or two sentences what it was like when {s}.",
    "Write a short note (one or two sentences) about the morning {s}.",
]


class PromptDataError(InputError):
    """The prompt data cannot be used as it is; the message says which rows and what to do."""


@dataclass
class Prompt:
    index: int  # position in its split (row number until split): stable, so runs can count consumption
    text: str  # the user request as given
    token_ids: list[int]  # chat template applied, generation prompt appended


def builtin_setbacks() -> list[str]:
    """Every (request, setback) combination, in a fixed order."""
    return [r.format(s=s) for s, r in itertools.product(SETBACKS, REQUESTS)]


def read_rows(path: str, column: str) -> list:
    """The `column` values of a local JSONL/JSON/Parquet/CSV file or a Hub dataset, via `datasets`."""
    if path == BUILTIN_SETBACKS:
        return builtin_setbacks()
    ds = read_dataset(path, PromptDataError, f"one prompt per row in column {column!r}")
    if column not in ds.column_names:
        raise PromptDataError(f"{path} has no column {column!r}; its columns are {ds.column_names}. "
                              f"Set data.prompt_column to the one that holds the prompts")
    return ds[column]


FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def read_dataset(path: str | list[str], error: type[Exception], holds: str):
    """A local JSONL/JSON/Parquet/CSV file (or a list of JSONL parts, as one) or a Hub dataset's train split,
    through `datasets`; any failure is raised as `error` with what the file should hold."""
    import datasets

    if isinstance(path, list):  # the parts of one data set
        source, builder, files = str(Path(path[0]).parent), "json", path
    else:
        local = Path(path).expanduser()
        source, builder, files = path, None, None
        if local.exists():
            if local.suffix not in FILE_FORMATS:
                raise error(f"{path}: unknown file type {local.suffix!r}; use one of {', '.join(FILE_FORMATS)}")
            if local.stat().st_size == 0:
                raise error(f"{path} is empty; it must hold {holds}")
            builder, files = FILE_FORMATS[local.suffix], str(local)
    if builder is not None:
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train")
        except Exception as exc:  # datasets raises several types for unreadable files
            raise error(f"{source} could not be read as {builder}: {exc}") from exc
    else:
        try:
            ds = datasets.load_dataset(path, split="train")
        except Exception as exc:
            raise error(f"{path!r} is neither a local file nor a Hub dataset whose 'train' split could be "
                        f"loaded: {exc}") from exc
    if len(ds) == 0:
        raise error(f"{source} has no rows")
    return ds


def rows_report(source: str, problems: list[str], total: int, fix: str) -> str:
    """Every unusable row of a data file in one message: "row N: reason" lines (the first 10) and what to do."""
    shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
    return f"{source}: {len(problems)} of {total} rows are unusable:\n  {shown}\n{fix}"


def encode(rows: list, tokenizer, max_tokens: int, system_prompt: str = "", source: str = "") -> list[Prompt]:
    """Check every row and apply the chat template; all bad rows are reported together, by row number."""
    problems = []
    prompts = []
    for i, text in enumerate(rows):
        if not isinstance(text, str) or not text.strip():
            problems.append(f"row {i}: prompt is {'empty' if isinstance(text, str) else type(text).__name__}")
            continue
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        if len(ids) > max_tokens:
            problems.append(f"row {i}: prompt is {len(ids)} tokens with the chat template, over "
                            f"data.max_prompt_tokens = {max_tokens} ({text[:50]!r}...)")
            continue
        prompts.append(Prompt(index=i, text=text, token_ids=list(ids)))
    if problems:
        raise PromptDataError(rows_report(source or "prompt data", problems, len(rows),
                                          "Fix or remove these rows (or raise data.max_prompt_tokens)."))
    return prompts


def load_prompts(cfg: DataConfig, tokenizer) -> tuple[list[Prompt], list[Prompt]]:
    """(train, eval) prompts for a DataConfig: eval is `eval_path`, or `eval_size` rows split off by seed."""
    def read(path):
        return encode(read_rows(path, cfg.prompt_column), tokenizer, cfg.max_prompt_tokens,
                      cfg.system_prompt, path)

    prompts = read(cfg.path)  # every row checked, reported by its row number in the file
    if cfg.eval_path:
        train, evals = prompts, read(cfg.eval_path)
    else:
        if len(prompts) <= cfg.eval_size:
            raise PromptDataError(f"{cfg.path} has {len(prompts)} prompts: too few to split off data.eval_size = "
                                  f"{cfg.eval_size} for evaluation; lower eval_size or give data.eval_path")
        order = list(range(len(prompts)))
        random.Random(cfg.seed).shuffle(order)
        held_out = set(order[:cfg.eval_size])
        evals = [p for p in prompts if p.index in held_out]
        train = [p for p in prompts if p.index not in held_out]
    return _renumber(train), _renumber(evals)


def _renumber(prompts: list[Prompt]) -> list[Prompt]:
    return [Prompt(index=i, text=p.text, token_ids=p.token_ids) for i, p in enumerate(prompts)]
