"""Errors a user can fix. The CLI prints them as one line, `error: ...`, and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or configuration, not a bug."""


class BadInputError(UserError):
    """A corpus or validation file that cannot be read: names the file, line and field."""

    def __init__(self, path: object, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")
