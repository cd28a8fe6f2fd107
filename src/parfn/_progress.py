"""Progress reporting for ``map``, ``starmap`` and ``imap*``.

The map engine calls :func:`open_progress` once, then ``update(n)`` from the caller's
thread as results arrive and ``close()`` once at the end (also on an error or Ctrl-C).

``progress=True`` gives a tqdm bar when tqdm is installed (``pip install 'parfn[progress]'``)
and otherwise :class:`TextBar`, a one-line bar written to stderr:

* on a terminal it redraws in place with ``'\\r'`` at most every ``interval`` seconds
  (0.2 s: five times a second), showing the description, done/total, the percentage and a
  bar when the total is known, the rate and the ETA; ``close()`` draws the final state and
  ends the line;
* when stderr is not a terminal (a log file, a pipe, CI) it writes nothing while running
  and one summary line at ``close()``, e.g. ``square: 1000/1000 done in 1.2 s (830/s)``,
  or ``square: 400/1000 stopped after 0.5 s (800/s)`` when the map ended early.

``progress=`` may also be a tqdm-like object (anything with ``update(n)``): parfn calls
its ``update`` and sets its ``total`` if that is ``None``, but never closes it, since the
caller owns it. tqdm is imported only when a bar is asked for, never by ``import parfn``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
import time
from collections.abc import Callable

from ._typing import Any, Protocol, TextIO, cast

__all__ = ("Progress", "TextBar", "open_progress")


class Progress(Protocol):
    """What the map engine drives: ``update(n)`` as results arrive, ``close()`` once."""

    def update(self, n: int = 1) -> None:
        """Record ``n`` more finished items."""

    def close(self) -> None:
        """Finish the display (called once, also when the map fails)."""


def open_progress(progress: bool | object, total: int | None, desc: str) -> Progress | None:
    """Return the progress display asked for by a ``progress=`` argument.

    ``False`` (or ``None``) gives ``None``: no display. ``True`` gives a tqdm bar on stderr
    when tqdm can be imported, else a :class:`TextBar` on stderr. Any object with an
    ``update`` method is used as a tqdm-like bar that the caller owns: it receives the
    updates, its ``total`` is filled in when it is ``None`` and ``total`` is known, and it
    is not closed. Anything else raises :class:`TypeError`.

    >>> open_progress(False, 10, "square") is None
    True
    """
    if progress is False or progress is None:
        return None
    if progress is True:
        bar_class = _tqdm_class()
        if bar_class is None:
            return TextBar(total, desc, stream=sys.stderr)
        bar: Progress = bar_class(total=total, desc=desc or None, file=sys.stderr)
        return bar
    if isinstance(progress, type):
        raise TypeError(
            f"progress= takes True, False or a tqdm-like object, not the class "
            f"{progress.__name__}; pass an instance such as {progress.__name__}(), or True"
        )
    if callable(getattr(progress, "update", None)):
        return _Borrowed(progress, total)
    raise TypeError(
        "progress= takes True, False or a tqdm-like object with an update(n) method, "
        f"not {type(progress).__name__} {progress!r:.60}"
    )


def _tqdm_class() -> Callable[..., Progress] | None:
    """tqdm's auto class (a notebook widget in Jupyter, text elsewhere), or None."""
    try:
        module = importlib.import_module("tqdm.auto")
    except ImportError:
        return None
    cls: Callable[..., Progress] = module.tqdm
    return cls


class _Borrowed:
    """A caller's tqdm-like object: forward updates, never close it (the caller owns it)."""

    __slots__ = ("_target",)

    def __init__(self, target: object, total: int | None) -> None:
        self._target = cast(Progress, target)
        if total is not None and getattr(target, "total", 0) is None:
            # a read-only total is left alone: the object keeps counting without one
            with contextlib.suppress(AttributeError, TypeError):
                cast(Any, target).total = total

    def update(self, n: int = 1) -> None:
        """Forward to the caller's object."""
        self._target.update(n)

    def close(self) -> None:
        """Do nothing: the caller closes its own bar."""


class TextBar:
    """The built-in one-line progress bar (used when tqdm is not installed).

    ``stream`` is written to (``None``: nothing is written); ``clock`` returns seconds
    (``time.monotonic`` by default, injectable for tests); ``interval`` is the shortest time
    between two redraws on a terminal. ``update`` costs an addition and a clock read when no
    redraw is due, and only the addition when the stream is not a terminal.

    >>> import io
    >>> bar = TextBar(3, "square", stream=io.StringIO())
    >>> bar.update(3)
    >>> bar.close()
    >>> bar.count
    3
    """

    __slots__ = (
        "_clock",
        "_closed",
        "_desc",
        "_due",
        "_interval",
        "_last_len",
        "_live",
        "_n",
        "_start",
        "_stream",
        "_total",
        "_width",
    )

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        *,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.2,
    ) -> None:
        self._total = total if total is None else max(0, total)
        self._desc = desc
        self._stream = stream
        self._clock = clock
        self._interval = interval
        self._n = 0
        self._closed = False
        self._last_len = 0
        self._live = stream is not None and _isatty(stream)
        self._width = _terminal_width(stream) if stream is not None and self._live else 80
        self._start = clock()
        self._due = self._start
        if self._live:
            self._redraw(self._start)

    @property
    def count(self) -> int:
        """How many items have been reported so far."""
        return self._n

    def update(self, n: int = 1) -> None:
        """Add ``n`` finished items; redraw if the last redraw is ``interval`` old."""
        self._n += n
        if self._live:
            now = self._clock()
            if now >= self._due:
                self._redraw(now)

    def close(self) -> None:
        """Draw the final state and end the line (or write the summary line); idempotent."""
        if self._closed:
            return
        self._closed = True
        now = self._clock()
        if self._live:
            self._redraw(now)
            self._live = False
            self._write("\n")
        elif self._stream is not None:
            self._write(self.summary(now) + "\n")

    def line(self, now: float) -> str:
        """The live line as it reads at time ``now`` (without ``'\\r'``)."""
        n, total = self._n, self._total
        elapsed = max(0.0, now - self._start)
        rate = n / elapsed if elapsed > 0 else None
        head = f"{self._desc}: " if self._desc else ""
        if total is None:
            text = f"{head}{n} [{_clock_text(elapsed)}, {_rate_text(rate)}]"
        else:
            frac = 1.0 if total == 0 else min(1.0, n / total)
            eta: float | None = None
            if n >= total:
                eta = 0.0
            elif rate:
                eta = (total - n) / rate
            tail = f" {n}/{total} [{_clock_text(elapsed)}<{_clock_text(eta)}, {_rate_text(rate)}]"
            pct = f"{head}{frac * 100:3.0f}%"
            room = self._width - 1 - len(pct) - len(tail) - 2
            bar = ""
            if room >= 5:
                size = min(room, 30)
                filled = int(frac * size)
                bar = "|" + "#" * filled + " " * (size - filled) + "|"
            text = pct + bar + tail
        return text[: self._width - 1]

    def summary(self, now: float) -> str:
        """The one line written at close when the stream is not a terminal."""
        n, total = self._n, self._total
        elapsed = max(0.0, now - self._start)
        rate = n / elapsed if elapsed > 0 else None
        head = f"{self._desc}: " if self._desc else ""
        count = f"{n}" if total is None else f"{n}/{total}"
        verb = "stopped after" if total is not None and n < total else "done in"
        rate_part = f" ({_rate_text(rate)})" if rate is not None else ""
        return f"{head}{count} {verb} {_seconds_text(elapsed)}{rate_part}"

    def _redraw(self, now: float) -> None:
        self._due = now + self._interval
        text = self.line(now)
        pad = " " * max(0, self._last_len - len(text))
        self._last_len = len(text)
        self._write("\r" + text + pad)

    def _write(self, text: str) -> None:
        stream = self._stream
        if stream is None:
            return
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not fail the map
            self._stream = None
            self._live = False


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def _terminal_width(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 80
    return max(20, columns) if columns > 0 else 80  # 0: a pseudo-terminal with no size


def _clock_text(seconds: float | None) -> str:
    """``mm:ss`` or ``h:mm:ss``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _seconds_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return _clock_text(seconds)


def _rate_text(rate: float | None) -> str:
    """Items per second, or seconds per item when slower than one a second."""
    if rate is None:
        return "?/s"
    if rate == 0:
        return "0/s"
    if rate < 1:
        return f"{1 / rate:.1f} s/item"
    if rate < 10:
        return f"{rate:.2f}/s"
    if rate < 100:
        return f"{rate:.1f}/s"
    return f"{rate:.0f}/s"
