"""Errors a user can fix. The CLI prints them without a traceback and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a config field, a CLI argument, a missing file. Message says what and where."""


EXIT_USAGE = 2
