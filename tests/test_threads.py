"""``in_passing_thread``: loading and per-request K/V run in a thread that ends, so the scheduler's OpenMP pool is the only live one."""

from __future__ import annotations

import contextvars
import threading

import pytest

from llama_adapter.threads import in_passing_thread

REQUEST = contextvars.ContextVar("request", default="none")


def test_it_returns_the_result_from_a_thread_that_has_ended() -> None:
    seen: list[threading.Thread] = []

    @in_passing_thread
    def work(x: int, *, y: int) -> int:
        seen.append(threading.current_thread())
        return x + y

    assert work(2, y=3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_errors_reach_the_caller_unchanged_and_context_vars_travel() -> None:
    @in_passing_thread
    def fail() -> None:
        raise KeyError(f"no such file for {REQUEST.get()}")

    REQUEST.set("request 7")
    with pytest.raises(KeyError, match="no such file for request 7"):
        fail()


def test_nested_calls_run_inline() -> None:
    threads: list[threading.Thread] = []

    @in_passing_thread
    def inner() -> None:
        threads.append(threading.current_thread())

    @in_passing_thread
    def outer() -> None:
        threads.append(threading.current_thread())
        inner()

    outer()
    assert threads[0] is threads[1]


def test_a_stream_computes_its_adapter_kv_outside_the_callers_thread(pipe) -> None:
    model = pipe.model
    callers: list[threading.Thread] = []
    original = model.adapter_kv

    def spy(*args, **kwargs):
        callers.append(threading.current_thread())
        return original(*args, **kwargs)

    model.adapter_kv = spy
    try:
        list(pipe.stream("Hello", max_new_tokens=2, temperature=0))
    finally:
        del model.adapter_kv
    assert callers and threading.current_thread() not in callers
