"""The errors the `rlhf` command turns into an exit status with the message alone, no traceback:
`InputError` (2), the base of every error that a user's input causes (a config value, a data row, a path, a
scorer spec) and that the user mends; `CannotPlace` (1), a role the cluster cannot hold; `JobHung` (3), roles
that stopped answering."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: the message names what is wrong (the config field, the file and row) and what to do."""


class CannotPlace(RuntimeError):
    """A role the cluster cannot hold: the message says what is missing and what to change."""


class JobHung(RuntimeError):
    """A job stopped because roles stopped answering: the message names them and the file with their Python
    stacks."""
