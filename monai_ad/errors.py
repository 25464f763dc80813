"""Errors a user can act on: one line naming the file and what is wrong."""

from __future__ import annotations

import os


class InputError(ValueError):
    """Bad user input (a file, a model, an option). ``str(err)`` is the one-line message shown to users."""

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
