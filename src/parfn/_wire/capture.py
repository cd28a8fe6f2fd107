"""A worker's logs and prints, sent to the parent as they happen.

``install(send)`` runs once in each worker process, before its initializer:

* its logging records go to the parent as ``Log`` messages (``logs``), and
  the parent hands each to its logger of the same name. If ``logging`` is
  not loaded yet (a program that never imports it does not pay ~2 ms per
  worker for it), that starts when a task, or the initializer, imports it:
  a meta path finder sees the import (``_WhenLoggingLoads``). The parent's
  levels (``set_levels``) wait for it too;
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
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from collections.abc import Callable

from .._typing import Any
from .protocol import LogLevels, Output, encode

__all__ = ("end_of_batch", "install", "running", "set_levels")

MAX_PARTIAL = 1 << 16
"""A partial line longer than this (no newline yet) is sent as it is."""

_send: Callable[[bytes], None] | None = None
_pid = 0
_function: Any = None
_originals: list[Any] = []
"""Kept alive: faulthandler's file (faulthandler keeps only its descriptor)."""
_streams: tuple[Any, Any, Any, Any] | None = None
"""(original stdout, original stderr, ours, ours): put back in a forked child."""


def install(send: Callable[[bytes], None], fault_file: str | None = None) -> None:
    """Forward this process's logging and ``sys.stdout``/``sys.stderr`` through ``send``.

    ``send(frame)`` writes one encoded message to the parent, or raises
    OSError when the parent is gone. ``fault_file``: where faulthandler
    writes (None: leave faulthandler alone).
    """
    global _send, _pid, _streams
    _send = send
    _pid = os.getpid()
    if "logging" in sys.modules:
        _take_over_logging()
    else:  # when a task imports it (a program that never does, never pays for it)
        sys.meta_path.insert(0, _hook)
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
    if _logs is None and "logging" in sys.modules:  # loaded past ``_WhenLoggingLoads``
        _take_over_logging()


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
    """Give this process's loggers the levels the parent's have (see ``LogLevels``);
    if ``logging`` is not loaded here, once it is."""
    global _pending_levels
    if _logs is None:
        _pending_levels = message
    else:
        _logs.set_levels(message)


# -- logging ------------------------------------------------------------------------------


def _take_over_logging() -> None:
    from . import logs

    global _logs
    if _logs is not None:
        return
    logs.take_over(_post_record, _pid, lambda: _function)
    _logs = logs
    if _pending_levels is not None:
        logs.set_levels(_pending_levels)


_logs: Any = None
"""``parfn._wire.logs`` once it forwards this process's logging."""
_pending_levels: LogLevels | None = None
"""The parent's levels, while ``logging`` is not loaded here."""


def _post_record(frame: bytes) -> None:
    send = _send
    if send is not None and os.getpid() == _pid:
        _post(send, frame)


class _WhenLoggingLoads:
    """A meta path finder that finds nothing itself: when ``logging`` is
    looked for, it has the finders after it find it, and the module, if it is
    then loaded, forwards its records once it has run (``_take_over_logging``).

    (A finder put before it that finds ``logging`` itself, or a loading that
    passes no finder, escapes it: ``running`` then takes over at the next task.)
    """

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "logging":
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = None if find is None else find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenTakeOver(spec.loader)
        return spec


class _ThenTakeOver:
    """``logging``'s loader, and then ``_take_over_logging``."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # as if never wrapped
        _unhook()
        self.loader.exec_module(module)
        if os.getpid() == _pid:
            _take_over_logging()


_hook = _WhenLoggingLoads()


def _unhook() -> None:
    with contextlib.suppress(ValueError):
        sys.meta_path.remove(_hook)


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
    _originals.append(file)
    faulthandler.enable(file=file, all_threads=False)  # the thread that crashed


def _forked() -> None:
    """In a child a task forked: the worker's own streams and handlers again
    (and, if it becomes a worker of a pool of its own, ``install`` anew)."""
    global _send, _logs, _pending_levels
    _send = None
    if _streams is not None:
        if sys.stdout is _streams[2]:
            sys.stdout = _streams[0]
        if sys.stderr is _streams[3]:
            sys.stderr = _streams[1]
    _unhook()
    if _logs is not None:
        _logs.forget()
    _logs = _pending_levels = None
