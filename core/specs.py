"""The specs a config names a scorer, a judge or a model by, parsed and checked without loading anything heavy:
the config's validation calls these, so that a misspelt module, function or directory is refused before Ray,
the workers or the learner start, by `rlhf config` and `rlhf plan` as by every command. reward_server/scorers.py
builds the scorers from the same grammar.

- scorer: `vader`, `model:<dir>` (a sequence-classification reward model saved with save_pretrained) or
  `python:<module>:<function>` (any importable function of (prompts, responses));
- judge (`elo.judge`): `gold`, `reward`, `pairwise:<module>:<function>`, or a scorer spec;
- model (`model.path`): a local HF model directory, or `embedded:<name>`;
- prompt data (`data.path`): a name with a data file's suffix must be a file here (anything else is taken for a
  Hub dataset, which would fail late, over the network).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable

from core.config_fields import ConfigError

SCORER_FORMS = "`vader`, `model:<dir>` or `python:<module>:<function>`"
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = ("smollm2-135m-instruct", "tiny")
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.gguf")


def parse_scorer(spec: str) -> tuple[str, str]:
    """(kind, argument) of a scorer spec: ("vader", ""), ("model", dir) or ("python", "module:function")."""
    kind, _, rest = spec.partition(":")
    if spec == "vader" or (kind in ("model", "python") and rest):
        return kind, rest
    raise ValueError(f"unknown scorer {spec!r}; use {SCORER_FORMS}")


def load_function(spec: str) -> Callable:
    """The function named `module.path:function`, imported."""
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name or ":" in function_name:
        raise ValueError(f"function {spec!r} must look like module.path:function (e.g. my_rewards:length_reward)")
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as e:  # a parent package missing
        found, why = None, str(e)
    else:
        why = "no such module"
    if found is None:
        raise ImportError(f"cannot import module {module_name!r} of {spec!r}: {why}; it must be importable on the "
                          f"Python path (the working directory, or an installed package)")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ImportError(f"importing module {module_name!r} of {spec!r} failed: {type(e).__name__}: {e}") from e
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"module {module_name!r} has no function {function_name!r} ({spec!r})")
    return function


def model_dir_problem(path: str, what: str) -> str | None:
    """Why `path` is not a saved HF model directory (config.json and weights), or None if it is one."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return f"{path!r} is not a directory; {what} is a local directory written by save_pretrained"
    if not (directory / "config.json").is_file():
        return f"{path!r} holds no config.json; {what} is a local directory written by save_pretrained"
    if not any(next(directory.glob(pattern), None) for pattern in WEIGHT_FILES):
        return f"{path!r} holds no weights ({', '.join(WEIGHT_FILES)}); was its save_pretrained cut short?"
    return None


def check_scorer(spec: str, field: str) -> None:
    """Refuse a scorer spec that names nothing usable, naming the config `field`."""
    try:
        kind, argument = parse_scorer(spec)
        if kind == "python":
            load_function(argument)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"{field} = {spec!r}: {e}") from None
    if kind == "model" and (problem := model_dir_problem(argument, "a reward model")):
        raise ConfigError(f"{field} = {spec!r}: {problem}")


def check_judge(spec: str, field: str) -> None:
    """`gold`, `reward`, `pairwise:<module>:<function>` or a scorer spec."""
    if spec in ("gold", "reward"):
        return
    if spec.startswith("pairwise:"):
        try:
            load_function(spec.removeprefix("pairwise:"))
        except (ImportError, ValueError) as e:
            raise ConfigError(f"{field} = {spec!r}: {e}") from None
        return
    check_scorer(spec, field)


def check_model(path: str, field: str) -> None:
    """A local HF model directory or an embedded model's name."""
    if path.startswith(EMBEDDED_PREFIX):
        if path.removeprefix(EMBEDDED_PREFIX) not in EMBEDDED_MODELS:
            raise ConfigError(f"{field} = {path!r} names no embedded model; choose one of "
                              f"{', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)} or give a local directory")
        return
    if problem := model_dir_problem(path, "a policy"):
        raise ConfigError(f"{field} = {problem}; or use `embedded:smollm2-135m-instruct`")


def check_data_file(path: str, field: str) -> None:
    """A path named like a local data file (`.jsonl`, `.json`, `.parquet`, `.csv`) is a file here."""
    from core.prompts import FILE_FORMATS

    if path and Path(path).suffix in FILE_FORMATS and not Path(path).expanduser().is_file():
        raise ConfigError(f"{field} = {path!r}: no such file (a Hub dataset is named without a file suffix)")
