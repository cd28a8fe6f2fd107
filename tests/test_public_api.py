"""The public surface: names, the error tree, and no side effects at import."""

from __future__ import annotations

import concurrent.futures.process
import pickle
import subprocess
import sys
import textwrap
import types

import parfn


def test_all_lists_exactly_the_public_names() -> None:
    for name in parfn.__all__:
        getattr(parfn, name)  # a lazily loaded name lands in the module's namespace
    assert set(dir(parfn)) >= set(parfn.__all__)
    public = {
        name
        for name, value in vars(parfn).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(parfn.__all__) == public
    assert isinstance(parfn.__all__, tuple)


def test_error_tree() -> None:
    for name in ("RemoteError", "SerializationError", "WorkerCrashed", "TaskTimeout", "PoolClosed"):
        assert issubclass(getattr(parfn, name), parfn.ParfnError), name
    assert issubclass(parfn.WorkerCrashed, concurrent.futures.process.BrokenProcessPool)
    assert issubclass(parfn.MemoryLimitExceeded, parfn.WorkerCrashed)
    assert issubclass(parfn.SerializationError, pickle.PicklingError)
    assert issubclass(parfn.TaskTimeout, TimeoutError)


def test_resource_names_are_public() -> None:
    """Section 9 of the contract: WorkerLocal and MemoryLimitExceeded, from the top level."""
    assert {"WorkerLocal", "MemoryLimitExceeded"} <= set(parfn.__all__)
    error = parfn.MemoryLimitExceeded("f() went over", limit=100, seen=250, exitcode=-9)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.limit, copy.seen, copy.exitcode) == (
        parfn.MemoryLimitExceeded,
        "f() went over",
        100,
        250,
        -9,
    )
    # Made on first use, as WorkerCrashed is: read first, it is still a subclass
    # of the one WorkerCrashed.
    code = (
        "import parfn\n"
        "M = parfn.MemoryLimitExceeded\n"
        "assert issubclass(M, parfn.WorkerCrashed) and M.__mro__[2] is parfn.WorkerCrashed\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.stdout.strip() == "ok", out.stderr


def test_every_public_name_has_a_docstring() -> None:
    for name in parfn.__all__:
        assert getattr(parfn, name).__doc__, name


def test_import_has_no_side_effects() -> None:
    code = textwrap.dedent(
        """
        import atexit, sys, threading
        before = threading.active_count()
        import parfn
        assert threading.active_count() == before, "import started a thread"
        heavy = [m for m in ("cloudpickle", "multiprocessing.pool", "tqdm", "distributed",
                             "typing", "inspect", "concurrent.futures",
                             "parfn.backends.process._backend", "parfn.backends.process._worker")
                 if m in sys.modules]
        assert not heavy, heavy
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.stdout.strip() == "ok", out.stderr


def test_task_has_exactly_the_fields_of_a_future() -> None:
    """Task builds its Future fields itself (with a lighter lock): a new
    Python whose Future gains a field must fail here, not in a user's wait()."""
    import threading
    from concurrent.futures import Future, as_completed, wait

    assert vars(parfn.Task()).keys() == vars(Future()).keys()
    tasks = [parfn.Task() for _ in range(3)]
    threading.Timer(0.05, tasks[1].set_result, (7,)).start()
    done, _ = wait(tasks, timeout=10, return_when="FIRST_COMPLETED")
    assert done == {tasks[1]}
    tasks[0].set_exception(ValueError("x"))
    assert tasks[2].cancel() and not tasks[2].set_running_or_notify_cancel()
    assert {t for t in as_completed(tasks, timeout=10)} == set(tasks)
    assert tasks[1].result(timeout=10) == 7


def test_wait_for_the_first_exception_with_a_task_already_done() -> None:
    """concurrent.futures.wait(FIRST_EXCEPTION) holds each future's lock while it
    reads their cancelled() and exception(), which take it again: a Task's lock
    must be reentrant, as a Future's is (a plain Lock hung here for ever)."""
    import threading
    from concurrent.futures import FIRST_EXCEPTION, wait

    tasks = [parfn.Task() for _ in range(3)]
    tasks[0].set_result(1)
    tasks[1].set_exception(ValueError("x"))
    answer: list[object] = []
    waiter = threading.Thread(
        target=lambda: answer.append(wait(tasks, timeout=5, return_when=FIRST_EXCEPTION)),
        daemon=True,
    )
    waiter.start()
    waiter.join(10)
    assert answer, "wait() hung"
    done, not_done = answer[0]  # type: ignore[misc]
    assert done == {tasks[0], tasks[1]} and not_done == {tasks[2]}
    threading.Timer(0.05, tasks[2].set_result, (3,)).start()
    assert wait(tasks[2:], timeout=10).done == {tasks[2]}  # a wait() that blocks still wakes
