"""Deaths: a worker that died or failed to start, and the runs it had.

When a worker's process ends (a crash, or a kill for a timeout, a cancel or
a shutdown), its status slot says which run and which item it was running:
that one item fails (or is retried), the items it had finished run again,
and the runs it had not started are requeued. A worker whose initializer
raised fails every run it had with that error; a failure of the manager
thread itself fails every run of the pool. Failures are collected under
the lock and handed to the sinks later, with no lock held (``fail_pending``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import CancelledError

from ..._wire import errors
from ..._wire.errors import TaskTimeout
from ..._wire.protocol import ANY_ITEM
from .._base import Job
from ._memory import memory_error
from ._oom import oom_killed
from ._start import retire
from ._state import PoolState, Work, Worker, describe_exit, fn_name

__all__ = (
    "account_for_exit",
    "blame",
    "crash_text",
    "fail_everything",
    "fail_pending",
    "on_init_failed",
    "take_runs",
)


def take_runs(pool: PoolState, worker: Worker) -> list[Work]:
    """Remove and return a worker's in-flight runs. Caller holds ``_lock``."""
    works = list(worker.runs.values())
    worker.runs.clear()
    pool._timed -= sum(1 for w in works if w.state.job.options.timeout is not None)
    return works


def on_init_failed(pool: PoolState, worker: Worker, error: BaseException) -> None:
    """The initializer raised: the worker's runs fail with that error."""
    with pool._lock:
        works = take_runs(pool, worker)
        worker.kill_reason = ("init", 0, -1)
    for work in works:
        if not work.state.cancelled:
            n = work.hi - work.lo
            work.state.job.sink.deliver(
                work.lo, [None] * n, {i: error for i in range(work.lo, work.hi)}, 0.0
            )


def account_for_exit(pool: PoolState, worker: Worker) -> None:
    """A worker's process ended, and the results it sent were read: account
    for every run it had (manager thread; takes ``_lock``)."""
    process = worker.process
    process.join()
    pool._dead_pids.append(process.pid)  # its leftovers go in _deliver_all
    exitcode = process.exitcode
    run_id, index, _ = worker.read_status()
    reason = worker.kill_reason
    oom = oom_killed(exitcode) if reason is None else False
    with pool._lock:
        pool._workers.remove(worker)
        retire(pool, worker)
        with contextlib.suppress(KeyError, ValueError):
            pool._selector.unregister(process.sentinel)
        works = [w for w in take_runs(pool, worker) if not w.state.cancelled]
        failures = pool._pending_failures
        requeue: list[Work] = []
        blamed = False
        for work in works:
            state = work.state
            if reason is not None and reason[0] == "shutdown":
                failures.append((state.job, work.lo, work.hi, CancelledError))
            elif work.run_id != run_id or blamed:
                requeue.append(work)  # it had not started
            elif index == ANY_ITEM:
                # It died in a chunk run as one C-level loop: run the
                # items again one by one, so that only the culprit fails.
                blamed = True
                requeue.extend(Work(state, i, i + 1, work.retries) for i in range(work.lo, work.hi))
            else:
                blamed = True
                if index < work.lo:  # it died loading the run's arguments
                    lo, hi = work.lo, work.hi
                else:
                    # Items before `index` had finished, but their results
                    # died with the worker: they run again.
                    lo, hi = index, index + 1
                    requeue.append(Work(state, work.lo, index, work.retries))
                    requeue.append(Work(state, index + 1, work.hi, work.retries))
                error = blame(work, exitcode, reason, run_id, index, oom, pool, worker)
                if error is None:  # killed by us, but not for this item
                    requeue.append(Work(state, lo, hi, work.retries))
                elif work.retries > 0:
                    requeue.append(Work(state, lo, hi, work.retries - 1))
                else:
                    failures.append((state.job, lo, hi, error))
        if not blamed and requeue and reason is None:
            # It died between items, maybe loading a message of the first
            # run it had: after three such deaths, that run fails.
            first = requeue[0]
            first.crashes += 1
            if first.crashes >= 3:
                requeue.pop(0)
                text = crash_text(first.state.job, exitcode, oom)
                failures.append(
                    (
                        first.state.job,
                        first.lo,
                        first.hi,
                        lambda: errors.WorkerCrashed(text, exitcode),
                    )
                )
        for work in reversed(requeue):
            if work.hi > work.lo:
                pool._queue.appendleft(work)
    process.close()


def blame(
    work: Work,
    exitcode: int | None,
    reason: tuple[str, int, int] | None,
    run_id: int,
    index: int,
    oom: bool | None = None,
    pool: PoolState | None = None,
    worker: Worker | None = None,
) -> Callable[[], BaseException] | None:
    """The error for the item a dead worker was running; None: not its fault.

    ``oom``: whether the kernel's OOM killer killed it (``_oom``); ``pool``
    and ``worker`` tell the memory it was killed for using (``_memory``).
    """
    job = work.state.job
    if reason is not None:
        why, killed_run, killed_index = reason
        if (killed_run, killed_index) != (run_id, index):
            return None
        if why == "cancel":
            return CancelledError
        if why == "timeout":
            text = (
                f"{fn_name(job)}() ran past its timeout of {job.options.timeout:g} s; "
                "its worker was ended and replaced"
            )
            return lambda: TaskTimeout(text)
        if why == "memory" and pool is not None and worker is not None:
            limit, seen = pool._memory_limit, worker.memory.over
            return lambda: memory_error(job, limit, seen, exitcode)
    text = crash_text(job, exitcode, oom)
    if index < work.lo:
        text += " while loading the arguments"
    return _crashed(text, exitcode)


def _crashed(text: str, exitcode: int | None) -> Callable[[], BaseException]:
    return lambda: errors.WorkerCrashed(text, exitcode)


def crash_text(job: Job, exitcode: int | None, oom: bool | None = None) -> str:
    return (
        f"the worker process running {fn_name(job)}() died: "
        f"{describe_exit(exitcode, oom)}. The worker was replaced; other tasks are unaffected"
    )


def fail_pending(pool: PoolState) -> None:
    """Hand the failures collected under the lock to their sinks (no lock held)."""
    with pool._lock:
        failures, pool._pending_failures = pool._pending_failures, []
    for job, lo, hi, error in failures:
        job.sink.deliver(lo, [None] * (hi - lo), {i: error() for i in range(lo, hi)}, 0.0)


def fail_everything(pool: PoolState, exc: BaseException) -> None:
    """The manager thread failed (a bug in parfn): close the pool, kill its
    workers, and fail every run rather than hang. Takes ``_lock``."""
    with pool._lock:
        pool._closed = pool._stopping = True
        works = list(pool._queue)
        pool._queue.clear()
        for worker in pool._workers:
            works.extend(worker.runs.values())
            worker.runs.clear()
            worker.process.kill()
        for work in works:
            pool._pending_failures.append(
                (
                    work.state.job,
                    work.lo,
                    work.hi,
                    lambda: RuntimeError(f"parfn's manager thread failed: {exc!r}"),
                )
            )
