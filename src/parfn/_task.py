"""Task[R]: the handle of one submitted call, a ``concurrent.futures.Future``;
and TaskSink, which hands it its outcome.

Imported by the first ``spawn``, not before: ``concurrent.futures`` loads
``logging``. Task adds the ``multiprocessing.pool.AsyncResult`` spellings (``get``, ``wait``,
``ready``, ``successful``), ``await``, and a ``cancel()`` that also stops a
task that is already running, when its backend can.
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)

from . import _stats
from ._typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from ._stats import Tally
    from .backends._base import Backend, Job

R = TypeVar("R")

__all__ = ("Task", "TaskSink")

if sys.version_info < (3, 11):

    class _WaitTimeout(concurrent.futures.TimeoutError, TimeoutError):
        """A wait ran out: before 3.11 the futures' TimeoutError is not the builtin one."""


class Stopper(Protocol):
    """What stops a running task (its backend's side of ``Task.cancel``)."""

    def stop(self) -> bool: ...


class Counter(Protocol):
    """What counts a task that ``cancel()`` cancelled (its pool's ``stats()``)."""

    def cancelled(self) -> None: ...


class _Condition(threading.Condition):
    """``threading.Condition(threading.RLock())``, three objects lighter.

    A Condition binds its lock's methods to itself, more objects per task
    for the garbage collector; here they are methods. Its waiters' deque is
    made by the first ``wait``. The lock is reentrant, as a Future's is:
    ``concurrent.futures.wait(..., return_when=FIRST_EXCEPTION)`` holds every
    future's lock while it calls their ``cancelled()`` and ``exception()``,
    which take it again.
    """

    def __init__(self) -> None:  # no super().__init__(): it would bind them
        self._lock = threading.RLock()
        self._waiters: deque[Any] = _NO_WAITERS

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    # What Condition.wait needs of a reentrant lock (it would bind these).
    def _is_owned(self) -> bool:
        return self._lock._is_owned()  # type: ignore[attr-defined,no-any-return]

    def _release_save(self) -> Any:
        return self._lock._release_save()  # type: ignore[attr-defined]

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)  # type: ignore[attr-defined]

    def notify_all(self) -> None:
        # The caller holds the lock (Future always does); with nobody waiting
        # (a task's result is mostly read after it is done) there is nothing to do.
        if self._waiters:
            super().notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        if not self._waiters:  # the caller holds the lock: nobody waits on it
            self._waiters = deque()
        return super().wait(timeout)


_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)
_NO_WAITERS: Any = ()
"""Until a thread waits, a Condition's waiters and a Task's callbacks are this
shared empty tuple, which ``notify`` and ``_invoke_callbacks`` read as empty."""


class Task(Future[R]):
    """The result of :meth:`Parallel.spawn` or :meth:`Pool.spawn`, still to come.

    >>> import asyncio, parfn
    >>> with parfn.Pool(2, backend="thread") as pool:
    ...     task = pool.spawn(pow, 2, 10)
    ...     task.result(timeout=10)
    1024
    >>> async def main():
    ...     with parfn.Pool(1, backend="thread"):
    ...         return await parfn.parallel(abs).spawn(-3)
    >>> asyncio.run(main())
    3

    A :class:`concurrent.futures.Future`: it works with
    ``concurrent.futures.wait`` and ``as_completed``. Inside asyncio,
    ``await task`` gives the result, and cancelling the awaiting coroutine
    cancels the task. ``cancel()`` removes a queued task and stops a running
    one (its worker is ended and replaced).
    """

    _stopper: Stopper | None = None
    """Set while the task may run: its ``stop()`` ends it, True if it did."""
    _counter: Counter | None = None
    """Told when ``cancel()`` cancels the task (the pool's count of cancelled tasks)."""

    def __init__(self) -> None:
        # Future.__init__, with a lighter Condition (see _Condition): tens of
        # thousands of tasks may wait in a queue, and the garbage collector
        # scans every object they hold, again and again. A test checks that
        # the attributes match Future's.
        self._condition: threading.Condition = _Condition()
        self._state = PENDING
        self._result: R | None = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[Future[R]], object]] = _NO_WAITERS

    def add_done_callback(self, fn: Callable[[Future[R]], object]) -> None:
        """Call ``fn(task)`` when the task is done (at once if it is)."""
        with self._condition:
            if self._done_callbacks is _NO_WAITERS:
                self._done_callbacks = []
        super().add_done_callback(fn)

    if sys.version_info < (3, 11):

        def result(self, timeout: float | None = None) -> R:
            """The result; the builtin ``TimeoutError`` if ``timeout`` seconds pass first."""
            try:
                return super().result(timeout)
            except concurrent.futures.TimeoutError as exc:
                if exc is self._exception:
                    raise  # the task's own exception
                raise _WaitTimeout(f"{self!r} not done within {timeout} s") from None

        def exception(self, timeout: float | None = None) -> BaseException | None:
            """The task's exception, or None; the builtin ``TimeoutError`` if it waits too long."""
            try:
                return super().exception(timeout)
            except concurrent.futures.TimeoutError:
                raise _WaitTimeout(f"{self!r} not done within {timeout} s") from None

    # -- the multiprocessing.pool.AsyncResult spellings -------------------
    def get(self, timeout: float | None = None) -> R:
        """The result, as ``AsyncResult.get``: waits, and raises what the task raised.

        Raises the builtin ``TimeoutError`` if ``timeout`` seconds pass first;
        the task goes on.
        """
        return self.result(timeout)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the task is done or ``timeout`` seconds pass; raises nothing."""
        with self._condition:
            if self._state not in _DONE:
                self._condition.wait(timeout)

    def ready(self) -> bool:
        """True once the task has finished (as ``AsyncResult.ready``)."""
        return self.done()

    def successful(self) -> bool:
        """True if the task finished without raising; ``ValueError`` if not yet done."""
        if not self.done():
            raise ValueError(f"{self!r} is not ready")
        return not self.cancelled() and self.exception(0) is None

    # -- cancel that also stops a running task ----------------------------
    def cancel(self) -> bool:
        """Cancel the task: a queued one is removed, a running one is stopped.

        Returns True if the task is now cancelled, False if it had already
        finished (or its backend cannot stop a running task, as with threads).
        """
        if super().cancel():
            self._count_cancelled()
            return True
        stopper = self._stopper
        with self._condition:
            if self._state != RUNNING or stopper is None:
                return False
        if not stopper.stop():
            return False
        self._cancel_from_pool()
        if self.cancelled():
            self._count_cancelled()
            return True
        return False

    def _count_cancelled(self) -> None:
        counter = self._counter
        if counter is not None:
            counter.cancelled()

    def _cancel_from_pool(self) -> None:
        """The pool dropped or stopped this task (shutdown with cancel_pending)."""
        if super().cancel():
            # Not started: tell concurrent.futures.wait and as_completed too
            # (a pool that drops a task never starts it, which would).
            with self._condition:
                notify = self._state == CANCELLED
            if notify:
                self.set_running_or_notify_cancel()
            return
        with self._condition:
            if self._state != RUNNING:
                return
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]

    # -- asyncio ------------------------------------------------------------
    def __await__(self) -> Generator[Any, None, R]:
        import asyncio  # here, not at import: asyncio costs ~15 ms to import

        future = asyncio.wrap_future(self)
        try:
            return (yield from future.__await__())
        except asyncio.CancelledError:
            self.cancel()
            raise


class TaskSink:
    """Connects a one-item Job to its Task (and the Task's ``cancel`` to the
    backend), and counts its outcome for ``pool.stats()``."""

    __slots__ = ("backend", "error_hook", "job", "tally", "task", "token")

    def __init__(
        self,
        task: Task[Any],
        backend: Backend,
        tally: Tally,
        error_hook: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.task = task
        self.backend = backend
        self.tally = tally
        self.error_hook = error_hook
        self.job: Job | None = None
        # Taken by whoever counts the outcome (see Tally.task): a bytearray,
        # which the garbage collector does not track (a list would be one
        # more object per task in flight for its collections to follow).
        self.token = bytearray(1)
        if backend.can_stop_running:
            task._stopper = self
        task._counter = self

    def cancel(self) -> None:
        """The caller was interrupted while it submitted (Ctrl-C)."""
        self.task.cancel()

    def stop(self) -> bool:
        """Stop the running job (``Task.cancel``); True if it was stopped."""
        job = self.job
        return job is not None and self.backend.cancel(job)

    def start(self) -> bool:
        # Read without the lock: only the pool makes a task RUNNING (here),
        # and set_running_or_notify_cancel takes the lock for the rest.
        state = self.task._state
        if state == RUNNING:
            return True  # a retry after a crash: the task started before
        if state != CANCELLED_AND_NOTIFIED and self.task.set_running_or_notify_cancel():
            return True
        self.cancelled()  # (cancelled without Task.cancel: the executor's shutdown)
        return False

    def deliver(
        self, lo: int, values: Any, errors: dict[int, BaseException], elapsed: float
    ) -> None:
        task = self.task
        # Done: let the job and its arguments go, and leave no cycle behind
        # (the job and the task refer to this sink).
        task._stopper = task._counter = None
        job, self.job = self.job, None
        error = errors.get(lo)
        # Counted before the task is done: whoever waits for it sees it counted.
        outcome = self.tally.call(self, job.fn if job is not None else None, error, elapsed)
        try:
            if error is None:
                task.set_result(values[0])
            elif outcome == _stats.CANCELLED:
                task._cancel_from_pool()
            else:
                if self.error_hook is not None:
                    self.error_hook(error)
                task.set_exception(error)
        except InvalidStateError:
            pass  # cancelled meanwhile: the outcome has nowhere to go

    def cancelled(self) -> None:
        """The task was cancelled before an outcome was handed over."""
        task = self.task
        task._stopper = task._counter = None  # no cycle left behind
        self.job = None
        self.tally.task(self, "", _stats.CANCELLED, 0.0)
