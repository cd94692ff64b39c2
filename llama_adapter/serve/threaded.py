"""A blocking, step-by-step job (a generator) driven from asyncio, so that cancelling really stops it.

A server that runs a generator's steps in worker threads and is told to cancel (its task gets
``CancelledError``) cannot interrupt the step in progress: the thread runs on, the generator is
closed whenever it is garbage-collected, and a next job that starts meanwhile overlaps with it.
``iterate_in_thread`` instead sets the job's ``CancelToken`` (which the work checks at its step
boundaries), waits until the step in progress has returned and the generator has been closed in
its thread, and only then lets the cancellation through.  Whoever waits for the task (a
concurrency slot, a queue) is thus released when the work has truly stopped.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from ..cancel import CancelToken

T = TypeVar("T")

# Jobs on one model run one at a time; a second worker lets a job start while another's close finishes.
_workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="job")
_DONE = object()


async def iterate_in_thread(make: Callable[[CancelToken], Iterator[T]]) -> AsyncIterator[T]:
    """The items of ``make(token)``, each step run in a worker thread (with this task's context vars)."""
    token = CancelToken()
    context = contextvars.copy_context()  # e.g. the web framework's per-request state, for warnings it shows
    it = make(token)
    try:
        while True:
            item = await _settled(_workers.submit(context.run, next, it, _DONE), token)
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
    finally:
        # Closing runs the generator's own clean-up (its finally blocks) in a worker, never on the event loop.
        await _settled(_workers.submit(context.run, it.close), token)


async def _settled(step: Future[T], token: CancelToken) -> T:
    """The step's result; if this task is cancelled meanwhile, the token is set and the step still
    awaited (it ends at its next boundary) before the cancellation goes on."""
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(asyncio.wrap_future(step))
        except asyncio.CancelledError:  # only this task's: the shielded step runs on
            cancelled = True
            token.cancel()
            continue
        except BaseException:
            if cancelled:
                raise asyncio.CancelledError from None
            raise
        if cancelled:
            raise asyncio.CancelledError
        return result
