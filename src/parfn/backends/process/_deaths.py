"""Deaths: a worker that died or failed to start, and the runs it had.

When a worker's process ends (a crash, or a kill for a timeout, a cancel or
a shutdown), its status slot says which run and which item it was running:
that one item fails (or is retried), the items it had finished run again,
and the runs it had not started are requeued. A worker whose initializer
raised fails every run it had with that error; a failure of the manager
thread itself fails every run of the pool. Failures are collected under
the lock and handed to the sinks later, with no lock held (``fail_pending``).

A crash report (``WorkerCrashed``) names the function, the worker's pid,
its exit code or signal, and the last lines it wrote to stderr, with the
tracebacks faulthandler wrote if it crashed in native code. Every worker that
ends for a reason other than the pool closing is logged on the "parfn"
logger (``parfn.backends._events``), and counted for ``pool.stats()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from ..._wire import errors
from ..._wire.errors import TaskTimeout
from ..._wire.protocol import ANY_ITEM
from ..._wire.shm import fault_path
from .._base import Job
from .._events import worker_replaced
from ._oom import oom_killed
from ._start import retire
from ._state import PoolState, Work, Worker, describe_exit, fn_name

__all__ = (
    "account_for_exit",
    "blame",
    "crashed",
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
    pid = process.pid
    pool._dead_pids.append(pid)  # its leftovers go in _deliver_all
    exitcode = process.exitcode
    run_id, index, _ = worker.read_status()
    reason = worker.kill_reason
    oom = oom_killed(exitcode) if reason is None else False
    worker.output.end_task()
    if reason is None and exitcode:
        worker.output.add_fault(_read_fault(pid))
    function: str | None = None
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
                failures.append((state.job, work.lo, work.hi, errors.cancelled))
            elif work.run_id != run_id or blamed:
                requeue.append(work)  # it had not started
            elif index == ANY_ITEM:
                # It died in a chunk run as one C-level loop: run the
                # items again one by one, so that only the culprit fails.
                blamed = True
                function = fn_name(state.job)
                requeue.extend(Work(state, i, i + 1, work.retries) for i in range(work.lo, work.hi))
            else:
                blamed = True
                function = fn_name(state.job)
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
                    continue
                if reason is None or reason[0] == "memory":
                    pool._crashed += 1
                elif reason[0] == "timeout":
                    pool._timed_out += 1
                if work.retries > 0:
                    pool._retried += 1
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
                pool._crashed += 1
                failures.append(
                    (
                        first.state.job,
                        first.lo,
                        first.hi,
                        crashed(
                            first.state.job, worker, exitcode, " while reading its messages", oom
                        ),
                    )
                )
        for work in reversed(requeue):
            if work.hi > work.lo:
                pool._queue.appendleft(work)
        replaced = not pool._stopping
        if replaced and (reason is None or reason[0] != "shutdown"):
            pool._restarts += 1
    process.close()
    _log_exit(pool, worker, pid, exitcode, reason, function, replaced, oom)


def _log_exit(
    pool: PoolState,
    worker: Worker,
    pid: int | None,
    exitcode: int | None,
    reason: tuple[str, int, int] | None,
    function: str | None,
    replaced: bool,
    oom: bool | None,
) -> None:
    """The "parfn" logger's record of a worker that ended (no lock held)."""
    over = worker.memory.over if worker.memory is not None else 0
    if reason is not None:
        why, detail = reason[0], ""
        if why == "shutdown":
            return  # the pool is closing: nothing was replaced
    elif worker.retiring and exitcode == 0:
        why, detail = "recycle", ""
    else:
        why, detail = "crash", describe_exit(exitcode, oom)
    if why == "memory" or (why == "recycle" and over):
        from ._memory import format_bytes  # (only with max_memory_per_worker)

        detail = (
            f"it used {format_bytes(over)}, above "
            f"max_memory_per_worker={format_bytes(pool._memory_limit or 0)}"
        )
    elif why == "recycle":
        detail = "it ran its max_tasks_per_worker tasks"
    worker_replaced(
        why, pid, detail=detail, exitcode=exitcode, function=function, replaced=replaced
    )


def _read_fault(pid: int | None) -> str:
    """What faulthandler wrote in worker ``pid`` as it crashed ("" if nothing)."""
    path = None if pid is None else fault_path(pid)
    if path is None:
        return ""
    try:
        with open(path, errors="replace") as f:
            return f.read(1 << 16)
    except OSError:
        return ""


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
    and ``worker`` tell the memory it was killed for using (``_memory``);
    ``worker`` also what it wrote to stderr, for the crash report.
    """
    job = work.state.job
    if reason is not None:
        why, killed_run, killed_index = reason
        if (killed_run, killed_index) != (run_id, index):
            return None
        if why == "cancel":
            return errors.cancelled
        if why == "timeout":
            text = (
                f"{fn_name(job)}() ran past its timeout of {job.options.timeout:g} s; "
                "its worker was ended and replaced"
            )
            return lambda: TaskTimeout(text)
        if why == "memory" and pool is not None and worker is not None:
            from ._memory import memory_error

            limit, seen = pool._memory_limit, worker.memory.over
            return lambda: memory_error(job, limit, seen, exitcode)
    when = " while loading the arguments" if index < work.lo else ""
    return crashed(job, worker, exitcode, when, oom)


def crashed(
    job: Job,
    worker: Worker | None,
    exitcode: int | None,
    when: str = "",
    oom: bool | None = None,
) -> Callable[[], BaseException]:
    """The crash report of ``job``'s item that ``worker`` was running (one per item).

    ``oom``: whether the kernel's OOM killer killed it (``_oom``).
    """
    function = fn_name(job)
    pid = None if worker is None else worker.process.pid
    cause = describe_exit(exitcode, oom) + when
    stderr = "" if worker is None else worker.output.last_lines()
    return lambda: errors.WorkerCrashed(
        exitcode=exitcode, function=function, pid=pid, cause=cause, stderr=stderr
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
