"""A worker's logs and prints, sent to the parent as they happen.

``install(send)`` runs once in each worker process, before its initializer:

* a handler on the root logger sends each record as a ``Log`` message (its
  message formatted, a traceback as text, plus ``parfn_pid`` and
  ``parfn_function``); the parent hands it to its logger of the same name.
  Handlers inherited from a forked parent are taken off, so that the parent's
  configuration alone decides what is shown. Which records are made at all
  follows the parent's levels (``set_levels``, from ``LogLevels``): until the
  first of those arrives, every record is sent (the parent drops what it does
  not want), so an initializer's records reach the parent too;
* ``sys.stdout`` and ``sys.stderr`` become text streams whose writes go out
  as ``Output`` messages: complete lines as soon as they are written, a
  partial line when the stream is flushed (``print(..., flush=True)``, and at
  the end of every batch, ``end_of_batch``). The parent writes out whole lines;
* faulthandler is enabled into a file the parent reads if the worker dies
  (``shm.fault_path``): a segfault's tracebacks go into the crash report.

``send`` writes one framed message synchronously, under the same lock as the
worker's results. So what a task logged or printed reaches the pipe before
its result does, and before a crash that follows; a flood of records slows
the task to the pace at which the parent writes them out (the pipe holds a
bounded amount), and nothing piles up in memory. Output written to file
descriptors 1 and 2 by C code or by child processes does not pass through
here: it goes where the worker's descriptors point (inherited from the parent).

A process forked by a task (``os.fork``) stops forwarding: its streams and
logging are the worker's originals again, and it never writes to the pipe.

Where a worker runs other people's tasks too (a Dask worker), ``collected``
gathers instead the records one task's thread logs while it runs, to travel
back with its result.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import sys
import threading
from collections.abc import Callable, Iterator

from .._typing import Any
from .protocol import Log, LogLevels, Output, encode

__all__ = (
    "collected",
    "end_of_batch",
    "install",
    "portable",
    "running",
    "set_levels",
)

MAX_PARTIAL = 1 << 16
"""A partial line longer than this (no newline yet) is sent as it is."""

_send: Callable[[bytes], None] | None = None
_pid = 0
_function: Any = None
_originals: list[Any] = []
"""What ``install`` replaced: kept alive, since a handler or stream inherited by
fork may hold a buffer of the parent's unwritten data, which collecting it
would write a second time."""
_streams: tuple[Any, Any, Any, Any] | None = None
"""(original stdout, original stderr, ours, ours): put back in a forked child."""
_levels_set: set[str] = set()


def install(send: Callable[[bytes], None], fault_file: str | None = None) -> None:
    """Forward this process's logging and ``sys.stdout``/``sys.stderr`` through ``send``.

    ``send(frame)`` writes one encoded message to the parent, or raises
    OSError when the parent is gone. ``fault_file``: where faulthandler
    writes (None: leave faulthandler alone).
    """
    global _send, _pid, _streams
    _send = send
    _pid = os.getpid()
    _take_over_logging()
    out, err = _stream(1, sys.stdout), _stream(2, sys.stderr)
    _streams = (sys.stdout, sys.stderr, out, err)
    sys.stdout, sys.stderr = out, err
    if fault_file is not None:
        _enable_faulthandler(fault_file)
    os.register_at_fork(after_in_child=_forked)


def running(fn: Any) -> None:
    """Records logged from now on name ``fn`` as their ``parfn_function``."""
    global _function
    _function = fn


def end_of_batch() -> None:
    """Send what the task wrote and has not sent yet (a partial line included)."""
    global _written
    out, err = sys.stdout, sys.stderr
    if not _written and type(out) is _Stream and type(err) is _Stream:
        return  # the common case: nothing was printed
    _written = False
    for stream in (out, err):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # a stream the task put there, broken: not ours to report
            pass


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


# -- logging ------------------------------------------------------------------------------


class _Forward(logging.Handler):
    """Sends every record it handles to the parent."""

    def emit(self, record: logging.LogRecord) -> None:
        send = _send
        if send is None or os.getpid() != _pid:
            return
        try:
            frame = _encode(record)
        except Exception:
            self.handleError(record)
            return
        _post(send, frame)


def _take_over_logging() -> None:
    """The root logger forwards; what a forked worker inherited is taken off."""
    loggers: list[logging.Logger] = [logging.root]
    loggers += [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        if logger.handlers:
            _originals.extend(logger.handlers)
            logger.handlers = []
        # Records must reach the root's handler; the parent's logger of the
        # same name decides whether they propagate there.
        logger.propagate = True
    logging.root.addHandler(_Forward())
    logging.root.setLevel(logging.NOTSET)  # until the parent's levels arrive


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


def _encode(record: logging.LogRecord) -> bytes:
    fields = portable(record, _pid, _function)
    if fields.get("processName") == "MainProcess":
        # A worker forked by the pool's zygote, where multiprocessing is not
        # loaded (logging's default) or names the process it was copied from.
        fields["processName"] = "parfn-worker"
    try:
        return encode(Log(fields))
    except Exception:
        return encode(Log(_picklable(fields)))


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


# -- sys.stdout and sys.stderr -----------------------------------------------------------------


class _Lines(io.BufferedIOBase):
    """The binary side of a forwarded stream: complete lines go at once, the
    rest on ``flush``. ``fileno`` is the descriptor the stream replaced, for
    code that hands it to a child process."""

    def __init__(self, stream: int, fd: int) -> None:
        super().__init__()
        self._stream = stream
        self._fd = fd
        self.name = "<stdout>" if stream == 1 else "<stderr>"
        self._pending = bytearray()
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd

    def write(self, data: Any) -> int:
        n = len(data)
        with self._lock:
            pending = self._pending
            pending += data
            if len(pending) > MAX_PARTIAL:
                cut = len(pending)
            else:
                cut = pending.rfind(b"\n", len(pending) - n) + 1
                if not cut:
                    return n
            chunk = bytes(pending[:cut])
            del pending[:cut]
        self._send(chunk)
        return n

    def flush(self) -> None:
        with self._lock:
            if not self._pending:
                return
            chunk = bytes(self._pending)
            self._pending.clear()
        self._send(chunk)

    def _send(self, chunk: bytes) -> None:
        send = _send
        if send is None or os.getpid() != _pid:
            return
        _post(send, encode(Output(self._stream, chunk.decode("utf-8", "replace"))))


class _Stream(io.TextIOWrapper):
    """A worker's ``sys.stdout`` or ``sys.stderr``: notes that it was written
    to, so that the end of a batch that printed nothing costs nothing."""

    def write(self, s: str) -> int:
        global _written
        _written = True
        return super().write(s)


_written = False
"""Something was written to the worker's streams since the last ``end_of_batch``."""


def _stream(number: int, original: Any) -> _Stream:
    try:
        fd = original.fileno()
    except Exception:  # not backed by a descriptor: the process's own
        fd = number
    return _Stream(
        _Lines(number, fd),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )


def _post(send: Callable[[bytes], None], frame: bytes) -> None:
    global _send
    try:
        send(frame)
    except OSError:
        _send = None  # the parent closed its end: nobody to tell any more


# -- crashes and forks --------------------------------------------------------------------------


def _enable_faulthandler(path: str) -> None:
    import faulthandler

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    file = os.fdopen(fd, "w")
    _originals.append(file)  # faulthandler keeps only its descriptor
    faulthandler.enable(file=file, all_threads=False)  # the thread that crashed


def _forked() -> None:
    """In a child a task forked: the worker's own streams and handlers again."""
    global _send
    _send = None
    if _streams is not None:
        if sys.stdout is _streams[2]:
            sys.stdout = _streams[0]
        if sys.stderr is _streams[3]:
            sys.stderr = _streams[1]
    for handler in list(logging.root.handlers):
        if isinstance(handler, _Forward):
            logging.root.removeHandler(handler)
