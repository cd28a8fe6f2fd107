"""The small interface every backend implements, and the Job it runs.

A *Job* is one function applied to a run of argument tuples: a ``spawn`` is a
Job of one item, a chunk of a ``map`` is a Job of many. A backend runs Jobs and
reports each item's outcome to the Job's *Sink*; the front end (``parfn.Pool``
and the map engine) never sees processes, threads or clusters.

Contract for a backend, whatever runs the items:

* ``submit(job)`` returns at once. It may raise :class:`SerializationError`
  only for a one-item job whose arguments cannot be sent; for a many-item job a
  bad item's error is delivered in its place, and the other items run.
* Before an item of the job starts, the backend calls ``job.sink.start()``
  (at least once per job; more calls are harmless); if that returns False the
  job was cancelled and the backend drops it.
* Every item's outcome is delivered exactly once through ``job.sink.deliver``,
  in any grouping: a value, or an exception standing in its place.
* An item that raised is re-run up to ``options.retries`` more times before its
  exception is delivered; a backend that can detect crashes and timeouts
  retries those the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .._typing import Any, NamedTuple, Protocol

__all__ = (
    "Backend",
    "Counts",
    "Item",
    "Job",
    "Options",
    "Sink",
    "available_cpus",
    "fail_items",
)

Item = Any
"""One call's positional arguments: a tuple when ``job.star``, else the one argument."""


class Options:
    """Per-task options (docs/contract.md, section 4). Immutable.

    ``timeout``: seconds a single item may run, counted from its start.
    ``retries``: how many more times an item that raised, crashed or timed
    out is run.
    """

    __slots__ = ("retries", "timeout")

    timeout: float | None
    retries: int

    def __init__(self, timeout: float | None = None, retries: int = 0) -> None:
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
                raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
            if not timeout > 0:
                raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise TypeError(f"retries must be an int >= 0, not {retries!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries!r}")
        object.__setattr__(self, "timeout", timeout)
        object.__setattr__(self, "retries", retries)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Options are immutable; use .options(...) for a changed copy")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Options, (self.timeout, self.retries))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Options):
            return NotImplemented
        return (self.timeout, self.retries) == (other.timeout, other.retries)

    def __hash__(self) -> int:
        return hash((self.timeout, self.retries))

    def __repr__(self) -> str:
        return f"Options(timeout={self.timeout!r}, retries={self.retries!r})"


class Sink(Protocol):
    """Where a Job's outcomes go. Its methods may be called from any thread."""

    def start(self) -> bool:
        """Called before items of the job run (once or more); False: drop the job."""
        ...

    def deliver(
        self, lo: int, values: Sequence[Any], errors: dict[int, BaseException], elapsed: float
    ) -> None:
        """Outcomes of items ``lo .. lo + len(values) - 1`` (indexes into ``job.items``).

        ``errors`` maps an item index to the exception standing in its place
        (``values`` holds ``None`` there). ``elapsed`` is the seconds the items
        took to run, for chunk sizing; 0.0 if unknown. The sink may keep
        ``values``: the backend does not use it afterwards.
        """
        ...


class Job:
    """One function over a run of items, with options, reporting to a sink.

    Item ``i`` is the call ``fn(*items[i], **kwargs)`` when ``star``, else
    ``fn(items[i], **kwargs)``: a one-argument map sends the bare values, the
    cheapest thing to pickle. ``kwargs`` are shared by every item.
    """

    __slots__ = ("fn", "items", "kwargs", "options", "sink", "star")

    def __init__(
        self,
        fn: Callable[..., Any],
        items: Sequence[Item],
        options: Options,
        sink: Sink,
        *,
        star: bool = True,
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.fn = fn
        self.items = items
        self.options = options
        self.sink = sink
        self.star = star
        self.kwargs = kwargs or _NO_KWARGS

    def call_args(self, i: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Item ``i`` as ``(args, kwargs)``."""
        item = self.items[i]
        return (tuple(item) if self.star else (item,)), self.kwargs

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"<Job {name} x{len(self.items)}>"


_NO_KWARGS: dict[str, Any] = {}


class Counts(NamedTuple):
    """What a backend reports to ``pool.stats()``: what only it knows.

    ``running``: items being run right now; ``workers``: its workers now;
    ``restarts``: workers it replaced; ``crashed``, ``timed_out``: runs of
    an item that ended so; ``retried``: runs again of an item (``retries``).
    """

    running: int
    workers: int
    restarts: int = 0
    crashed: int = 0
    timed_out: int = 0
    retried: int = 0


class Backend(Protocol):
    """What ``parfn.Pool`` needs of an engine that runs Jobs."""

    name: str
    workers: int
    """How many items it runs at once; the map engine sizes its window by it."""
    can_stop_running: bool
    """True if a timeout or ``cancel()`` really stops a running item."""

    def submit(self, job: Job) -> None: ...

    def cancel(self, job: Job) -> bool:
        """Stop ``job``: its queued items never start (``sink.start()`` will also
        say False); its running items are stopped if ``can_stop_running``.
        Returns True if the job was stopped while running or queued here."""
        ...

    def shutdown(self, wait: bool, cancel_pending: bool, terminate: bool = False) -> None:
        """Stop: with ``wait``, after every job still to run has finished.

        ``cancel_pending``: the jobs not started yet are dropped (their sinks
        get ``CancelledError``); running ones finish. ``terminate``: running
        ones are ended too (their items get ``CancelledError``; a backend
        that cannot stop a running item lets it go on unobserved).
        Idempotent, except that a later call may cancel or terminate more."""
        ...

    def counts(self) -> Counts:
        """Its part of ``pool.stats()``, now: cheap, called from any thread."""
        ...


def fail_items(job: Job, lo: int, hi: int, error: Callable[[int], BaseException]) -> None:
    """Deliver ``error(i)`` for each item ``lo <= i < hi`` of ``job``."""
    if hi > lo:
        job.sink.deliver(lo, [None] * (hi - lo), {i: error(i) for i in range(lo, hi)}, 0.0)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity), not the machine's count."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1  # pragma: no cover - macOS, Windows
