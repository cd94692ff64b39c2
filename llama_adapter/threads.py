"""Heavy torch work of a serving process in threads that end with it: one live OpenMP pool at a time.

Each thread that runs a parallel torch op gets an OpenMP thread pool of its own, kept until the
thread ends. While a second pool is alive (the main thread's, say, from loading the model), the
scheduler thread's parallel regions run far slower: on 2 cores its d1024 decode step took about 1.35x
as long as with no other pool (median of 4 runs; single runs 1.1-1.8x) (``bench/pools.py``).  So loading, image encoding and each request's
adapter K/V run in a thread that ends when they return, and takes its pool with it.
"""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_local = threading.local()


def in_passing_thread(fn: Callable[P, T]) -> Callable[P, T]:
    """``fn`` run in a fresh thread (with the caller's context vars) that ends when it returns.

    Calls from inside such a thread run inline.  The caller blocks until the result (or the
    exception, re-raised as is) is there.
    """

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        if getattr(_local, "passing", False):
            return fn(*args, **kwargs)
        outcome: list[T] = []
        failure: list[BaseException] = []

        def target() -> None:
            _local.passing = True
            try:
                outcome.append(fn(*args, **kwargs))
            except BaseException as e:  # re-raised in the caller
                failure.append(e)

        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(target,), name=f"llama-adapter-{fn.__name__}", daemon=True)
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        return outcome[0]

    return run
