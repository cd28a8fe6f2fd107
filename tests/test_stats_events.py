"""``pool.stats()``, the pool's events on the "parfn" logger, and crash reports."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Iterator

import pytest

import parfn

from . import funcs
from . import funcs_observe as fo

T = 30  # seconds: every wait in these tests is bounded


def check_sum(stats: parfn.PoolStats) -> None:
    parts = (stats.done, stats.failed, stats.cancelled, stats.running, stats.queued)
    assert min(parts) >= 0, stats
    assert sum(parts) == stats.submitted, stats


# -- pool.stats() ---------------------------------------------------------------------------


def test_stats_count_every_item_on_every_backend(pool: parfn.Pool) -> None:
    assert pool.map(funcs.square, range(50)) == [x * x for x in range(50)]
    out = pool.map(funcs.fail_on, range(10), return_exceptions=True)
    assert isinstance(out[3], ValueError)
    assert pool.apply(funcs.square, 3) == 9
    assert pool.spawn(funcs.square, 4).result(timeout=T) == 16
    stats = pool.stats()
    assert isinstance(stats, parfn.PoolStats)
    assert (stats.submitted, stats.done, stats.failed, stats.cancelled) == (62, 61, 1, 0)
    assert (stats.running, stats.queued) == (0, 0)
    check_sum(stats)
    square = stats.by_function["square"]
    assert isinstance(square, parfn.FunctionStats)
    assert (square.calls, square.failures) == (52, 0)
    assert 0 <= square.max_seconds <= square.total_seconds
    assert stats.by_function["fail_on"][:2] == (10, 1)
    assert stats.workers >= 1


def test_the_sum_holds_at_every_moment(pool: parfn.Pool) -> None:
    seen: list[parfn.PoolStats] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(pool.stats())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        pool.map(funcs.sleep_then, [0.002] * 200, chunksize=1)
        pool.map(funcs.square, range(3000))
        tasks = [pool.spawn(funcs.sleep_then, 0.001, i) for i in range(100)]
        assert [t.result(timeout=T) for t in tasks] == list(range(100))
    finally:
        stop.set()
        watcher.join(T)
    assert len(seen) > 10
    for stats in seen:
        check_sum(stats)
    assert any(s.running > 0 for s in seen)
    assert all(s.running <= pool.workers for s in seen)
    final = pool.stats()
    assert (final.submitted, final.done, final.queued, final.running) == (3300, 3300, 0, 0)


def test_running_and_queued_while_tasks_wait(process_pool: parfn.Pool) -> None:
    tasks = [process_pool.spawn(funcs.sleep_then, 1.0, i) for i in range(5)]
    deadline = time.monotonic() + T
    while process_pool.stats().running < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = process_pool.stats()
    assert (stats.submitted, stats.running, stats.queued) == (5, 2, 3), stats
    assert tasks[4].cancel()
    stats = process_pool.stats()
    assert (stats.cancelled, stats.queued) == (1, 2), stats
    assert [t.result(timeout=T) for t in tasks[:4]] == [0, 1, 2, 3]
    stats = process_pool.stats()
    assert (stats.done, stats.cancelled, stats.running, stats.queued) == (4, 1, 0, 0)


def test_retries_timeouts_crashes_and_restarts(process_pool: parfn.Pool, tmp_path: object) -> None:
    with pytest.raises(parfn.WorkerCrashed):
        process_pool.apply(funcs.crash, "exit")
    with pytest.raises(parfn.TaskTimeout):
        process_pool.apply(parfn.parallel(funcs.sleep_then, timeout=0.2), 5)
    path = f"{tmp_path}/count"
    assert process_pool.apply(parfn.parallel(funcs.fail_first_times, retries=2), path, 2)
    assert process_pool.apply(
        parfn.parallel(funcs.crash_first_times, retries=1), f"{path}2", 1
    ).startswith("ok")
    stats = process_pool.stats()
    assert (stats.crashed, stats.timed_out, stats.retried) == (2, 1, 3), stats
    assert stats.restarts == 3
    assert (stats.submitted, stats.done, stats.failed) == (4, 2, 2)
    assert stats.by_function["crash"].failures == 1
    assert stats.workers == 2


def test_a_thread_timeout_and_retries_are_counted() -> None:
    with parfn.Pool(2, backend="thread") as pool:
        with pytest.raises(parfn.TaskTimeout):
            pool.apply(parfn.parallel(funcs.sleep_then, timeout=0.1), 0.5)
        with pytest.raises(ValueError):
            pool.apply(parfn.parallel(funcs.fail_on, retries=2), 3)
        stats = pool.stats()
    assert (stats.timed_out, stats.retried, stats.failed) == (1, 2, 2)


def test_an_abandoned_imap_counts_what_never_ran_as_cancelled(process_pool: parfn.Pool) -> None:
    it = process_pool.imap(funcs.sleep_then, [0.05] * 200, chunksize=1)
    assert next(it) is None
    it.close()
    deadline = time.monotonic() + T
    while time.monotonic() < deadline:
        stats = process_pool.stats()
        if not stats.running + stats.queued:
            break
        time.sleep(0.02)
    stats = process_pool.stats()
    check_sum(stats)
    assert stats.running == stats.queued == 0
    assert stats.cancelled > 0 and stats.done + stats.cancelled == stats.submitted


def test_a_counted_task_is_freed_without_the_garbage_collector(pool: parfn.Pool) -> None:
    """Counting leaves no reference cycle between a task and its sink."""
    import gc
    import weakref

    gc.disable()
    try:
        done = pool.spawn(funcs.square, 3)
        assert done.result(timeout=T) == 9
        cancelled = pool.spawn(funcs.sleep_then, 0.5) if pool.backend_name != "serial" else None
        refs = [weakref.ref(done)]
        if cancelled is not None:
            cancelled.cancel()
            refs.append(weakref.ref(cancelled))
        del done, cancelled
        deadline = time.monotonic() + T
        while any(r() is not None for r in refs) and time.monotonic() < deadline:
            time.sleep(0.01)  # a backend thread may still be letting go of the job
        assert all(r() is None for r in refs), [gc.get_referrers(r()) for r in refs if r()]
    finally:
        gc.enable()


def test_a_call_that_cannot_be_sent_is_not_counted(process_pool: parfn.Pool) -> None:
    with pytest.raises(parfn.SerializationError):
        process_pool.apply(funcs.identity, threading.Lock())
    assert process_pool.stats().submitted == 0


# -- pool events ------------------------------------------------------------------------------


@pytest.fixture
def events(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="parfn")
    yield caplog


def parfn_events(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "parfn"]


def wait_for_events(caplog: pytest.LogCaptureFixture, n: int) -> list[logging.LogRecord]:
    deadline = time.monotonic() + T
    while len(parfn_events(caplog)) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return parfn_events(caplog)


@pytest.mark.parametrize(
    ("how", "exitcode"),
    [("exit", 3), ("segfault", -signal.SIGSEGV), ("sigkill", -signal.SIGKILL)],
)
def test_a_crash_is_a_warning(
    process_pool: parfn.Pool, events: pytest.LogCaptureFixture, how: str, exitcode: int
) -> None:
    with pytest.raises(parfn.WorkerCrashed) as info:
        process_pool.apply(funcs.crash, how)
    (record,) = wait_for_events(events, 1)
    assert record.levelno == logging.WARNING
    assert (record.parfn_reason, record.parfn_exitcode) == ("crash", exitcode)  # type: ignore[attr-defined]
    assert record.parfn_pid == info.value.pid  # type: ignore[attr-defined]
    assert record.parfn_function == "crash"  # type: ignore[attr-defined]
    assert f"worker process {info.value.pid} running crash() died" in record.getMessage()
    assert record.getMessage().endswith("; a new worker replaces it")


def test_a_timeout_is_a_warning(process_pool: parfn.Pool, events: pytest.LogCaptureFixture) -> None:
    with pytest.raises(parfn.TaskTimeout):
        process_pool.apply(parfn.parallel(funcs.sleep_then, timeout=0.2), 5)
    (record,) = wait_for_events(events, 1)
    assert record.levelno == logging.WARNING
    assert record.parfn_reason == "timeout"  # type: ignore[attr-defined]
    assert "ran past its timeout" in record.getMessage()


def test_recycling_and_cancelling_are_info(events: pytest.LogCaptureFixture) -> None:
    with parfn.Pool(1, max_tasks_per_worker=2) as pool:
        # Items slow enough to go one at a time: two per worker.
        assert pool.map(funcs.sleep_then, [0.02] * 4, range(4), chunksize=1) == [0, 1, 2, 3]
        recycled = wait_for_events(events, 2)
        task = pool.spawn(funcs.sleep_then, 30)
        deadline = time.monotonic() + T
        while pool.stats().running < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert task.cancel()
        cancelled = wait_for_events(events, 3)[2]
    assert [r.parfn_reason for r in recycled] == ["recycle", "recycle"]  # type: ignore[attr-defined]
    assert all(r.levelno == logging.INFO for r in recycled)
    assert "was retired: it ran its max_tasks_per_worker tasks" in recycled[0].getMessage()
    assert cancelled.parfn_reason == "cancel"  # type: ignore[attr-defined]
    assert cancelled.levelno == logging.INFO


LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")


@LINUX
def test_going_over_the_memory_limit_during_a_task_is_a_warning(
    events: pytest.LogCaptureFixture,
) -> None:
    with parfn.Pool(1, max_memory_per_worker="150MiB") as pool:
        with pytest.raises(parfn.MemoryLimitExceeded):
            pool.apply(fo.hold, 400, 3.0)
        (record,) = wait_for_events(events, 1)
    assert (record.levelno, record.parfn_reason) == (logging.WARNING, "memory")  # type: ignore[attr-defined]
    assert "it went over its memory limit during a task" in record.getMessage()
    assert "above max_memory_per_worker=150 MiB" in record.getMessage()


@LINUX
def test_a_worker_over_the_limit_after_a_task_is_recycled(
    events: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from parfn.backends.process import _memory

    monkeypatch.setattr(_memory, "PERIOD", 3600.0)  # no look during the task:
    monkeypatch.setattr(_memory, "MIN_PERIOD", 3600.0)  # only the one after it
    with parfn.Pool(1, max_memory_per_worker="150MiB") as pool:
        assert pool.apply(fo.keep, 200) == 1  # the result is kept
        (record,) = wait_for_events(events, 1)
    assert (record.levelno, record.parfn_reason) == (logging.INFO, "recycle")  # type: ignore[attr-defined]
    assert "was retired: it used" in record.getMessage()
    assert "above max_memory_per_worker=150 MiB" in record.getMessage()


def test_a_thread_timeout_is_an_event(events: pytest.LogCaptureFixture) -> None:
    with parfn.Pool(1, backend="thread") as pool:
        with pytest.raises(parfn.TaskTimeout):
            pool.apply(parfn.parallel(funcs.sleep_then, timeout=0.1), 0.5)
    (record,) = parfn_events(events)
    assert record.levelno == logging.WARNING
    assert record.parfn_event == "task_timed_out"  # type: ignore[attr-defined]


def test_nothing_is_printed_by_default(tmp_path: object) -> None:
    from .conftest import run_python

    code = "import parfn\nfrom tests import funcs\n" + (
        "try:\n"
        "    parfn.parallel(funcs.crash).apply('exit')\n"
        "except parfn.WorkerCrashed:\n"
        "    print('caught')\n"
    )
    assert run_python(code).strip() == "caught"


# -- crash reports -------------------------------------------------------------------------------


def test_a_segfault_report_has_its_tracebacks(process_pool: parfn.Pool) -> None:
    with pytest.raises(parfn.WorkerCrashed) as info:
        process_pool.apply(fo.log_then_segfault)
    e = info.value
    assert e.signal == signal.SIGSEGV and e.exitcode == -signal.SIGSEGV
    assert e.function == "log_then_segfault" and e.index is None
    assert isinstance(e.pid, int) and e.pid > 0
    lines = e.stderr.splitlines()
    assert lines[0] == "stderr before a segfault"
    assert lines[1] == "Fatal Python error: Segmentation fault"
    assert any("in log_then_segfault" in line for line in lines)
    text = str(e)
    assert text.startswith(f"the worker process {e.pid} running log_then_segfault() died: ")
    assert "killed by SIGSEGV" in text
    assert "  | Fatal Python error: Segmentation fault" in text


@pytest.mark.parametrize("chunksize", [1, 4, None])
def test_a_crash_report_names_the_item_of_the_map(
    process_pool: parfn.Pool, chunksize: int | None
) -> None:
    out = process_pool.map(fo.segfault_on, range(12), return_exceptions=True, chunksize=chunksize)
    assert [x for i, x in enumerate(out) if i != 5] == [i for i in range(12) if i != 5]
    error = out[5]
    assert isinstance(error, parfn.WorkerCrashed)
    assert error.index == 5 and error.function == "segfault_on"
    assert "running segfault_on() on item 5 of its map died" in str(error)


def test_an_exit_code_report(process_pool: parfn.Pool) -> None:
    with pytest.raises(parfn.WorkerCrashed) as info:
        process_pool.apply(fo.log_then_exit, 9)
    e = info.value
    assert (e.exitcode, e.signal) == (9, None)
    assert e.stderr == "stderr before exit"
    assert "died: exit code 9." in str(e)


def test_a_crash_report_pickles_and_keeps_the_old_constructor() -> None:
    e = parfn.WorkerCrashed(exitcode=-11, function="f", pid=12, cause="killed", stderr="x\ny")
    e.index = 3
    back = pickle.loads(pickle.dumps(e))
    assert (back.function, back.index, back.pid, back.signal, back.stderr) == (
        "f",
        3,
        12,
        11,
        "x\ny",
    )
    assert str(back) == str(e)
    assert str(e).startswith("the worker process 12 running f() on item 3 of its map died: killed.")
    old = parfn.WorkerCrashed("it died", 3)
    assert (str(old), old.exitcode, old.pid, old.stderr) == ("it died", 3, None, "")
    assert repr(old) == "WorkerCrashed('it died')"


def test_no_fault_file_outlives_its_worker(tmp_path: object) -> None:
    from parfn._wire import shm

    if not shm.available():
        pytest.skip("needs a writable /dev/shm")
    with parfn.Pool(2) as pool:
        pids = set(pool.map(funcs.pid, range(20), chunksize=1))
        with pytest.raises(parfn.WorkerCrashed) as info:
            pool.apply(fo.log_then_segfault)
        pids.add(info.value.pid)  # type: ignore[arg-type]
        pids |= set(pool.map(funcs.pid, range(20), chunksize=1))
        assert any(os.path.exists(shm.fault_path(p) or "") for p in pids)  # live workers' files
    assert not [p for p in pids if os.path.exists(shm.fault_path(p) or "")]


def test_a_stale_fault_file_is_swept() -> None:
    from parfn._wire import shm

    if not shm.available():
        pytest.skip("needs a writable /dev/shm")
    dead = 2**22 + 12345  # above the default pid_max: no such process
    path = shm.fault_path(dead)
    assert path is not None
    with open(path, "w") as f:
        f.write("Fatal Python error")
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    try:
        shm.sweep_stale(min_age=60)
        assert not os.path.exists(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)
