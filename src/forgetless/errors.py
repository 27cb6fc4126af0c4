"""Error types. ``InputError`` marks a user mistake: the CLI prints its one line and exits 2."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input (config, data, model, adapter). The message names the file/field/line and the fix."""


class MissingDependencyError(InputError):
    """An optional package or model file is not installed; the message says what to install."""
