"""Demonstrations for supervised fine-tuning, read through `datasets` and checked row by row.

Two layouts are read: prompt/response columns (the prompt a string or role/content messages), or a
messages column of whole dialogues ending with the assistant's reply, which is the response to learn and
the turns before it the prompt. Every bad row is reported by its row number, all of them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.errors import InputError
from core.preferences import ROLES, BadRow, check_messages, check_text
from core.prompts import read_dataset, rows_report

if TYPE_CHECKING:
    from core.config import SFTConfig


class DemonstrationError(InputError):
    """The demonstrations cannot be used as they are; the message names the file, the rows and what to do."""


@dataclass
class Demonstration:
    prompt: str | list[dict]  # the user request, or the dialogue before the reply as role/content messages
    response: str  # the demonstrated assistant reply
    row: int = -1  # row number in the source file (0-based); -1 when generated
    finished: bool = True  # False: a sampled reply cut off at the length limit (it ends without EOS)


def load_demonstrations(path: str, cfg: SFTConfig) -> tuple[list[Demonstration], list[str]]:
    """(demonstrations, "row N: reason" of each bad row skipped); with `sft.on_bad_row=error` any bad row
    raises, all of them named together."""
    ds = read_dataset(path, DemonstrationError, "one demonstration per row")
    if cfg.messages_column in ds.column_names:
        columns = [cfg.messages_column]
    elif cfg.prompt_column in ds.column_names and cfg.response_column in ds.column_names:
        columns = [cfg.prompt_column, cfg.response_column]
    else:
        raise DemonstrationError(f"{path} has neither a {cfg.messages_column!r} column nor both "
                                 f"{cfg.prompt_column!r} and {cfg.response_column!r}; its columns are "
                                 f"{ds.column_names}. Set sft.messages_column, or sft.prompt_column and "
                                 f"sft.response_column, to the columns that hold the demonstrations")
    demos, problems = [], []
    for i, row in enumerate(ds.select_columns(columns).to_list()):
        try:
            demo = (_from_messages(row[cfg.messages_column]) if len(columns) == 1
                    else _from_columns(row[cfg.prompt_column], row[cfg.response_column]))
        except BadRow as exc:
            problems.append(f"row {i}: {exc}")
            continue
        demo.row = i
        demos.append(demo)
    raise_or_skip(path, problems, len(ds), cfg.on_bad_row)
    if not demos:
        raise DemonstrationError(f"{path}: none of its {len(ds)} rows is a usable demonstration "
                                 f"(first problem: {problems[0]})")
    return demos, problems


def raise_or_skip(source: str, problems: list[str], total: int, on_bad_row: str, setting: str = "sft.on_bad_row",
                  error: type[Exception] = DemonstrationError) -> None:
    """With `on_bad_row=error`, every problem row of `source` in one `error`, which names the config's
    `setting` that would skip them."""
    if problems and on_bad_row == "error":
        raise error(rows_report(source, problems, total, f"Fix these rows, or set {setting}=skip to train without "
                                                         f"them."))


def _from_columns(prompt, response) -> Demonstration:
    prompt = check_messages(prompt, "prompt") if isinstance(prompt, list) else check_text(prompt, "prompt")
    return Demonstration(prompt, check_text(response, "response"))


def _from_messages(messages) -> Demonstration:
    if not isinstance(messages, list):
        raise BadRow(f"messages is {type(messages).__name__}, not a list of {{'role': one of {ROLES}, 'content'}}")
    messages = check_messages(messages, "messages")
    if messages[-1]["role"] != "assistant":
        raise BadRow("messages do not end with the assistant's reply (the response to learn)")
    if len(messages) < 2:
        raise BadRow("messages hold the assistant's reply but no request before it")
    return Demonstration(messages[:-1], check_text(messages[-1]["content"], "response"))
