"""Cancelling a request from another thread: a flag the work checks at its step boundaries.

A server runs a request's steps in a worker thread and cannot interrupt a step from outside; it sets
the request's ``CancelToken`` instead, and the work stops at the next boundary (between image
preprocessing stages, before prefill, between decode steps) by raising ``Cancelled``.  Each step
is bounded (images are size- and ratio-limited, prompts fit the context), so a cancel takes effect
within one step.
"""

from __future__ import annotations

import threading


class Cancelled(Exception):
    """The request was cancelled; raised at the next step boundary."""


class CancelToken:
    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise ``Cancelled`` if the request was cancelled."""
        if self._event.is_set():
            raise Cancelled


def check(token: CancelToken | None) -> None:
    """``token.check()``, for code where the token is optional."""
    if token is not None:
        token.check()
