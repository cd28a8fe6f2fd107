"""A worker's logging, forwarded: its records made into messages for the parent.

``take_over(post, pid, function)`` puts a handler on the root logger that
turns each record into a ``Log`` message (its message formatted, a traceback
as text, plus ``parfn_pid`` and ``parfn_function``) and hands it to ``post``;
the parent hands it to its logger of the same name. Handlers inherited from a
forked parent are taken off, so that the parent's configuration alone decides
what is shown. Which records are made at all follows the parent's levels
(``set_levels``, from ``LogLevels``): until the first of those arrives, every
record is sent (the parent drops what it does not want), so an initializer's
records reach the parent too.

``capture`` calls ``take_over`` as the worker starts if ``logging`` is loaded
then, or else when the worker first imports it (see ``capture``): this module
imports ``logging``, which a worker need not pay for.

Where a worker runs other people's tasks too (a Dask worker), ``collected``
gathers instead the records one task's thread logs while it runs, to travel
back with its result.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
from collections.abc import Callable, Iterator

from .._typing import Any
from .protocol import Log, LogLevels, encode

__all__ = ("MAX_COLLECTED", "collected", "forget", "portable", "set_levels", "take_over")

_levels_set: set[str] = set()


def take_over(post: Callable[[bytes], None], pid: int, function: Callable[[], Any]) -> None:
    """The root logger forwards: each record, encoded, goes to ``post``.

    ``function()`` names the function running (``parfn_function``). The
    handlers a forked worker inherited are taken off (the new handler keeps
    them alive).
    """
    loggers: list[logging.Logger] = [logging.root]
    loggers += [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    kept: list[Any] = []
    for logger in loggers:
        if logger.handlers:
            kept.extend(logger.handlers)
            logger.handlers = []
        # Records must reach the root's handler; the parent's logger of the
        # same name decides whether they propagate there.
        logger.propagate = True
    logging.root.addHandler(_Forward(post, pid, function, kept))
    logging.root.setLevel(logging.NOTSET)  # until the parent's levels arrive


def set_levels(message: LogLevels) -> None:
    """Give this process's loggers the levels the parent's have (see ``LogLevels``)."""
    levels = message.levels
    for name in _levels_set - levels.keys():
        logging.getLogger(name).setLevel(logging.NOTSET)
    for name, level in levels.items():
        (logging.getLogger(name) if name else logging.root).setLevel(level)
    _levels_set.clear()
    _levels_set.update(name for name in levels if name)
    logging.disable(message.disable)


def forget() -> None:
    """Stop forwarding (in a child a task forked)."""
    for handler in list(logging.root.handlers):
        if isinstance(handler, _Forward):
            logging.root.removeHandler(handler)


class _Forward(logging.Handler):
    """Sends every record it handles to the parent."""

    def __init__(
        self, post: Callable[[bytes], None], pid: int, function: Callable[[], Any], kept: Any
    ) -> None:
        super().__init__()
        self.post = post
        self.pid = pid
        self.function = function
        # What it replaced: kept alive, since a handler inherited by fork may
        # hold a buffer of the parent's unwritten data, which collecting it
        # would write a second time.
        self.kept = kept

    def emit(self, record: logging.LogRecord) -> None:
        if os.getpid() != self.pid:
            return
        try:
            frame = _encode(record, self.pid, self.function())
        except Exception:
            self.handleError(record)
            return
        self.post(frame)


_formatter = logging.Formatter()


def portable(record: logging.LogRecord, pid: int, fn: Any) -> dict[str, Any]:
    """``record``'s attributes, ready to travel: its message formatted (its
    arguments need not pickle), a traceback as text, ``parfn_pid`` and
    ``parfn_function`` added."""
    fields = record.__dict__.copy()
    fields["msg"] = record.getMessage()
    fields["args"] = None
    fields.pop("message", None)
    if record.exc_info:
        if not record.exc_text:
            fields["exc_text"] = _formatter.formatException(record.exc_info)
        fields["exc_info"] = None
    fields["parfn_pid"] = pid
    fields["parfn_function"] = None if fn is None else getattr(fn, "__qualname__", repr(fn))
    return fields


def _picklable(fields: dict[str, Any]) -> dict[str, Any]:
    """An attribute passed in ``extra`` that cannot travel goes as its repr."""
    for key, value in fields.items():
        try:
            pickle.dumps(value)
        except Exception:
            fields[key] = repr(value)
    return fields


def _encode(record: logging.LogRecord, pid: int, fn: Any) -> bytes:
    fields = portable(record, pid, fn)
    if fields.get("processName") == "MainProcess":
        # A worker forked by the pool's zygote, where multiprocessing is not
        # loaded (logging's default) or names the process it was copied from.
        fields["processName"] = "parfn-worker"
    try:
        return encode(Log(fields))
    except Exception:
        return encode(Log(_picklable(fields)))


# -- a Dask worker's: the records of one task ------------------------------------------------

MAX_COLLECTED = 10_000
"""The most records ``collected`` keeps of one task; it counts the others."""


class _Collect(logging.Handler):
    """Keeps the records one thread logs, ready to travel."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.pid = os.getpid()
        self.fn = fn
        self.records: list[dict[str, Any]] = []
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        if len(self.records) >= MAX_COLLECTED:
            self.dropped += 1
            return
        try:
            fields = portable(record, self.pid, self.fn)
            pickle.dumps(fields)
        except Exception:
            fields = _picklable(fields)
        self.records.append(fields)


@contextlib.contextmanager
def collected(fn: Any, levels: LogLevels | None = None) -> Iterator[list[dict[str, Any]]]:
    """The records this thread logs inside the block (those its loggers make),
    as ``portable`` dicts; past ``MAX_COLLECTED``, a last one says how many
    more were dropped. ``levels``: the parent's, to take first (on a worker
    that runs only this pool's tasks)."""
    if levels is not None and levels != _applied[0]:
        set_levels(levels)
        _applied[0] = levels
    handler = _Collect(fn)
    logging.root.addHandler(handler)
    try:
        yield handler.records
    finally:
        logging.root.removeHandler(handler)
        if handler.dropped:
            note = logging.makeLogRecord(
                {
                    "name": "parfn",
                    "levelno": logging.WARNING,
                    "levelname": "WARNING",
                    "msg": f"{handler.dropped} more records of this task were dropped "
                    f"(a task sends at most {MAX_COLLECTED} with its result)",
                }
            )
            handler.records.append(portable(note, handler.pid, fn))


_applied: list[LogLevels | None] = [None]
