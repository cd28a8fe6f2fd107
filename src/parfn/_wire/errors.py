"""Every error parfn raises. This module imports nothing else from parfn.

The tree::

    ParfnError
    ├── RemoteError          the task raised an exception that could not travel back
    ├── SerializationError   an argument or a result could not be pickled
    │                        (also pickle.PicklingError)
    ├── WorkerCrashed        the worker running the task died (also BrokenProcessPool)
    │   └── MemoryLimitExceeded  its worker went over max_memory_per_worker
    ├── TaskTimeout          the task ran past its timeout (also TimeoutError)
    └── PoolClosed           the pool was used after its shutdown

An exception raised by the user's own function is not wrapped: it comes back as
itself, with the worker's traceback text attached as its ``__cause__``.
"""

from __future__ import annotations

import pickle
import sys

from .._typing import TYPE_CHECKING, Any

__all__ = (
    "MemoryLimitExceeded",
    "ParfnError",
    "PoolClosed",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "TaskTimeout",
    "WorkerCrashed",
    "cancelled",
    "is_cancelled",
)


class ParfnError(Exception):
    """Base class of every error parfn itself raises.

    >>> import parfn
    >>> issubclass(parfn.WorkerCrashed, parfn.ParfnError)
    True
    """


class RemoteError(ParfnError):
    """The task raised an exception that could not be sent back as itself.

    Raised in place of the original exception when that exception cannot be
    pickled in the worker or unpickled in the caller (for example an exception
    class whose ``__init__`` takes arguments it does not pass to ``Exception``).
    The original's type name, message and traceback text are kept::

        except parfn.RemoteError as e:
            print(e.type_name, e.message)
            print(e.traceback)

    >>> import parfn
    >>> e = parfn.RemoteError("KeyError", "'x'", "Traceback (most recent call last): ...")
    >>> print(e)
    KeyError: 'x'

    Unlike :class:`WorkerCrashed`, the worker is alive and well.
    """

    def __init__(self, type_name: str, message: str, traceback: str, reason: str = "") -> None:
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.reason = reason
        super().__init__(type_name, message, traceback, reason)

    def __str__(self) -> str:
        text = f"{self.type_name}: {self.message}"
        if self.reason:
            text += f" (the exception could not be sent back as itself: {self.reason})"
        return text


class SerializationError(ParfnError, pickle.PicklingError):
    """An argument or a result could not be pickled or unpickled.

    The message says which (``argument 2``, ``keyword argument 'f'``, ``the
    result``), of what type, and why. Only the task it hit fails; the pool and
    its workers are unaffected. Also a :class:`pickle.PicklingError`, so code that
    already catches that keeps working.

    >>> import threading, parfn
    >>> with parfn.Pool(1) as pool:
    ...     try:
    ...         pool.apply(id, threading.Lock())
    ...     except parfn.SerializationError as e:
    ...         print(e)
    argument 1 (of type lock) cannot be pickled: ...
    """


class _Crashed(ParfnError):
    """The worker process running the task died before it could answer.

    A signal (SIGKILL is often the out-of-memory killer), ``os._exit`` or a
    segfault in native code. Only the task that was running fails; the worker is
    replaced and every other task goes on. Also a
    :class:`concurrent.futures.process.BrokenProcessPool`, so code written for
    ``ProcessPoolExecutor`` still catches it, but a parfn pool never becomes
    broken. Compare :class:`PoolClosed` (you shut the pool down).

    >>> import os, parfn
    >>> with parfn.Pool(1) as pool:
    ...     try:
    ...         pool.apply(os._exit, 3)
    ...     except parfn.WorkerCrashed as e:
    ...         print(e.function, "ended with exit code", e.exitcode)
    ...     pool.apply(abs, -2)  # a new worker took its place
    _exit ended with exit code 3
    2

    What the crash report says, as attributes (None where unknown):

    * ``function``: the qualified name of the function that was running;
    * ``index``: the item's index in its ``map`` (None for a single call);
    * ``pid``: the worker process's id;
    * ``exitcode``: its exit code, negative for a signal (``-11``: SIGSEGV);
      ``signal``: that signal's number, or None if it exited;
    * ``stderr``: the last lines the worker wrote to ``sys.stderr`` before it
      died, a segfault's tracebacks (faulthandler's dump) included; ``""`` if
      none.

    The message says all of these; ``str(e)`` is what to show a person.
    """

    function: str | None
    index: int | None
    pid: int | None
    exitcode: int | None
    stderr: str

    def __init__(
        self,
        message: str | None = None,
        exitcode: int | None = None,
        *,
        function: str | None = None,
        index: int | None = None,
        pid: int | None = None,
        cause: str = "",
        stderr: str = "",
    ) -> None:
        self.exitcode = exitcode
        self.function = function
        self.index = index
        self.pid = pid
        self.stderr = stderr
        self._message = message
        self._cause = cause
        super().__init__(message if message is not None else cause)

    @property
    def signal(self) -> int | None:
        """The number of the signal that ended the worker; None if it exited."""
        code = self.exitcode
        return -code if code is not None and code < 0 else None

    def summary(self) -> str:
        """The message's first line: what died, running what, and how."""
        if self._message is not None:
            return self._message
        who = "the worker process" if self.pid is None else f"the worker process {self.pid}"
        if self.function is not None:
            who += f" running {self.function}()"
        if self.index is not None:
            who += f" on item {self.index} of its map"
        return (
            f"{who} died: {self._cause or 'it ended'}. The worker was replaced; "
            "other tasks are unaffected"
        )

    def __str__(self) -> str:
        text = self.summary()
        if self.stderr:
            lines = "\n".join(f"  | {line}" for line in self.stderr.splitlines())
            text += f"\nThe worker's last lines on stderr:\n{lines}"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.summary()!r})"


class _OverMemory(_Crashed):
    """The task's worker went over the pool's ``max_memory_per_worker`` while it ran.

    The pool watches its busy workers' memory; a worker seen above the limit
    during a task is ended and replaced, and that task alone fails with this
    error (others are unaffected). ``limit`` and ``seen`` are in bytes: the
    limit, and the memory the worker was seen using. A worker that is above
    the limit only *after* a task is replaced quietly, and that task's result
    is kept. A :class:`WorkerCrashed`; compare that (the worker died by
    itself, the kernel's out-of-memory killer included).

    >>> import parfn
    >>> e = parfn.MemoryLimitExceeded("f() used too much memory", 2**20, 3 * 2**20)
    >>> isinstance(e, parfn.WorkerCrashed), e.limit, e.seen
    (True, 1048576, 3145728)
    """

    def __init__(self, message: str, limit: int, seen: int, exitcode: int | None = None) -> None:
        self.limit = limit
        self.seen = seen
        super().__init__(message, exitcode)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.limit, self.seen, self.exitcode))


if TYPE_CHECKING:
    from concurrent.futures.process import BrokenProcessPool

    class WorkerCrashed(_Crashed, BrokenProcessPool):
        """See ``_Crashed``."""

    class MemoryLimitExceeded(_OverMemory, WorkerCrashed):
        """See ``_OverMemory``."""

else:

    def __getattr__(name: str) -> Any:
        """``WorkerCrashed`` (and its subclass ``MemoryLimitExceeded``) is made on
        first use: its base ``BrokenProcessPool`` costs ~10 ms to import
        (``concurrent.futures.process`` imports most of ``multiprocessing``),
        which a pool whose workers are forked by its zygote does not otherwise
        need."""
        if name == "MemoryLimitExceeded":
            crashed = globals().get("WorkerCrashed") or __getattr__("WorkerCrashed")
            bases: tuple[type, ...] = (_OverMemory, crashed)
            doc = _OverMemory.__doc__
        elif name == "WorkerCrashed":
            from concurrent.futures.process import BrokenProcessPool

            bases, doc = (_Crashed, BrokenProcessPool), _Crashed.__doc__
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        made = type(name, bases, {"__doc__": doc, "__module__": __name__, "__qualname__": name})
        # setdefault is atomic: threads that race here all get the one class
        # stored first (``except WorkerCrashed`` must match what is raised).
        return globals().setdefault(name, made)


class TaskTimeout(ParfnError, TimeoutError):
    """The task ran longer than its ``timeout`` option.

    The worker running it was ended and replaced (process backend), so the task
    did not go on in the background. Also a :class:`TimeoutError`. Waiting with
    ``task.result(timeout=...)`` raises a plain ``TimeoutError`` instead, and
    the task goes on.

    >>> import time, parfn
    >>> nap = parfn.parallel(time.sleep, timeout=0.01)
    >>> with parfn.Pool(1, backend="thread") as pool:
    ...     try:
    ...         pool.apply(nap, 0.3)
    ...     except parfn.TaskTimeout:
    ...         print("timed out")
    timed out
    """


class PoolClosed(ParfnError, RuntimeError):
    """The pool was used after it was shut down (by you, or at interpreter exit).

    Compare :class:`WorkerCrashed` (a worker died; the pool keeps working).
    Start a new pool, or call the decorated function outside the closed
    ``with`` block to use the default pool.

    >>> import parfn
    >>> pool = parfn.Pool(1, backend="thread")
    >>> pool.shutdown()
    >>> try:
    ...     pool.map(abs, [-1])
    ... except parfn.PoolClosed as e:
    ...     print(e)
    <parfn.Pool thread workers=1 closed> is shut down; start a new pool to run more tasks
    """


class RemoteTraceback(Exception):
    """The worker's traceback text, attached as ``__cause__`` of a remote exception."""

    def __init__(self, tb: str) -> None:
        self.tb = tb
        super().__init__(tb)

    def __str__(self) -> str:
        return self.tb


# -- concurrent.futures.CancelledError, without importing it ----------------------------
#
# An item that was cancelled gets ``concurrent.futures.CancelledError``, as a
# Future's waiter would. Its module loads ``logging`` (~3 ms, a tenth of a short
# program's start), so it is imported only when something is cancelled.


def cancelled() -> BaseException:
    """A ``concurrent.futures.CancelledError``, for an item that was cancelled."""
    from concurrent.futures import CancelledError

    return CancelledError()


def is_cancelled(error: BaseException) -> bool:
    """Whether ``error`` is a ``concurrent.futures.CancelledError``."""
    # (Read with a default: another thread may be importing the module.)
    cancelled = getattr(sys.modules.get("concurrent.futures._base"), "CancelledError", None)
    return cancelled is not None and isinstance(error, cancelled)
