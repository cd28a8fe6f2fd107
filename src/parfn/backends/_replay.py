"""The parent's side of forwarding: a worker's records and output, shown here.

* ``replay(fields)``: a record logged in a worker goes to this process's
  logger of the same name, if that logger is enabled for its level: its
  handlers, format and level decide what is shown, as if the call had run here.
* ``WorkerOutput``: what one worker wrote to its ``sys.stdout``/``sys.stderr``,
  written to this process's ``sys.stdout``/``sys.stderr`` as they are at that
  moment (a ``contextlib.redirect_stdout`` or a notebook cell sees it), in
  whole lines: a partial line waits for its end, or for the end of the task
  (then it is ended with a newline). One lock serialises the writes of every
  worker, so lines never mix. The last lines written to stderr are kept for a
  crash report.
* ``wanted_levels()``: the levels set on this process's loggers, for the
  workers' loggers to match (they then make only the records wanted here).

These run on the thread that reads a worker's pipe (the manager thread, or a
caller waiting for a borrowed worker), before the results that follow in the
pipe are delivered: what a task logged or printed shows before its result.

``logging`` is not imported here until a worker sends a record (it costs ~2 ms
of a program's start): until this process imports it, its loggers are
logging's defaults.
"""

from __future__ import annotations

import sys
import threading
from collections import deque

from .._typing import Any
from .._wire.protocol import LogLevels, encode

__all__ = (
    "DEFAULT_LEVELS",
    "TAIL_LINES",
    "WorkerOutput",
    "replay",
    "wanted_levels",
    "write_out",
)

TAIL_LINES = 10
"""How many of a worker's last stderr lines a crash report shows."""
FAULT_LINES = 40
"""How many lines of a crash's tracebacks (faulthandler's dump) it shows."""
MAX_PARTIAL = 1 << 16
"""A partial line longer than this is written out without waiting for its end."""


def replay(fields: dict[str, Any]) -> None:
    """Handle a worker's record with this process's logger of the same name."""
    import logging

    try:
        name = fields.get("name")
        logger = logging.root if name in (None, "root") else logging.getLogger(name)
        if not logger.isEnabledFor(fields.get("levelno", logging.NOTSET)):
            return
        record = logging.makeLogRecord(fields)
        start = getattr(logging, "_startTime", None)
        if start is not None:  # relative to this process's start, as its own records
            record.relativeCreated = (record.created - start) * 1000
        logger.handle(record)
    except Exception:  # a user's filter that raised: logging's own report, not a dead reader
        import traceback

        traceback.print_exc()


class WorkerOutput:
    """One worker's stdout and stderr, assembled into whole lines."""

    __slots__ = ("fault", "levels", "partial", "tail")

    def __init__(self) -> None:
        self.partial: dict[int, str] = {}  # by stream (1 stdout, 2 stderr): a line's start
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.fault = ""  # what faulthandler wrote as it crashed
        self.levels: Any = None  # the LogLevels the worker was last sent

    def write(self, stream: int, text: str) -> None:
        """Text the worker wrote: its complete lines are written out now."""
        if stream not in (1, 2):
            return
        partial = self.partial
        if partial:
            text = partial.pop(stream, "") + text
        cut = text.rfind("\n") + 1
        if not cut and len(text) <= MAX_PARTIAL:
            partial[stream] = text
            return
        if not cut:
            cut = len(text)
        if cut < len(text):
            partial[stream] = text[cut:]
        lines = text[:cut]
        if stream == 2:
            self.tail.extend(lines.splitlines())
        write_out(stream, lines)

    def end_task(self) -> None:
        """The task ended (or the worker died): a partial line is written as a line."""
        for stream in list(self.partial):
            self.write(stream, "\n")

    def add_fault(self, text: str) -> None:
        """A crash's tracebacks (faulthandler's dump): shown on stderr, as the
        worker would have shown them, and kept for the report."""
        self.end_task()
        text = text.strip("\n")
        if text:
            write_out(2, text + "\n")
            lines = text.splitlines()
            if len(lines) > FAULT_LINES:
                lines = [*lines[:FAULT_LINES], f"... ({len(lines) - FAULT_LINES} more lines)"]
            self.fault = "\n".join(lines)

    def last_lines(self) -> str:
        """The worker's last lines on stderr, then a crash's tracebacks."""
        return "\n".join([*self.tail, self.fault] if self.fault else self.tail)


def write_out(stream: int, text: str) -> None:
    """Write ``text`` to this process's current ``sys.stdout`` (1) or ``sys.stderr`` (2)."""
    with _lock:
        target = sys.stdout if stream == 1 else sys.stderr
        if target is None:
            return
        try:
            target.write(text)
        except UnicodeEncodeError:
            encoding = getattr(target, "encoding", None) or "ascii"
            try:
                target.write(text.encode(encoding, "backslashreplace").decode(encoding))
            except Exception:
                return
        except Exception:  # closed, or a broken replacement: nowhere to show it
            return
        try:
            target.flush()
        except Exception:
            pass


_lock = threading.Lock()

# -- the levels the workers' loggers take -----------------------------------------------------

_KEY = "parfn.levels"
"""Where the current levels are kept in the root logger's cache of
``isEnabledFor`` answers: every ``setLevel`` and ``logging.disable`` clears
that cache, so they are worked out again only after a change."""


class Levels:
    """The ``LogLevels`` message of the current levels, and its encoding."""

    __slots__ = ("frame", "message")

    def __init__(self, message: LogLevels) -> None:
        self.message = message
        self.frame = encode(message)


DEFAULT_LEVELS = Levels(LogLevels({"": 30}, 0))
"""The levels of a process that has not imported ``logging``: its defaults
(the root logger at WARNING, nothing disabled)."""

_root_cache: Any = None  # the root logger's, cleared in place, never replaced


def wanted_levels() -> Levels:
    """The levels set on this process's loggers now (the same object until they change)."""
    global _root_cache
    logging = sys.modules.get("logging")
    if logging is None or getattr(logging.__spec__, "_initializing", False):
        return DEFAULT_LEVELS  # not loaded, or being loaded by another thread
    cache = _root_cache
    if cache is None:
        cache = _root_cache = getattr(logging.root, "_cache", None)
    if cache is not None:
        levels = cache.get(_KEY)
        if levels is not None:
            return levels  # type: ignore[no-any-return]
    found = {"": logging.root.level}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level:
            found[name] = logger.level
    levels = Levels(LogLevels(found, logging.root.manager.disable))
    if cache is not None:
        cache[_KEY] = levels
    return levels
