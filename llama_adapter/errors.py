"""The package's own errors: one base class, so a caller can catch everything we raise on bad input.

Each also derives from the builtin it always was (ValueError, RuntimeError), so code written against
those keeps working.  Every message says what went wrong and what to do; ``user_message`` is the one
place that turns an exception into the text a command line or the app shows.
"""

from __future__ import annotations


class LlamaAdapterError(Exception):
    """Base of every error this package raises on bad input, files or settings."""


class CheckpointError(LlamaAdapterError, ValueError):
    """A weight file is unreadable, or does not match the model it is loaded into."""


class ResolveError(LlamaAdapterError, RuntimeError):
    """A name could not be turned into local files; the message says what to do."""


class ImageError(LlamaAdapterError, ValueError):
    """An image could not be read or used; the message says which and what to do."""


class TextError(LlamaAdapterError, ValueError):
    """Text that cannot be tokenised: not valid Unicode, or far too long for the model."""


class DataError(LlamaAdapterError, ValueError):
    """A dataset file cannot be used; the message lists every bad record."""


class TrainError(LlamaAdapterError, RuntimeError):
    """Training cannot start or continue; the message says why and what to do."""


# What a command line reports as ``error: <message>`` (exit status 2) instead of a traceback: our own
# errors, missing files and invalid values.  Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (LlamaAdapterError, FileNotFoundError, ValueError)


def user_message(err: BaseException) -> str:
    """The one-line-or-more text shown to a user for an error in ``USER_ERRORS``."""
    return str(err) or type(err).__name__
