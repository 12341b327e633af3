"""Preference pairs for reward-model training: loaded through `datasets`, checked row by row, written, split.

Two layouts are read. The explicit form has a prompt column and the two replies. The conversation form
(Anthropic HH-RLHF) has only two whole dialogues per row, as HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...")
or as lists of {"role", "content"} messages; the turns before the final assistant reply must be the same
in both, and become the prompt. Every bad row is reported by its row number in the source file.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import InputError
from core.prompts import read_dataset, rows_report

FORMS = ("explicit", "conversation")
ROLES = ("user", "assistant", "system")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class PreferenceDataError(InputError):
    """The preference data cannot be used as it is; the message names the file, the rows and what to do."""


class BadRow(Exception):
    """One row is unusable; the message is the reason, without the row number (the preference and the
    demonstration loaders collect them and report them together)."""


@dataclass
class PreferencePair:
    prompt: str | list[dict]  # the user request, or the dialogue before the final reply as role/content messages
    chosen: str  # preferred final assistant reply
    rejected: str  # the other reply
    row: int = -1  # row number in the source file (0-based); -1 when generated
    # False for a reply cut off at the sampler's length limit (the columns chosen_finished/rejected_finished,
    # written by make-preferences): it ends without EOS, and a policy trained on it must not learn to stop there
    chosen_finished: bool = True
    rejected_finished: bool = True


@dataclass
class PreferenceSet:
    pairs: list[PreferencePair]
    skipped: list[str] = field(default_factory=list)  # one "row N: reason" per row skipped


FINISHED_COLUMNS = ("chosen_finished", "rejected_finished")


def load_preferences(path: str, *, form: str = "explicit", prompt_column: str = "prompt",
                     chosen_column: str = "chosen", rejected_column: str = "rejected",
                     on_bad_row: str = "error") -> PreferenceSet:
    """Pairs from a local JSONL/JSON/Parquet/CSV file or a Hub dataset; bad rows raise or are skipped."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"preferences.on_bad_row must be 'error' or 'skip', not {on_bad_row!r}")
    if form not in FORMS:
        raise ValueError(f"preferences.form must be one of {FORMS}, not {form!r}")
    fields = {"chosen_column": chosen_column, "rejected_column": rejected_column}
    if form == "explicit":
        fields = {"prompt_column": prompt_column, **fields}
    ds = _read(path)
    missing = {f: c for f, c in fields.items() if c not in ds.column_names}
    if missing:
        hints = "; ".join(f"set preferences.{f} to the column that holds {_holds(f, form)}" for f in missing)
        raise PreferenceDataError(f"{path} lacks the column(s) {', '.join(map(repr, missing.values()))}; "
                                  f"its columns are {ds.column_names}. To fix: {hints}")

    pairs, problems = [], []
    ended = [c for c in FINISHED_COLUMNS if c in ds.column_names]
    for i, row in enumerate(ds.select_columns(list(set(fields.values())) + ended).to_list()):
        try:
            if form == "explicit":
                pair = _explicit_pair(row[prompt_column], row[chosen_column], row[rejected_column])
            else:
                pair = _conversation_pair(row[chosen_column], row[rejected_column])
        except BadRow as exc:
            problems.append(f"row {i}: {exc}")
            continue
        pair.row = i
        for column in ended:  # a row without the flag (None) holds a reply that ended
            setattr(pair, column, row[column] is None or bool(row[column]))
        pairs.append(pair)

    if problems and on_bad_row == "error":
        raise PreferenceDataError(rows_report(path, problems, len(ds),
                                              "Fix these rows, or set preferences.on_bad_row=skip to train without them."))
    if not pairs:
        raise PreferenceDataError(f"{path}: none of its {len(ds)} rows is a usable preference pair "
                                  f"(first problem: {problems[0]})")
    return PreferenceSet(pairs=pairs, skipped=problems)


def write_preferences(path: str | Path, pairs: list[PreferencePair], extra: list[dict] | None = None) -> None:
    """JSONL in the explicit form; `extra[i]` adds columns (gold scores, say) to row i."""
    if extra is not None and len(extra) != len(pairs):
        raise ValueError(f"extra has {len(extra)} entries for {len(pairs)} pairs; give one dict per pair")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, pair in enumerate(pairs):
            row = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
            clash = set(row) & set(extra[i]) if extra else set()
            if clash:
                raise ValueError(f"extra[{i}] would overwrite the column(s) {sorted(clash)}")
            row.update(extra[i] if extra else {})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def conversation(prompt: str | list[dict], response: str) -> list[dict]:
    """The messages of a prompt (a user request or a dialogue) followed by the assistant's `response`."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    return messages + [{"role": "assistant", "content": response}]


def split_pairs(pairs: list, eval_fraction: float, seed: int, field: str = "preferences.eval_fraction"
                ) -> tuple[list, list]:
    """(train, eval): a shuffle by `seed`, then the first `eval_fraction` (the config's `field`) of it held out
    for evaluation."""
    n_eval = round(len(pairs) * eval_fraction)
    if not 0 < n_eval < len(pairs):
        raise PreferenceDataError(f"{len(pairs)} rows with {field} = {eval_fraction} leave {n_eval} for evaluation "
                                  f"and {len(pairs) - n_eval} for training; both need at least one, so choose a "
                                  f"fraction strictly between the two or add data")
    order = list(pairs)
    random.Random(seed).shuffle(order)
    return order[n_eval:], order[:n_eval]


def _holds(config_field: str, form: str) -> str:
    if config_field == "prompt_column":
        return "the prompts (or use preferences.form=conversation if the rows hold whole dialogues)"
    reply = "preferred" if config_field == "chosen_column" else "other"
    return f"the {reply} {'dialogues' if form == 'conversation' else 'replies'}"


def _read(path: str):
    return read_dataset(path, PreferenceDataError, "one preference pair per row")


def _explicit_pair(prompt, chosen, rejected) -> PreferencePair:
    if isinstance(prompt, list):
        prompt = check_messages(prompt, "prompt")
        if not any(m["content"].strip() for m in prompt):
            raise BadRow("prompt has no text in any message")
    else:
        prompt = check_text(prompt, "prompt")
    return PreferencePair(prompt, *_replies(check_text(chosen, "chosen"), check_text(rejected, "rejected")))


def _conversation_pair(chosen, rejected) -> PreferencePair:
    chosen_turns, rejected_turns = _dialogue(chosen, "chosen"), _dialogue(rejected, "rejected")
    prefix = chosen_turns[:-1]
    if prefix != rejected_turns[:-1]:
        raise BadRow("chosen and rejected dialogues differ before their final assistant turn")
    if not any(m["content"].strip() for m in prefix):
        raise BadRow("the dialogue has no turn before the final assistant reply")
    prompt = prefix[0]["content"] if len(prefix) == 1 and prefix[0]["role"] == "user" else prefix
    return PreferencePair(prompt, *_replies(chosen_turns[-1]["content"], rejected_turns[-1]["content"]))


def _replies(chosen: str, rejected: str) -> tuple[str, str]:
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise BadRow(f"{name} reply is empty")
    if chosen.strip() == rejected.strip():
        raise BadRow("chosen and rejected replies are identical")
    return chosen, rejected


def check_text(value, name: str) -> str:
    if value is None:
        raise BadRow(f"{name} is missing")
    if not isinstance(value, str):
        raise BadRow(f"{name} is {type(value).__name__}, not a string")
    if not value.strip():
        raise BadRow(f"{name} is empty")
    return value


def check_messages(value: list, name: str) -> list[dict]:
    """Role/content messages only: columnar files give every message each key any message has, as None."""
    if not value:
        raise BadRow(f"{name} is an empty list of messages")
    messages = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRow(f"{name} message {j} is not {{'role': one of {ROLES}, 'content': str}}: {str(m)[:80]}")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _dialogue(value, name: str) -> list[dict]:
    """A whole dialogue as messages, from HH text or a message list; it must end with the assistant."""
    if value is None:
        raise BadRow(f"{name} is missing")
    if isinstance(value, str):
        parts = HH_TURN.split(value)  # [before, role, text, role, text, ...]
        if len(parts) < 3 or parts[0].strip():
            raise BadRow(f"{name} is not HH text made of '\\n\\nHuman:' and '\\n\\nAssistant:' turns")
        messages = [{"role": HH_ROLES[r], "content": t.strip()} for r, t in zip(parts[1::2], parts[2::2])]
    elif isinstance(value, list):
        messages = check_messages(value, name)
    else:
        raise BadRow(f"{name} is {type(value).__name__}, not HH text or a list of messages")
    if messages[-1]["role"] != "assistant":
        raise BadRow(f"{name} does not end with an assistant turn")
    return messages
