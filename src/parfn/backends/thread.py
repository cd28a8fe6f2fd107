"""The thread backend: items run on a pool of threads in this process.

For I/O-bound work and for functions that release the GIL. A thread cannot be
stopped from outside, so a ``timeout`` fails the item with ``TaskTimeout`` at
its deadline while the thread runs on to the end in the background (its late
result is dropped, and a timed-out item is not retried), and ``cancel()`` of a
running task returns False.

A task's nested calls (a decorated function's ``.map`` inside it) run in the
task's own thread, on this pool's side of the fence: never on a new process
pool, and never queued behind the task itself, so they cannot deadlock
however many tasks nest at once (see ``_scope.in_task``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, ThreadPoolExecutor

from .. import _scope
from .._typing import Any
from .._wire.errors import TaskTimeout
from .._wire.execute import run_items
from ._base import Counts, Job, available_cpus, fail_items
from ._events import task_timed_out

__all__ = ("ThreadBackend",)


class _Run:
    """Items ``lo:hi`` of a job; exactly one of its runner and its timer delivers it."""

    __slots__ = ("delivered", "hi", "job", "lo")

    def __init__(self, job: Job, lo: int, hi: int) -> None:
        self.job, self.lo, self.hi = job, lo, hi
        self.delivered = False


class ThreadBackend:
    name = "thread"
    can_stop_running = False

    def __init__(
        self,
        workers: int | None = None,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self.workers = workers or available_cpus()
        self._executor = ThreadPoolExecutor(
            self.workers,
            thread_name_prefix="parfn-thread",
            initializer=initializer,
            initargs=initargs,
        )
        self._lock = threading.Lock()
        self._queued: set[_Run] = set()  # guarded by _lock
        self._running: set[_Run] = set()  # guarded by _lock
        # For pool.stats() (guarded by _lock): items past their timeout, runs
        # again of items that raised.
        self._timed_out = self._retried = 0

    def submit(self, job: Job) -> None:
        n = len(job.items)
        # A timeout is per item: then each item is a run of its own.
        step = 1 if job.options.timeout is not None else max(n, 1)
        for lo in range(0, n, step):
            run = _Run(job, lo, min(lo + step, n))
            with self._lock:
                self._queued.add(run)
            self._executor.submit(self._run, run)

    def _run(self, run: _Run) -> None:
        with self._lock:
            if run not in self._queued:  # dropped by shutdown(cancel_pending=True)
                return
            self._queued.discard(run)
            self._running.add(run)
        try:
            self._run_items(run)
        finally:
            with self._lock:
                self._running.discard(run)

    def _run_items(self, run: _Run) -> None:
        job = run.job
        if not job.sink.start():
            return
        timer = None
        timeout = job.options.timeout
        if timeout is not None:
            timer = threading.Timer(timeout, self._expire, (run, timeout))
            timer.daemon = True
            timer.start()
        inside = _scope.in_task.set(True)  # nested calls run in this thread
        try:
            values, errors, elapsed, retried = run_items(
                job.fn,
                job.items,
                run.lo,
                run.hi,
                job.options.retries,
                star=job.star,
                kwargs=job.kwargs,
                interrupts=True,
            )
        finally:
            _scope.in_task.reset(inside)
        if timer is not None:
            timer.cancel()
        if self._take(run, retried):
            job.sink.deliver(run.lo, values, errors, elapsed)

    def _take(self, run: _Run, retried: int = 0) -> bool:
        with self._lock:
            taken, run.delivered = run.delivered, True
            if not taken:
                self._retried += retried
            return not taken

    def _expire(self, run: _Run, timeout: float) -> None:
        if self._take(run):
            with self._lock:
                self._timed_out += run.hi - run.lo
            name = getattr(run.job.fn, "__qualname__", repr(run.job.fn))
            text = (
                f"{name} ran past its timeout of {timeout:g} s; the thread backend cannot "
                "stop a running thread, so it goes on in the background"
            )
            task_timed_out(name, timeout, "its thread goes on in the background")
            fail_items(run.job, run.lo, run.hi, lambda i: TaskTimeout(text))

    def cancel(self, job: Job) -> bool:
        """Drop ``job``'s queued runs; a running thread cannot be stopped."""
        with self._lock:
            runs = {run for run in self._queued if run.job is job}
            self._queued -= runs
        return bool(runs)

    def counts(self) -> Counts:
        with self._lock:
            return Counts(
                running=len(self._running),
                workers=self.workers,
                timed_out=self._timed_out,
                retried=self._retried,
            )

    def shutdown(self, wait: bool, cancel_pending: bool, terminate: bool = False) -> None:
        """Stop; see ``backends._base``. A thread cannot be stopped: with
        ``terminate``, running items get ``CancelledError`` at once and their
        threads run on to the end in the background, unwaited for."""
        running: list[_Run] = []
        with self._lock:
            queued: set[_Run] = set()
            if cancel_pending or terminate:
                queued, self._queued = self._queued, set()
            if terminate:
                running = list(self._running)
        for run in queued:
            fail_items(run.job, run.lo, run.hi, lambda i: CancelledError())
        for run in running:
            if self._take(run):
                fail_items(run.job, run.lo, run.hi, lambda i: CancelledError())
        self._executor.shutdown(wait=wait and not terminate)
