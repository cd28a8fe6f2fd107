"""What the drop-ins share: their pools' worker processes, the standard
library's traceback type as a task exception's cause, and what their workers
run (a chunk of a map, the thread caps).

``parfn.ProcessPoolExecutor`` and ``parfn.multiprocessing.Pool`` show the
worker processes of the parfn pool underneath as the standard library shows
its own (``executor._processes``, ``pool._pool``: code in the wild reads
them, to count workers or to kill one). Each is a :class:`WorkerProcess`,
which stays safe to use after the pool has reaped the process.
"""

from __future__ import annotations

import contextlib
import itertools
import select
import signal
from collections.abc import Callable

from ._typing import TYPE_CHECKING, Any
from ._wire.errors import RemoteTraceback
from ._wire.serialize import ExceptionEnvelope

if TYPE_CHECKING:
    from ._pool import ErrorHook, Pool

__all__ = (
    "Raised",
    "WorkerProcess",
    "call_catching",
    "cause_as",
    "run_chunk",
    "worker_processes",
)


class WorkerProcess:
    """A worker process of a parfn pool: ``pid``, ``is_alive()``, ``join()``,
    ``terminate()``, ``kill()``, ``exitcode``, as ``multiprocessing.Process``.

    Killing one is what it is with parfn: the task it was running fails with
    :class:`parfn.WorkerCrashed`, and the pool starts a replacement. Once the
    pool has reaped the process, it is not alive, ``join()`` returns at once,
    and ``terminate()``/``kill()`` do nothing (its pid may be another's by then).

    The pool's handle is a ``multiprocessing.Process`` (spawn, forkserver) or
    the zygote's worker handle (fork), whose ``sentinel`` is a pidfd: readable
    once the worker has exited. Waiting here only reads that, never the
    pool's own channels.
    """

    __slots__ = ("_process", "name", "pid")

    def __init__(self, process: Any) -> None:
        self._process = process
        self.pid: int = process.pid
        self.name: str = getattr(process, "name", "parfn-worker")

    def _exited(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` for the worker's end; True once it has ended (or been reaped)."""
        try:
            fd = self._process.sentinel
            if fd is None or fd < 0:
                return True
            ready, _, _ = select.select([fd], [], [], timeout)
        except (OSError, ValueError):  # closed by the pool meanwhile: reaped
            return True
        return bool(ready)

    def is_alive(self) -> bool:
        is_alive = getattr(self._process, "is_alive", None)
        if is_alive is None:
            return not self._exited(0)
        try:
            return bool(is_alive())
        except ValueError:  # "process object is closed": the pool reaped it
            return False

    def join(self, timeout: float | None = None) -> None:
        self._exited(timeout)

    def _signal(self, signum: int, method: str) -> None:
        if not self.is_alive():
            return
        with contextlib.suppress(OSError, ValueError):
            if hasattr(self._process, "is_alive"):  # a multiprocessing.Process
                getattr(self._process, method)()
            else:  # the zygote's: its sentinel is a pidfd
                signal.pidfd_send_signal(self._process.sentinel, signum)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM, "terminate")

    def kill(self) -> None:
        self._signal(signal.SIGKILL, "kill")

    @property
    def exitcode(self) -> int | None:
        """The exit code (negative: the signal); None while it runs, or until reaped."""
        try:
            code: int | None = self._process.exitcode
        except ValueError:  # closed
            return None
        return code

    @property
    def sentinel(self) -> int:
        return int(self._process.sentinel)

    def __repr__(self) -> str:
        state = "alive" if self.is_alive() else "stopped"
        return f"<WorkerProcess pid={self.pid} {state}>"


def worker_processes(pool: Pool) -> list[WorkerProcess]:
    """The worker processes of ``pool`` now in service (none but the process backend's)."""
    processes = getattr(pool._backend, "processes", None)
    if processes is None:
        return []
    return [WorkerProcess(p) for p in processes()]


def cause_as(cls: type[Exception]) -> ErrorHook:
    """A ``Pool._error_hook`` that makes a task exception's cause a ``cls(tb)``.

    A task's exception comes back with the worker's traceback text as its
    ``__cause__`` (a :class:`parfn.RemoteTraceback`); the standard library's
    pools use their own type for it, and code (CPython's tests among it)
    checks that type.
    """

    def recast(exc: BaseException) -> None:
        cause = exc.__cause__
        if type(cause) is RemoteTraceback:
            exc.__cause__ = cls(cause.tb)

    return recast


def run_chunk(fn: Callable[..., Any], star: bool, chunk: list[Any]) -> list[Any]:
    """Run in a worker: one chunk of a ``multiprocessing.Pool.map``, one task
    as in the standard library. (Here, not with the pool: a worker imports
    this light module only.)"""
    if star:
        return list(itertools.starmap(fn, chunk))
    return list(map(fn, chunk))


class Raised:
    """The exception an item raised, travelling as its value (see ``call_catching``)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:
        # The envelope carries the worker's traceback, and unpickles to the
        # exception itself (or a RemoteError).
        return (Raised, (ExceptionEnvelope(self.error),))


def call_catching(fn: Callable[..., Any], *args: Any) -> Any:
    """Run in a worker: ``fn(*args)``, or the exception it raised as a :class:`Raised`.

    For ``multiprocessing.Pool.imap``, whose iteration goes on past an item
    that raised (parfn's own imap ends there).
    """
    try:
        return fn(*args)
    except Exception as exc:
        return Raised(exc)
