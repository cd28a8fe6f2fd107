"""Task[R]: the handle of one submitted call, a ``concurrent.futures.Future``.

It adds the ``multiprocessing.pool.AsyncResult`` spellings (``get``, ``wait``,
``ready``, ``successful``), ``await``, and a ``cancel()`` that also stops a
task that is already running, when its backend can.
"""

from __future__ import annotations

import concurrent.futures
import sys
from collections.abc import Callable, Generator
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, RUNNING
from typing import Any, TypeVar

R = TypeVar("R")

__all__ = ("Task",)

if sys.version_info < (3, 11):

    class _WaitTimeout(concurrent.futures.TimeoutError, TimeoutError):
        """A wait ran out: before 3.11 the futures' TimeoutError is not the builtin one."""


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

    _stop: Callable[[], bool] | None = None
    """Set by the backend while the task runs: ends it, True if it did."""

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
            if not self.done():
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
            return True
        stop = self._stop
        with self._condition:
            if self._state != RUNNING or stop is None:
                return False
        if not stop():
            return False
        self._cancel_from_pool()
        return self.cancelled()

    def _cancel_from_pool(self) -> None:
        """The pool dropped or stopped this task (shutdown with cancel_pending)."""
        if super().cancel():
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
