"""The two errors the backbone commands report as a message (never a traceback)."""

from __future__ import annotations

from .. import errors


class BackboneError(errors.LlamaAdapterError, ValueError):
    """A backbone or adapter cannot be used as asked; the message says which and what to do."""


class DataError(errors.DataError):
    """The data cannot be used; the message lists every problem with its file or record."""

    def __init__(self, problems: list[str] | str) -> None:
        problems = [problems] if isinstance(problems, str) else problems
        super().__init__(problems[0] if len(problems) == 1 else f"{len(problems)} problems in the data:\n  " + "\n  ".join(problems))
