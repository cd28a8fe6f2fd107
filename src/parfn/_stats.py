"""``pool.stats()``: what a pool has done, as a cheap snapshot.

The front end counts every task (one map item is one task) as it is
submitted and as its outcome is handed over: for a single call, a step of a
counter and three values appended to a deque, added up when a snapshot is
taken (under a microsecond, and nothing kept that the garbage collector
follows); for a map, a few additions under a lock per chunk. The backend adds what only it knows
(``backends._base.Counts``): how many items are running right now, its
workers, and the crashes, timeouts and retries it saw. ``queued`` is what
remains, so that at any moment::

    done + failed + cancelled + running + queued == submitted
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Mapping

from ._typing import TYPE_CHECKING, Any, NamedTuple
from ._wire.errors import is_cancelled

if TYPE_CHECKING:
    from .backends._base import Counts

__all__ = ("CANCELLED", "DONE", "FAILED", "FunctionStats", "PoolStats", "Tally")


class FunctionStats(NamedTuple):
    """What one function's tasks did, in :attr:`PoolStats.by_function`.

    ``calls``: its tasks that ran to an outcome (a value or an exception);
    ``failures``: those that ended with an exception (a crash or a timeout
    included); ``total_seconds``: the time they ran, in the workers;
    ``max_seconds``: the longest one (for items of a ``map`` run together as
    one chunk, each counts as the chunk's average).

    >>> import parfn
    >>> with parfn.Pool(1, backend="serial") as pool:
    ...     _ = pool.map(abs, [-1, -2], return_exceptions=True)
    ...     _ = pool.map(abs, ["x"], return_exceptions=True)  # TypeError
    >>> calls, failures, total, longest = pool.stats().by_function["abs"]
    >>> calls, failures, longest <= total
    (3, 1, True)
    """

    calls: int
    failures: int
    total_seconds: float
    max_seconds: float


class PoolStats(NamedTuple):
    """A snapshot of a pool's tasks and workers: ``pool.stats()``.

    >>> import parfn
    >>> with parfn.Pool(2, backend="thread") as pool:
    ...     _ = pool.map(abs, [-1, -2, -3])
    ...     stats = pool.stats()
    >>> stats.submitted, stats.done, stats.failed, stats.queued
    (3, 3, 0, 0)
    >>> stats.by_function["abs"].calls
    3

    Tasks (one item of a ``map`` is one task), at any moment
    ``done + failed + cancelled + running + queued == submitted``:

    * ``submitted``: tasks handed to the pool;
    * ``running``: being run right now (at most one per worker);
    * ``queued``: submitted, neither running nor finished (waiting in the
      pool, or already sent to a worker, behind another);
    * ``done``: finished with a value; ``failed``: with an exception (a crash
      or a timeout included); ``cancelled``: cancelled before they finished.

    What happened along the way: ``retried`` (runs again of a task that
    raised, crashed or timed out, with ``retries``), ``timed_out`` (runs that
    went past their ``timeout``), ``crashed`` (runs whose worker process died
    under them). The workers: ``workers`` (how many now) and ``restarts``
    (workers replaced: crashed, timed out, recycled by
    ``max_tasks_per_worker``). ``by_function`` maps each function's qualified
    name to its :class:`FunctionStats`.
    """

    submitted: int
    running: int
    queued: int
    done: int
    failed: int
    cancelled: int
    retried: int
    timed_out: int
    crashed: int
    workers: int
    restarts: int
    by_function: Mapping[str, FunctionStats]


DONE, FAILED, CANCELLED = 0, 1, 2
"""How a single call ended, for ``Tally.task``."""
_FOLD = 3 * 1024
"""Events kept before they are added up (a snapshot adds them up at once)."""


class Tally:
    """The front end's counts for one pool; every method may be called from any thread.

    A task's outcome is counted once, when it is handed over: ``task``
    (a single call, through its sink, or when its Task is cancelled) or
    ``items`` (a delivery of map items). ``drop`` counts the items of a map
    chunk that will never be delivered (the map was abandoned or cancelled).

    Single calls, the hot path, take no lock: a submission steps a counter,
    an outcome extends a deque (both atomic); the outcomes are added up under
    the lock by the next snapshot, or when the deque gets long. A snapshot
    adds the outcomes up before it reads the counter, and a call is submitted
    before its outcome: it never counts an outcome without its task.
    """

    __slots__ = (
        "_calls",
        "_events",
        "_functions",
        "_lock",
        "_withdrawn",
        "cancelled",
        "done",
        "failed",
        "submitted",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the totals and the adding up
        self._events: deque[Any] = deque()  # name, outcome, seconds, name, ... (see task)
        # Single calls submitted and withdrawn: next() on a count is atomic and
        # allocates nothing; read by _drawn. Map items are added to ``submitted``.
        self._calls = itertools.count()
        self._withdrawn = itertools.count()
        self.submitted = self.done = self.failed = self.cancelled = 0
        self._functions: dict[str, list[Any]] = {}  # name -> [calls, failures, total, max]

    def submit(self, n: int) -> None:
        """``n`` tasks were submitted: a single call (1) or a map's items."""
        if n == 1:
            next(self._calls)
        else:
            with self._lock:
                self.submitted += n

    def withdraw(self, owner: Any) -> None:
        """A single call's submission failed: it does not count (and never will)."""
        try:
            owner.token.pop()  # atomic: whoever takes the token counts the call
        except IndexError:
            return
        next(self._withdrawn)

    def task(self, owner: Any, name: str, outcome: int, elapsed: float) -> None:
        """A single call's ``outcome`` (``owner``: its sink, whose ``token``
        holds one item until the call is counted).

        The three values go into the deque in one ``extend`` (atomic): they
        are objects the garbage collector does not track, where a tuple kept
        until the next adding up would be (measured: spawn was slower with
        tuples, the collector's older generations growing with them).
        """
        try:
            owner.token.pop()  # atomic: whoever takes the token counts the call
        except IndexError:
            return
        events = self._events
        events.extend((name, outcome, elapsed))
        if len(events) > _FOLD:
            self._fold()

    def call(self, owner: Any, fn: Any, error: BaseException | None, elapsed: float) -> int:
        """A single call of ``fn`` ended: done (``error`` None), cancelled (a
        ``CancelledError``) or failed. Counts it as ``task`` does; returns which."""
        outcome = DONE if error is None else CANCELLED if is_cancelled(error) else FAILED
        self.task(owner, getattr(fn, "__qualname__", None) or repr(fn), outcome, elapsed)
        return outcome

    def _fold(self) -> None:
        with self._lock:
            self._add_up()

    def _add_up(self) -> None:
        """Add the events up. Caller holds ``_lock``."""
        events, functions, popleft = self._events, self._functions, self._events.popleft
        counts = [0, 0, 0]  # by outcome: done, failed, cancelled
        last_name: str | None = None
        entry: Any = None
        for _ in range(len(events) // 3):  # those there now; later ones wait for the next time
            name, outcome, elapsed = popleft(), popleft(), popleft()
            counts[outcome] += 1
            if outcome == CANCELLED:
                continue
            if name != last_name:  # runs of one function's calls are the common case
                entry = functions.get(name)
                if entry is None:
                    entry = functions[name] = [0, 0, 0.0, 0.0]
                last_name = name
            entry[0] += 1
            entry[2] += elapsed
            if elapsed > entry[3]:
                entry[3] = elapsed
            if outcome == FAILED:
                entry[1] += 1
        self.done += counts[DONE]
        self.failed += counts[FAILED]
        self.cancelled += counts[CANCELLED]

    def items(
        self, owner: Any, name: str, n: int, errors: dict[int, BaseException], elapsed: float
    ) -> None:
        """``n`` items of a map chunk were delivered (``owner``: the chunk,
        whose ``unsettled`` count they come off)."""
        with self._lock:
            if owner.unsettled <= 0:
                return  # dropped already
            owner.unsettled -= n
            cancelled = 0
            if errors:
                for error in errors.values():
                    if is_cancelled(error):
                        cancelled += 1
                self.cancelled += cancelled
                self.failed += len(errors) - cancelled
            self.done += n - len(errors)
            ran = n - cancelled
            if not ran:
                return
            entry = self._functions.get(name)
            if entry is None:
                entry = self._functions[name] = [0, 0, 0.0, 0.0]
            entry[0] += ran
            entry[1] += len(errors) - cancelled
            entry[2] += elapsed
            if elapsed / n > entry[3]:
                entry[3] = elapsed / n

    def withdraw_items(self, owner: Any) -> None:
        """A map chunk's submission failed: its items do not count."""
        with self._lock:
            self.submitted -= max(0, owner.unsettled)
            owner.unsettled = 0

    def drop(self, owner: Any) -> None:
        """The items of map chunk ``owner`` not delivered yet never will be: cancelled."""
        with self._lock:
            if owner.unsettled > 0:
                self.cancelled += owner.unsettled
                owner.unsettled = 0

    def snapshot(self, counts: Counts) -> PoolStats:
        with self._lock:
            self._add_up()  # the outcomes first: each call's submission came before it
            submitted, done, failed, cancelled = (
                self.submitted + _drawn(self._calls) - _drawn(self._withdrawn),
                self.done,
                self.failed,
                self.cancelled,
            )
            functions = {name: FunctionStats(*entry) for name, entry in self._functions.items()}
        # The backend's count was taken a moment apart: an item it saw running
        # may have finished since.
        running = max(0, min(counts.running, submitted - done - failed - cancelled))
        return PoolStats(
            submitted=submitted,
            running=running,
            queued=submitted - done - failed - cancelled - running,
            done=done,
            failed=failed,
            cancelled=cancelled,
            retried=counts.retried,
            timed_out=counts.timed_out,
            crashed=counts.crashed,
            workers=counts.workers,
            restarts=counts.restarts,
            by_function=functions,
        )


def _drawn(count: itertools.count[int]) -> int:
    """How many numbers ``next()`` drew from ``count`` (from 0): its repr is ``count(n)``."""
    return int(repr(count)[6:-1])
