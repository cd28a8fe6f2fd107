"""docs/contract.md sections 4 and 5: every failure ends the one task it hit.

Each case runs on a process pool for every start method, and afterwards the
same pool must still run a new task.
"""

from __future__ import annotations

import concurrent.futures
import pickle
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import parfn
from parfn import parallel

from . import funcs
from .conftest import START_METHODS

T = 30


def still_works(pool: parfn.Pool) -> None:
    assert pool.apply(funcs.square, 7) == 49
    assert pool.map(funcs.square, range(20)) == [x * x for x in range(20)]


# -- crashes ------------------------------------------------------------------------------

CRASHES = [
    pytest.param("sigkill", "SIGKILL", id="sigkill"),
    pytest.param("exit", "exit code 3", id="os._exit"),
    pytest.param("segfault", "SIGSEGV", id="segfault"),
]


@pytest.mark.parametrize(("how", "text"), CRASHES)
def test_a_crash_fails_only_its_task(process_pool: parfn.Pool, how: str, text: str) -> None:
    others = [process_pool.spawn(funcs.sleep_then, 0.3, i) for i in range(4)]
    crashed = process_pool.spawn(funcs.crash, how)
    with pytest.raises(parfn.WorkerCrashed, match=text) as info:
        crashed.result(timeout=T)
    assert "crash()" in str(info.value)
    assert isinstance(info.value, concurrent.futures.process.BrokenProcessPool)
    assert [t.result(timeout=T) for t in others] == [0, 1, 2, 3]
    still_works(process_pool)


def test_sigkill_message_mentions_memory(process_pool: parfn.Pool) -> None:
    with pytest.raises(parfn.WorkerCrashed, match="out-of-memory"):
        process_pool.apply(funcs.crash, "sigkill")


@pytest.mark.parametrize("chunksize", [1, 4, None])
def test_a_crash_in_map_fails_only_that_item(
    process_pool: parfn.Pool, chunksize: int | None
) -> None:
    out = process_pool.map(funcs.crash_on, range(12), return_exceptions=True, chunksize=chunksize)
    assert isinstance(out[3], parfn.WorkerCrashed)
    assert "crash_on()" in str(out[3])
    assert out[:3] + out[4:] == [i for i in range(12) if i != 3]
    still_works(process_pool)


def test_a_crash_in_map_without_return_exceptions_raises(process_pool: parfn.Pool) -> None:
    with pytest.raises(parfn.WorkerCrashed):
        process_pool.map(funcs.crash_on, range(8), chunksize=2)
    still_works(process_pool)


# -- timeouts ----------------------------------------------------------------------------


def test_timeout_in_apply(process_pool: parfn.Pool) -> None:
    start = time.monotonic()
    with pytest.raises(parfn.TaskTimeout, match="timeout of 0.5 s") as info:
        process_pool.apply(funcs.slow_cube, 2)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - start < 4, "the task was not stopped at its timeout"
    still_works(process_pool)


def test_timeout_in_spawn_with_options(process_pool: parfn.Pool) -> None:
    slow = parallel(funcs.sleep_then).options(timeout=0.3)
    task = process_pool.spawn(slow, 20, "never")
    fast = process_pool.spawn(slow, 0.01, "fast")
    with pytest.raises(parfn.TaskTimeout):
        task.result(timeout=T)
    assert fast.result(timeout=T) == "fast"
    still_works(process_pool)


@pytest.mark.parametrize("chunksize", [1, 5, None])
def test_timeout_is_per_item_in_map(process_pool: parfn.Pool, chunksize: int | None) -> None:
    f = parallel(funcs.slow_on, timeout=0.5)
    out = process_pool.map(f, range(10), return_exceptions=True, chunksize=chunksize)
    assert isinstance(out[3], parfn.TaskTimeout)
    assert out[:3] + out[4:] == [i for i in range(10) if i != 3]
    still_works(process_pool)


def test_timeout_counts_from_the_start_not_the_submission() -> None:
    # One worker: the second task waits 0.6 s in the queue, longer than its timeout.
    with parfn.Pool(1) as pool:
        f = parallel(funcs.sleep_then).options(timeout=1.0)
        first = pool.spawn(f, 0.6, "a")
        second = pool.spawn(f, 0.3, "b")
        assert first.result(timeout=T) == "a"
        assert second.result(timeout=T) == "b"


# -- retries ------------------------------------------------------------------------------


def test_retries_rerun_a_task_that_raised(process_pool: parfn.Pool, tmp_path: Any) -> None:
    path = str(tmp_path / "count")
    f = parallel(funcs.fail_first_times, retries=2)
    assert process_pool.apply(f, path, 2) == "ok after 3"


def test_retries_are_bounded(process_pool: parfn.Pool, tmp_path: Any) -> None:
    path = str(tmp_path / "count")
    f = parallel(funcs.fail_first_times, retries=1)
    with pytest.raises(RuntimeError, match="attempt 2 fails"):
        process_pool.apply(f, path, 5)


def test_retries_rerun_a_task_that_crashed(process_pool: parfn.Pool, tmp_path: Any) -> None:
    path = str(tmp_path / "count")
    f = parallel(funcs.crash_first_times, retries=1)
    assert process_pool.apply(f, path, 1) == "ok after 2"
    g = parallel(funcs.crash_first_times, retries=1)
    with pytest.raises(parfn.WorkerCrashed):
        process_pool.apply(g, str(tmp_path / "other"), 5)


def test_retries_rerun_a_task_that_timed_out(process_pool: parfn.Pool) -> None:
    f = parallel(funcs.sleep_then, timeout=0.3, retries=1)
    start = time.monotonic()
    with pytest.raises(parfn.TaskTimeout):
        process_pool.apply(f, 10)
    assert time.monotonic() - start >= 0.6  # two attempts of 0.3 s


def test_retries_per_item_in_map(process_pool: parfn.Pool, tmp_path: Any) -> None:
    f = parallel(funcs.fail_first_times, retries=1)
    paths = [str(tmp_path / f"c{i}") for i in range(6)]
    assert process_pool.map(f, paths, [1] * 6, chunksize=3) == ["ok after 2"] * 6


# -- cancellation ----------------------------------------------------------------------


def test_cancel_a_queued_task() -> None:
    with parfn.Pool(1) as pool:
        running = pool.spawn(funcs.sleep_then, 0.5, "ran")
        queued = pool.spawn(funcs.sleep_then, 0.5, "never")
        assert queued.cancel()
        assert queued.cancelled()
        assert running.result(timeout=T) == "ran"
        with pytest.raises(concurrent.futures.CancelledError):
            queued.result(timeout=T)
        still_works(pool)


def test_cancel_a_running_task_stops_it(process_pool: parfn.Pool) -> None:
    task = process_pool.spawn(funcs.sleep_then, 30)
    other = process_pool.spawn(funcs.sleep_then, 0.5, "other")
    deadline = time.monotonic() + T
    while not task.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # let it really start in its worker
    assert task.cancel() is True
    assert task.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        task.result(timeout=T)
    assert other.result(timeout=T) == "other"
    still_works(process_pool)


def test_cancel_a_finished_task_returns_false(pool: parfn.Pool) -> None:
    task = pool.spawn(funcs.square, 2)
    assert task.result(timeout=T) == 4
    assert task.cancel() is False


# -- what cannot be pickled, in each direction ------------------------------------------


class PickleRaises:
    def __reduce__(self) -> Any:
        raise RuntimeError("refuses to pickle")


def _unpickle_raises() -> Any:
    raise RuntimeError("refuses to unpickle")


class UnpickleRaises:
    def __reduce__(self) -> Any:
        return (_unpickle_raises, ())


def _exit_on_unpickle() -> Any:
    import os

    os._exit(9)


class UnpickleExits:
    def __reduce__(self) -> Any:
        return (_exit_on_unpickle, ())


def return_value(kind: str) -> Any:
    return {"pickle": PickleRaises, "unpickle": UnpickleRaises, "lock": threading.Lock}[kind]()


def raise_error(kind: str) -> None:
    if kind == "pickle":
        err = RuntimeError("carries a lock")
        err.lock = threading.Lock()  # type: ignore[attr-defined]
        raise err

    # A class made here, in the worker: a registry of exception reducers that
    # the test process may hold (distributed installs tblib's) cannot know it.
    class BadInitError(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(f"{a}/{b}")

    raise BadInitError(1, 2)


def identity_arg(x: Any) -> str:
    return "ran"


FAILURES: list[Any] = [
    # (what the task does, what the caller gets, a text the message must contain)
    pytest.param(
        lambda p: p.apply(identity_arg, PickleRaises()),
        parfn.SerializationError,
        "argument 1",
        id="argument-cannot-pickle",
    ),
    pytest.param(
        lambda p: p.apply(identity_arg, threading.Lock()),
        parfn.SerializationError,
        "lock",
        id="argument-lock",
    ),
    pytest.param(
        lambda p: p.apply(identity_arg, UnpickleRaises()),
        parfn.SerializationError,
        "unpickle",
        id="argument-cannot-unpickle",
    ),
    pytest.param(
        lambda p: p.apply(identity_arg, UnpickleExits()),
        parfn.WorkerCrashed,
        "loading the arguments",
        id="argument-unpickle-exits",
    ),
    pytest.param(
        lambda p: p.apply(return_value, "pickle"),
        parfn.SerializationError,
        "the result",
        id="result-cannot-pickle",
    ),
    pytest.param(
        lambda p: p.apply(return_value, "lock"),
        parfn.SerializationError,
        "the result",
        id="result-lock",
    ),
    pytest.param(
        lambda p: p.apply(return_value, "unpickle"),
        parfn.SerializationError,
        "unpickle",
        id="result-cannot-unpickle",
    ),
    pytest.param(
        lambda p: p.apply(raise_error, "pickle"),
        parfn.RemoteError,
        "carries a lock",
        id="exception-cannot-pickle",
    ),
    pytest.param(
        lambda p: p.apply(raise_error, "unpickle"),
        parfn.RemoteError,
        "BadInitError",
        id="exception-cannot-unpickle",
    ),
]


@pytest.mark.parametrize(("call", "error", "text"), FAILURES)
def test_failure_table(
    process_pool: parfn.Pool, call: Callable[[parfn.Pool], Any], error: type, text: str
) -> None:
    with pytest.raises(error, match=text):
        call(process_pool)
    still_works(process_pool)


def test_serialization_error_is_a_pickling_error() -> None:
    assert issubclass(parfn.SerializationError, pickle.PicklingError)


def test_remote_error_keeps_type_message_and_traceback(process_pool: parfn.Pool) -> None:
    with pytest.raises(parfn.RemoteError) as info:
        process_pool.apply(raise_error, "unpickle")
    assert "BadInitError" in info.value.type_name
    assert info.value.message == "1/2"
    assert "raise BadInitError" in info.value.traceback


@pytest.mark.parametrize("chunksize", [1, 4])
def test_unpicklable_items_in_map_fail_alone(process_pool: parfn.Pool, chunksize: int) -> None:
    items: list[Any] = [1, 2, threading.Lock(), 4, UnpickleRaises(), 6]
    out = process_pool.map(identity_arg, items, return_exceptions=True, chunksize=chunksize)
    assert out[0] == out[1] == out[3] == out[5] == "ran"
    assert isinstance(out[2], parfn.SerializationError)
    assert isinstance(out[4], parfn.SerializationError)


def test_unpicklable_results_in_map_fail_alone(process_pool: parfn.Pool) -> None:
    kinds = ["ok", "lock", "ok", "unpickle", "ok"]
    out = process_pool.map(_result_or, kinds, return_exceptions=True, chunksize=5)
    assert out[0] == out[2] == out[4] == "ok"
    assert isinstance(out[1], parfn.SerializationError)
    assert isinstance(out[3], parfn.SerializationError)


def _result_or(kind: str) -> Any:
    return kind if kind == "ok" else return_value(kind)


def test_initializer_that_raises_fails_tasks_clearly() -> None:
    with parfn.Pool(1, initializer=funcs.failing_initializer) as pool:
        with pytest.raises(RuntimeError, match="initializer failed"):
            pool.apply(funcs.square, 2)


def _accepts(_: object) -> None:
    """An initializer that takes anything."""


@pytest.mark.parametrize("start_method", [pytest.param(None, id="default"), *START_METHODS])
def test_initargs_that_cannot_be_pickled_fail_when_the_pool_is_made(
    start_method: str | None,
) -> None:
    initargs = (threading.Lock(),)
    if start_method == "fork" or (start_method is None and sys.platform.startswith("linux")):
        # Workers forked (by the pool's zygote) inherit initargs: nothing is pickled.
        with parfn.Pool(1, start_method=start_method, initializer=_accepts, initargs=initargs) as p:
            still_works(p)
        return
    with pytest.raises(TypeError, match=r"initargs must be picklable.*_thread\.lock"):
        parfn.Pool(1, start_method=start_method, initializer=_accepts, initargs=initargs)


# -- many threads at once -----------------------------------------------------------------


@pytest.mark.slow
def test_soak_10000_tasks_from_8_threads() -> None:
    errors: list[BaseException] = []

    def submit(k: int) -> None:
        try:
            tasks = [funcs.cube.spawn(i) for i in range(k * 1250, (k + 1) * 1250)]
            got = [t.result(timeout=T) for t in tasks]
            assert got == [i**3 for i in range(k * 1250, (k + 1) * 1250)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert funcs.cube.apply(3) == 27


def test_blocking_calls_from_many_threads_with_crashes_among_them(
    process_pool: parfn.Pool,
) -> None:
    """apply() may talk to an idle worker from the calling thread; many callers
    and dying workers at once must still give every caller its own outcome."""
    errors: list[BaseException] = []

    def caller(k: int) -> None:
        try:
            for i in range(60):
                if i % 20 == k % 20 and k < 2:
                    with pytest.raises(parfn.WorkerCrashed):
                        process_pool.apply(funcs.crash, "exit")
                else:
                    assert process_pool.apply(funcs.add, i, k) == i + k
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not errors, errors
    still_works(process_pool)
