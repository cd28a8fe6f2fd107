"""Dask's failures as parfn's errors: the one place they are mapped.

A function's own exceptions come back as data (see ``_remote``). What Dask
itself reports becomes the error each item of a task gets here: a dead worker
(``KilledWorker``) is :class:`WorkerCrashed`, a task the cluster cancelled or
could not take is :class:`WorkerCrashed` too, a deadline passed is
:class:`TaskTimeout`, and any other task error (the worker could not run the
task at all) is passed on as it is.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from concurrent.futures import CancelledError

from ..._typing import Any
from ..._wire.errors import TaskTimeout, WorkerCrashed
from ..._wire.serialize import loads
from .._base import Job

__all__ = ("copies", "crashed", "lost", "read", "task_error", "timed_out")


def _name(fn: Callable[..., Any]) -> str:
    """How messages name a call of ``fn``: ``square()``."""
    return f"{getattr(fn, '__qualname__', None) or repr(fn)}()"


def read(future: Any, data: bytes | None) -> tuple[Any, BaseException | None]:
    """A done Dask future's ``(outcome, None)``, or ``(None, the error)``; it is released.

    ``data``: its result, if gathered already.
    """
    outcome: Any = None
    error: BaseException | None = None
    try:
        if future.status == "finished":
            outcome = loads(data if data is not None else future.result(), "the result")
        elif future.status == "error":
            error = future.exception()
        else:
            error = CancelledError(f"Dask reports the task {future.status}")
    except BaseException as exc:
        error = exc
    with contextlib.suppress(Exception):
        future.release()
    return outcome, error


def task_error(job: Job, error: BaseException) -> Callable[[int], BaseException]:
    """The errors for the items of a task that Dask failed, other than by a crash."""
    if isinstance(error, CancelledError):
        # Not by parfn: the client lost the scheduler, or the cluster closed.
        return lambda i: lost(job, error)
    # Not the function (its errors are data): the worker could not run
    # the task at all (e.g. parfn is not installed there).
    return copies(error)


def lost(job: Job, error: BaseException) -> BaseException:
    """The error for an item that the cluster, not the function, failed."""
    exc = WorkerCrashed(
        f"the Dask cluster could not run {_name(job.fn)}: {type(error).__name__}: {error}"
    )
    exc.__cause__ = error
    return exc


def crashed(job: Job, error: BaseException, phase: str) -> BaseException:
    """The error for an item whose worker died (``error``: Dask's KilledWorker)
    while ``phase`` was "load" (its arguments) or "run" (or "": unknown)."""
    doing = "loading the arguments of" if phase == "load" else "running"
    return WorkerCrashed(
        f"the Dask worker process {doing} {_name(job.fn)} died: killed by a signal "
        "(SIGKILL: often the out-of-memory killer), os._exit, or a segfault; Dask "
        f"does not say which. {error}"
    )


def timed_out(job: Job) -> BaseException:
    """The error for an item that ran past its job's timeout."""
    return TaskTimeout(
        f"{_name(job.fn)} ran past its timeout of {job.options.timeout:g} s; its Dask "
        "task was cancelled, but Dask cannot stop a running task, so it goes on in "
        "its worker to the end (its result is dropped)"
    )


def copies(exc: BaseException) -> Callable[[int], BaseException]:
    """One exception for several items: a copy for each, so no two share a traceback."""
    first = True

    def make(i: int) -> BaseException:
        nonlocal first
        if first:
            first = False
            return exc
        try:
            other = copy.copy(exc)
        except Exception:
            return exc
        other.__cause__ = exc.__cause__
        return other

    return make
