"""The map engine behind ``map``, ``starmap``, ``imap`` and ``imap_unordered``.

It pulls items from the input a bounded window ahead, groups them into
chunks (Jobs), submits them to the backend, and gives the outcomes back in
input order or as they complete. Every item keeps its own outcome, whatever
the chunk size: one failing, crashing or timed-out item fails alone.

Chunk size, when not given: the first chunks hold one item, to measure how
long an item takes; later chunks hold about ``TARGET_CHUNK_SECONDS`` of work,
and never more than a quarter of a worker's share of a known input, so the
work spreads evenly, nor more than about ``MAX_CHUNK_BYTES`` of input, so that
big items do not pile up in memory.
"""

from __future__ import annotations

import itertools
import math
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence

from ._stats import Tally
from ._typing import Any, TypeVar, cast
from ._wire.errors import PoolClosed, SerializationError, _Crashed, is_cancelled
from .backends._base import Backend, Item, Job, Options

__all__ = ("MapIterator", "MapRun")

R = TypeVar("R")

_END: Any = object()

TARGET_CHUNK_SECONDS = 0.02
WINDOW_ITEMS = 512
"""Small chunks (chunksize=1) may fill the window up to this many items."""
MAX_CHUNK_UNKNOWN_LENGTH = 4096
"""The largest chunk pulled from an input of unknown length (bounds memory)."""
MAX_CHUNK_BYTES = 8 << 20
"""A chunk holds about this much input at most, judged by the size of the
first item of each chunk (``sys.getsizeof`` or an array's ``nbytes``, one
level into a tuple): big items (arrays, bytes, strings) go a few per chunk,
whatever the function's speed."""


class _Chunk:
    """One chunk of a map: the Sink of its Job."""

    __slots__ = ("errors", "first", "job", "remaining", "run", "unsettled", "values")

    def __init__(self, run: MapRun, first: int, n: int) -> None:
        self.run = run
        self.first = first  # index of its first item in the whole input
        self.values: list[Any] = [None] * n
        self.errors: dict[int, BaseException] = {}
        self.remaining = n
        self.unsettled = n  # items not yet counted in pool.stats() (the tally's lock)
        self.job: Job | None = None

    def start(self) -> bool:
        if self.run.abandoned:
            self.run.tally.drop(self)  # the backend drops it: never delivered
            return False
        return True

    def deliver(
        self, lo: int, values: Sequence[Any], errors: dict[int, BaseException], elapsed: float
    ) -> None:
        run = self.run
        if errors:
            _locate(errors, self.first)
        run.tally.items(self, run.name, len(values), errors, elapsed)
        run.inbox.put((self, lo, values, errors, elapsed))


class MapRun:
    """One call of a map: iterate ``chunks()`` for its outcomes."""

    def __init__(
        self,
        backend: Backend,
        fn: Callable[..., Any],
        options: Options,
        items: Iterator[Item],
        star: bool,
        total: int | None,
        *,
        ordered: bool,
        chunksize: int | None,
        progress: object,
        desc: str,
        reopen: Callable[[], Backend | None] | None = None,
        tally: Tally | None = None,
    ) -> None:
        if chunksize is not None and (
            isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1
        ):
            raise ValueError(f"chunksize must be an int >= 1 or None, not {chunksize!r}")
        self.backend = backend
        # The default pool's: where to go on if ``parfn.shutdown()`` closes it mid-map.
        self.reopen = reopen
        self.fn = fn
        self.name: str = getattr(fn, "__qualname__", None) or repr(fn)
        self.tally = Tally() if tally is None else tally
        self.options = options
        self.items = items
        self.star = star
        self.total = total
        self.ordered = ordered
        self.chunksize = chunksize
        self.bar = None
        if progress is not False and progress is not None:
            from ._progress import open_progress  # (on first use: not on the cold path)

            self.bar = open_progress(progress, total, desc)
        self.inbox: queue.SimpleQueue[
            tuple[_Chunk, int, Sequence[Any], dict[int, BaseException], float]
        ] = queue.SimpleQueue()
        self.abandoned = False
        self.window = 2 * max(1, backend.workers)
        # A backend with a high cost per task (Dask: ~10 ms) asks for longer chunks.
        self.target = max(TARGET_CHUNK_SECONDS, getattr(backend, "chunk_seconds", 0.0))
        self.per_item: float | None = None
        self.item_bytes = 0  # the largest first item of a chunk so far, roughly
        self.pulled = 0
        self.held = 0  # items submitted and not yet given back
        self.exhausted = False

    def chunks(self) -> Generator[tuple[list[Any], dict[int, BaseException]], None, None]:
        """Outcomes as they can be given back: ``(values, errors)`` runs of items,
        in input order when ``ordered``; ``errors`` maps a position in
        ``values`` to the exception standing there."""
        outstanding: deque[_Chunk] = deque()  # submitted, not fully given back, in input order
        interrupted = False
        try:
            while True:
                while not self.exhausted and self._room(outstanding):
                    chunk = self._submit_next()
                    if chunk is not None:
                        outstanding.append(chunk)
                if not outstanding:
                    return
                chunk, lo, values, errors, elapsed = self.inbox.get()
                self._record(chunk, lo, values, errors, elapsed)
                if self.ordered:
                    while outstanding and outstanding[0].remaining == 0:
                        done = outstanding.popleft()
                        self.held -= len(done.values)
                        yield done.values, done.errors
                else:
                    self.held -= len(values)
                    yield list(values), {i - lo: e for i, e in errors.items()}
                    if chunk.remaining == 0:
                        outstanding.remove(chunk)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            self.abandoned = True
            if interrupted:
                for chunk in outstanding:
                    if chunk.job is not None and chunk.remaining:
                        self.backend.cancel(chunk.job)
                        self.tally.drop(chunk)
            if self.bar is not None:
                self.bar.close()

    def _room(self, outstanding: deque[_Chunk]) -> bool:
        """May another chunk go out? Two per worker, or more while they are
        small, up to ``WINDOW_ITEMS`` items (and ``MAX_CHUNK_BYTES``) not yet
        given back."""
        if self.chunksize is None and self.per_item is None:
            # Still measuring the function: one one-item chunk per worker.
            return len(outstanding) < max(1, self.backend.workers)
        if len(outstanding) < self.window:
            return True
        return self.held < WINDOW_ITEMS and self.held * self.item_bytes < MAX_CHUNK_BYTES

    def _submit_next(self) -> _Chunk | None:
        size = self._next_size()
        if size == 1:
            item = next(self.items, _END)
            batch = [] if item is _END else [item]
        else:
            batch = list(itertools.islice(self.items, size))
        n = len(batch)
        if n < size:
            self.exhausted = True
            if not n:
                return None
        if self.chunksize is None:
            self.item_bytes = max(self.item_bytes, _size_of(batch[0]))
        chunk = _Chunk(self, self.pulled, n)
        self.pulled += n
        self.held += n
        chunk.job = Job(self.fn, batch, self.options, chunk, star=self.star)
        self.tally.submit(n)
        try:
            self._submit(chunk.job)
        except Exception as exc:
            if not (len(batch) == 1 and _is_item_error(exc)):
                self.tally.withdraw_items(chunk)
                raise
            chunk.deliver(0, [None], {0: exc}, 0.0)
        return chunk

    def _submit(self, job: Job) -> None:
        while True:
            try:
                self.backend.submit(job)
                return
            except PoolClosed:
                backend = None if self.reopen is None else self.reopen()
                if backend is None:
                    raise
                self.backend = backend  # the rest of the map runs on the new default pool

    def _next_size(self) -> int:
        if self.chunksize is not None:
            return self.chunksize
        if self.per_item is None:
            return 1
        if self.total is not None:
            # A quarter of a worker's share of the whole input (as mp.Pool):
            # not of what is left, whose ever smaller chunks would each cost
            # a round trip; the time target already bounds the imbalance.
            cap = max(1, math.ceil(self.total / (4 * max(1, self.backend.workers))))
        else:
            cap = MAX_CHUNK_UNKNOWN_LENGTH
        cap = min(cap, MAX_CHUNK_BYTES // max(1, self.item_bytes))
        return max(1, min(cap, int(self.target / max(self.per_item, 1e-7))))

    def _record(
        self,
        chunk: _Chunk,
        lo: int,
        values: Sequence[Any],
        errors: dict[int, BaseException],
        elapsed: float,
    ) -> None:
        n = len(values)
        if n == len(chunk.values):
            # The backend hands over a list it no longer uses: no copy.
            chunk.values = values if type(values) is list else list(values)
        else:
            chunk.values[lo : lo + n] = values
        if errors:
            chunk.errors.update(errors)
        chunk.remaining -= n
        if not chunk.remaining:
            # Done: let go of the job (its function and input; it and the
            # chunk refer to each other) now, not at the next garbage collection.
            chunk.job = None
        if elapsed > 0 and n:
            per_item = elapsed / n
            self.per_item = per_item if self.per_item is None else 0.5 * (self.per_item + per_item)
        if self.bar is not None:
            self.bar.update(n)


def _locate(errors: dict[int, BaseException], first: int) -> None:
    """A crash report says which item of the whole map it was."""
    # WorkerCrashed's own base (_Crashed): checking it does not make the class
    # (which imports multiprocessing) for a map whose items merely raised.
    for i, error in errors.items():
        if isinstance(error, _Crashed) and error.index is None:
            error.index = first + i


def _is_item_error(exc: BaseException) -> bool:
    return isinstance(exc, SerializationError) or is_cancelled(exc)


class MapIterator(itertools.chain[R]):
    """The results of ``imap``/``imap_unordered``: iterate them, or ``async for``.

    >>> import parfn
    >>> with parfn.Pool(2, backend="thread") as pool:
    ...     list(pool.imap(abs, [-1, -2]))
    [1, 2]

    ``async for r in pool.imap(f, xs)`` waits for each result in a thread, so
    the event loop is not blocked. ``close()`` (or ``aclose()``) stops reading
    the input and drops the chunks not yet started. Like a generator, it is
    advanced by one thread at a time (``async for`` from several tasks is fine).
    """

    # An itertools.chain over runs of values (lists): each item costs one C
    # call, not a Python one. _Runs fetches the next run.
    _runs: _Runs
    _async_lock: threading.Lock

    def __new__(cls, run: MapRun) -> MapIterator[R]:
        runs = _Runs(run)
        self = cast("MapIterator[R]", cls.from_iterable(runs))
        self._runs = runs
        self._async_lock = threading.Lock()
        return self

    def __init__(self, run: MapRun) -> None:
        pass  # all done in __new__ (from_iterable makes the instance)

    def close(self) -> None:
        self._runs.close()

    def __aiter__(self) -> MapIterator[R]:
        return self

    async def __anext__(self) -> R:
        import asyncio

        value = await asyncio.to_thread(self._next_or_end)
        if value is _END:
            raise StopAsyncIteration
        return cast(R, value)

    def _next_or_end(self) -> Any:
        with self._async_lock:
            return next(self, _END)

    async def aclose(self) -> None:
        import asyncio

        await asyncio.to_thread(self.close)


class _Runs:
    """A map's values in runs (lists), in order; an item's exception is raised
    in its place (after the values before it), and ends the iteration."""

    def __init__(self, run: MapRun) -> None:
        self._chunks = run.chunks()
        self._last: list[Any] = []
        self._error: BaseException | None = None
        self._busy = threading.Lock()

    def __iter__(self) -> _Runs:
        return self

    def __next__(self) -> list[Any]:
        if not self._busy.acquire(blocking=False):
            raise ValueError("this imap iterator is being advanced by another thread")
        try:
            error, self._error = self._error, None
            if error is not None:
                self._chunks.close()
                raise error
            values, errors = next(self._chunks)  # StopIteration: the end
            if errors:
                k = min(errors)
                if not k:
                    self._chunks.close()
                    raise errors[k]
                values, self._error = values[:k], errors[k]
            self._last = values
            return values
        finally:
            self._busy.release()

    def close(self) -> None:
        with self._busy:
            self._last.clear()  # what the chain is reading: it ends there
            self._error = None
            self._chunks.close()


def _size_of(item: Any) -> int:
    """Roughly the bytes ``item`` holds (its arguments' too, for a tuple)."""
    try:
        if type(item) is tuple:
            return sum(_size_of_one(arg) for arg in item) + sys.getsizeof(item)
        return _size_of_one(item)
    except Exception:  # a strange __sizeof__ or nbytes: no estimate
        return 0


def _size_of_one(obj: Any) -> int:
    # ``nbytes``: an array's data even when it is a view (numpy, memoryview),
    # which ``getsizeof`` leaves out.
    nbytes = getattr(obj, "nbytes", 0)
    return max(sys.getsizeof(obj), nbytes if type(nbytes) is int else 0)
