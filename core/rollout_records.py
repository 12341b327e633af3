"""Scored replies kept for offline learning: the rollouts a job trained on, written as they are trained on
(`train.keep_rollouts`), and any data set of prompt, response and reward columns read back (`rlhf ilql`).

A job writes one JSONL part per step into `<train.output_dir>/rollouts/` (`step-000012.jsonl`), each whole or
absent (written under a temporary name and renamed), so a crash loses at most the step it was in. A resumed job
first removes the parts of the steps after its checkpoint, which it trains again: the folder then holds exactly
the rollouts the final policy was trained on, none twice. `datasets.load_dataset("json", data_dir=...)` reads
the folder as it is.

Each row: `prompt`, `response`, `reward`, `run`, `step`, `version` (the policy version that sampled it),
`prompt_index`, `finished`, and the tokens as sampled (`prompt_ids`, `response_ids`) with the `tokenizer` that
made them (`tokenizer_id`), so that a reader with another tokenizer refuses them rather than misread them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from core import storage
from core.demonstrations import raise_or_skip
from core.errors import InputError
from core.preferences import BadRow, PreferencePair, check_messages, check_text
from core.prompts import read_dataset

PART = re.compile(r"step-(\d+)\.jsonl$")


class RolloutDataError(InputError):
    """Scored replies that cannot be used as they are; the message names the file, the rows and what to do."""


def tokenizer_id(tokenizer) -> str:
    """A tokenizer's fingerprint: its class, vocabulary size and a hash of its vocabulary (two directories of
    one model's tokenizer share it; another model's differs)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    digest = hashlib.sha256(vocab.encode()).hexdigest()[:16]
    return f"{type(tokenizer).__name__.removesuffix('Fast')}/{len(tokenizer)}/{digest}"


class RolloutRecords:
    """The rollout parts of one job's output directory (a path or a storage URI)."""

    def __init__(self, output_dir: str, run: str, model: str, tokenizer: str):
        self.location = storage.join(output_dir, "rollouts")
        self.run, self.model, self.tokenizer = run, model, tokenizer

    def write(self, step: int, rows: list[dict]) -> None:
        """Step `step`'s rollouts, each a row dict (`prompt`, `response`, `reward`, ...) to which the run, the step,
        the model and the tokenizer are added; the part appears whole or not at all."""
        name = f"step-{step:06d}.jsonl"
        text = "".join(json.dumps({**row, "run": self.run, "step": step, "model": self.model,
                                   "tokenizer": self.tokenizer}, ensure_ascii=False) + "\n" for row in rows)
        if storage.is_uri(self.location):  # an object store publishes an object when it is closed
            storage.Location(self.location).write_text(name, text)
            return
        folder = Path(self.location)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / name)

    def steps(self) -> list[int]:
        """The steps whose parts are there, in order."""
        location = storage.Location(self.location)
        if not location.is_dir():
            return []
        return sorted(int(m.group(1)) for name in location.names() if (m := PART.search(name)))

    def drop_after(self, step: int) -> list[int]:
        """Remove the parts of the steps after `step` (a resumed job trains them again); returns those steps."""
        later = [s for s in self.steps() if s > step]
        for s in later:
            storage.Location(self.location).delete(f"step-{s:06d}.jsonl")
        return later


@dataclass
class ScoredReply:
    prompt: str | list[dict]  # the user request, or the dialogue before the reply
    response: str
    reward: float
    row: int  # row number in the data set (0-based; in a rollouts folder, over its parts in step order)
    prompt_ids: list[int] | None = None  # the tokens as sampled, where the data holds them
    response_ids: list[int] | None = None
    finished: bool = True  # False: cut off at the sampler's length limit (a `finished` column says so)

    @property
    def prompt_key(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else json.dumps(self.prompt, sort_keys=True)


def by_prompt(replies: list[ScoredReply]) -> list[list[ScoredReply]]:
    """The replies grouped by prompt, each group best first (by reward; ties keep the data's order), the groups
    in the order their prompts first appear."""
    groups: dict[str, list[ScoredReply]] = {}
    for reply in replies:
        groups.setdefault(reply.prompt_key, []).append(reply)
    return [sorted(group, key=lambda r: -r.reward) for group in groups.values()]


def best_share(replies: list[ScoredReply], fraction: float) -> list[ScoredReply]:
    """Each prompt's best `fraction` of its replies by reward (at least one; rounded to the nearest count): the
    demonstrations of filtered SFT (`sft.best_fraction`)."""
    return [r for group in by_prompt(replies) for r in group[:max(1, round(fraction * len(group)))]]


def best_against_worst(replies: list[ScoredReply], min_margin: float) -> list[PreferencePair]:
    """One pair per prompt with two or more replies: its best reply chosen over its worst, where their rewards
    differ by at least `min_margin` (`preferences.form=scored`)."""
    pairs = []
    for group in by_prompt(replies):
        best, worst = group[0], group[-1]
        if len(group) >= 2 and best.reward - worst.reward >= min_margin and best.response != worst.response:
            pairs.append(PreferencePair(best.prompt, best.response, worst.response, row=best.row,
                                        chosen_finished=best.finished, rejected_finished=worst.finished))
    return pairs


def rollout_parts(path: str) -> list[str]:
    """The parts of a rollouts folder in step order (a folder without parts is an error)."""
    folder = Path(path).expanduser()
    parts = sorted((p for p in folder.iterdir() if PART.search(p.name)), key=lambda p: int(PART.search(p.name)[1]))
    if not parts:
        raise RolloutDataError(f"{path} is a folder without rollout parts (step-NNNNNN.jsonl); point at the "
                               f"rollouts folder of a job run with train.keep_rollouts=true, or at a data file")
    return [str(p) for p in parts]


def load_scored(path: str, columns: tuple[str, str, str], tokenizer: str | None, on_bad_row: str, setting: str
                ) -> tuple[list[ScoredReply], list[str]]:
    """(replies, "row N: reason" of each bad row skipped) from a data file or a rollouts folder; `columns` names
    the prompt, response and reward columns. Rows without a reward, with a non-finite one, or with an empty
    response are bad rows (with `on_bad_row=error`, all of them raised together, naming `setting`'s field to
    skip them). Token ids are kept where the data holds them, and refused when another tokenizer made them;
    `tokenizer` None reads the text only (the reader tokenises it anew)."""
    prompt_col, response_col, reward_col = columns
    data = rollout_parts(path) if Path(path).expanduser().is_dir() else path
    ds = read_dataset(data, RolloutDataError, "one scored reply per row")
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise RolloutDataError(f"{path} has no column {', '.join(map(repr, missing))}; its columns are "
                               f"{ds.column_names}. Set {setting.rsplit('.', 1)[0]}.prompt_column, response_column "
                               f"and reward_column to the columns that hold them")
    with_ids = tokenizer is not None and {"prompt_ids", "response_ids", "tokenizer"} <= set(ds.column_names)
    if with_ids:
        _check_tokenizer(path, ds, tokenizer)
    replies, problems = [], []
    for i, row in enumerate(ds.to_list()):
        try:
            reply = _scored(row[prompt_col], row[response_col], row[reward_col], i)
        except BadRow as exc:
            problems.append(f"row {i}: {exc}")
            continue
        if with_ids:
            reply.prompt_ids, reply.response_ids = row["prompt_ids"], row["response_ids"]
        reply.finished = row.get("finished") is not False
        replies.append(reply)
    raise_or_skip(path, problems, len(ds), on_bad_row, setting, RolloutDataError)
    if not replies:
        raise RolloutDataError(f"{path}: none of its {len(ds)} rows is a usable scored reply "
                               f"(first problem: {problems[0]})")
    return replies, problems


def _check_tokenizer(path: str, ds, tokenizer: str) -> None:
    found = {(m, t) for m, t in zip(ds["model"] if "model" in ds.column_names else [None] * len(ds), ds["tokenizer"])}
    other = [(m, t) for m, t in found if t != tokenizer]
    if other:
        model, theirs = other[0]
        raise RolloutDataError(
            f"{path} holds token ids made by another tokenizer than this model's: the rollouts of model "
            f"{model!r} (tokenizer {theirs}), this model's tokenizer is {tokenizer}. Train the model that sampled "
            f"them, or remove the prompt_ids, response_ids and tokenizer columns to have the text tokenised anew")


def _scored(prompt, response, reward, row: int) -> ScoredReply:
    prompt = check_messages(prompt, "prompt") if isinstance(prompt, list) else check_text(prompt, "prompt")
    response = check_text(response, "response")
    if reward is None:
        raise BadRow("no reward")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise BadRow(f"reward is {type(reward).__name__} {reward!r}, not a number")
    if not math.isfinite(reward):
        raise BadRow(f"reward is {reward}, not finite")
    return ScoredReply(prompt, response, float(reward), row)
