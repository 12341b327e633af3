"""The building blocks of every config section: `opt` (a field with its help text and allowed range), the
error every config check raises, and the dtype choices and help texts the sections share."""

from __future__ import annotations

import dataclasses
from typing import Any

from core.errors import InputError


class ConfigError(InputError):
    """A config value is missing, unknown, of the wrong type or out of range."""


def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, choices: tuple | None = None):
    """A config field with its help text and allowed range."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


DTYPES = ("float32", "bfloat16", "float16")
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
LORA_ALPHA_HELP = "LoRA scaling numerator: the adapter's update is scaled by lora_alpha / lora_rank"
LORA_TARGETS_HELP = "comma-separated names of the linear layers that get adapters"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
AUTO_HELP = "`auto`: bfloat16 on CUDA or on a CPU with native bf16 (AVX512-BF16/AMX), else float32"
AUTOCAST_HELP = "autocast compute dtype; `none` computes in `dtype`; " + AUTO_HELP.replace("float32", "none")
