"""What runs in a Dask worker: a run of items, and the initializer plugin.

Imported there by reference when a task or the plugin is unpickled, so it
imports no more of parfn than running items needs, and ``distributed`` only
inside the worker. Every outcome, a function's exception included, goes back
to the caller as data; a Dask-level error means the worker or the cluster
failed, never the function.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from ... import _scope
from ..._typing import Any
from ..._wire.errors import RemoteError, SerializationError
from ..._wire.execute import run_items
from ..._wire.logs import collected
from ..._wire.protocol import LogLevels
from ..._wire.serialize import (
    ExceptionEnvelope,
    dumps,
    format_user_traceback,
    load_function,
    loads,
    wrap_exception,
)

__all__ = ("initializer_plugin", "run_remote")


def run_remote(
    fn_data: bytes,
    payload: bytes,
    started: tuple[str, str] | None,
    marker: str | None,
    levels: LogLevels | None = None,
) -> bytes:
    """Run a run of items in a Dask worker; every outcome comes back as data.

    ``marker``: a file that exists while the task runs, which tells the
    caller, should the worker die, that this task was running (and so may be
    what killed it), and whether it was still loading its arguments ("load")
    or running the function ("run"). ``started``: ``(topic, key)`` of an
    event to send the caller first. The records the task's thread logs go
    back with the outcome; ``levels``: the caller's, for the worker's loggers
    to take first (on a cluster parfn started, where every task is its own).
    """
    fd = None if marker is None else os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    if fd is not None:
        os.write(fd, b"load")

    def loaded() -> None:
        if fd is not None:
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, b"run ")

    try:
        if started is not None:
            from distributed import get_worker  # type: ignore[import-not-found, unused-ignore]

            get_worker().log_event(started[0], started[1])
        return _run_here(fn_data, payload, loaded, levels)
    finally:
        if marker is not None and fd is not None:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(marker)


_functions: dict[bytes, Callable[..., Any]] = {}
"""The functions a worker has unpickled, by their bytes (a cache; races are harmless)."""


def _load_function(data: bytes) -> Callable[..., Any]:
    fn = _functions.get(data)
    if fn is None:
        fn = load_function(data)
        if len(data) < 1 << 20:  # not a closure over big data: keep it
            if len(_functions) >= 64:
                _functions.clear()
            _functions[data] = fn
    return fn


def _failed(failure: BaseException | ExceptionEnvelope, split: bool) -> bytes:
    """The outcome of a run whose items could not run at all (see _run_here)."""
    return dumps(([], {}, {}, 0.0, failure, split, []), "the result")


def _run_here(
    fn_data: bytes, payload: bytes, loaded: Callable[[], None], levels: LogLevels | None
) -> bytes:
    """The pickled tuple ``(values, raised, unsendable, elapsed, failure, split, records)``.

    ``raised`` maps an item's index in the run to the (wrapped) exception it
    raised, ``unsendable`` to the SerializationError of a result that cannot
    be pickled, and ``failure`` is an exception for every item of the run when
    they could not run at all; ``split``: the items could not be unpickled
    together, so run them one by one; ``records``: what the task logged.
    Nothing escapes as a Dask task error, so a Dask-level error means the
    worker or the cluster failed, not the function.
    """
    try:
        fn = _load_function(fn_data)
    except Exception as exc:
        failure: BaseException = SerializationError(
            f"the function could not be unpickled in the Dask worker: {exc!r}"
        )
        return _failed(wrap_exception(failure), False)
    try:
        star, kwargs, items = loads(payload, "the arguments")
    except SerializationError as exc:
        return _failed(wrap_exception(exc), True)
    loaded()
    inside = _scope.in_task.set(True)  # nested calls run here, in this task
    try:
        with collected(fn, levels) as records:
            values, errors, elapsed, _ = run_items(
                fn, items, 0, len(items), 0, star=star, kwargs=kwargs
            )
    except BaseException as exc:  # SystemExit and the like: must not end the caller
        failure = RemoteError(
            f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
            str(exc),
            format_user_traceback(exc),
            "it is a BaseException that ends a task rather than standing in for its result",
        )
        return _failed(failure, False)
    finally:
        _scope.in_task.reset(inside)
    raised = {i: wrap_exception(e) for i, e in errors.items()}
    try:
        return dumps((values, raised, {}, elapsed, None, False, records), "the result")
    except SerializationError:
        pass
    # Some result cannot be pickled: find which, and fail those items alone.
    unsendable = {}
    for i, value in enumerate(values):
        if i in raised:
            continue
        try:
            dumps(value, "the result")
        except SerializationError as err:
            values[i] = None
            unsendable[i] = wrap_exception(err)
    return dumps((values, raised, unsendable, elapsed, None, False, records), "the result")


_plugin_class: type | None = None


def initializer_plugin(data: bytes) -> Any:
    """A Dask WorkerPlugin that runs a pickled ``(initializer, initargs)``.

    The class is made on first use (so that importing this module does not
    import distributed) and pickles as a call of this function.
    """
    global _plugin_class
    if _plugin_class is None:
        from distributed import WorkerPlugin  # type: ignore[import-not-found, unused-ignore]

        class InitializerPlugin(WorkerPlugin):  # type: ignore[misc, unused-ignore]
            def __init__(self, data: bytes) -> None:
                self.data = data

            def setup(self, worker: Any) -> None:
                initializer, initargs = loads(self.data, "the initializer")
                initializer(*initargs)

            def __reduce__(self) -> tuple[Any, ...]:
                return (initializer_plugin, (self.data,))

        _plugin_class = InitializerPlugin
    return _plugin_class(data)
