"""Dispatch: from a submitted Job to Batch frames in workers' pipes.

A job is pickled in the caller's thread (its function once per pool, its
arguments once per job) into ``Work``, runs of its items. The queued runs go
to workers that can take them: idle workers first, then a second batch to
workers running fast items, several fast runs coalesced into one Batch.

The function tables are bounded, for a program that makes a new closure per
call: the pool remembers the ``POOL_FUNCTIONS`` functions it pickled last,
and no more than ``FUNCTION_BYTES`` of them (a job carries its own pickled
function, so forgetting one only costs a new id if it comes again; a
function that is gone leaves the table by identity at once), and a worker
holds at most ``WORKER_FUNCTIONS``, and ``FUNCTION_BYTES`` of their pickled
data: past that, the parent tells it to forget the least recently used ones
that no run in flight on it uses. So a closure over big data made in a loop
is let go, in the parent and in the workers, once newer ones push it out.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import deque
from collections.abc import Callable

from ..._typing import Any
from ..._wire.errors import PoolClosed, SerializationError, cancelled
from ..._wire.protocol import Batch, Define, Forget, Run, encode
from ..._wire.serialize import describe_item_error, dump_function
from .._base import Job
from .._replay import wanted_levels
from ._state import JobState, PickledFunction, PoolState, Work, Worker, dump_arguments

__all__ = (
    "FAST_ITEM",
    "FUNCTION_BYTES",
    "MAX_COALESCE",
    "POOL_FUNCTIONS",
    "WORKER_FUNCTIONS",
    "cancel_everything",
    "cancel_queued",
    "dispatch",
    "idle_worker",
    "items_left",
    "prepare",
    "send",
    "send_direct",
    "start_work",
)

FAST_ITEM = 0.002
"""Seconds: items quicker than this are coalesced into batches, two in flight per worker."""
MAX_COALESCE = 64
POOL_FUNCTIONS = 256
"""How many functions a pool remembers, by identity and by pickled bytes."""
WORKER_FUNCTIONS = 256
"""How many functions a worker holds; past that it forgets the least recently
used, down to three quarters of this (one Forget per 64 new functions)."""
FUNCTION_BYTES = 64 << 20
"""How many bytes of pickled functions the pool's table, and each worker,
hold at most (past that, the least recently used go, down to three quarters;
the newest function always stays)."""


# -- pickling a job (in the caller's thread) ----------------------------------------------


def prepare(pool: PoolState, job: Job) -> tuple[list[Work], dict[int, str]]:
    """Pickle a job (in the caller): its runs of sendable items, and why
    each other item cannot be sent."""
    if pool._closed:
        raise PoolClosed(pool._broken or "the pool is shut down")
    function = pickled_function(pool, job.fn)
    n = len(job.items)
    try:
        data = dump_arguments(pool, (job.star, job.kwargs, job.items), "the arguments", "many")
        bad: dict[int, str] = {}
    except SerializationError as exc:
        if n == 1:
            args, kwargs = job.call_args(0)
            raise SerializationError(describe_item_error(args, kwargs, exc)) from exc.__cause__
        data, bad = _pack_good_items(pool, job)
    state = JobState(job, function, data)
    works = []
    lo = 0
    for i in [*sorted(bad), n]:
        if i > lo:
            works.append(Work(state, lo, i, job.options.retries))
        lo = i + 1
    return works, bad


def pickled_function(pool: PoolState, fn: Callable[..., Any]) -> PickledFunction:
    """``fn`` pickled, once per function while the pool remembers it.

    The hot path reads ``_fn_cache`` without a lock (a dict read is atomic):
    callers must not queue behind the manager thread just to find this.
    """
    hit = pool._fn_cache.get(id(fn))
    if hit is not None and hit[0]() is fn:
        return hit[1]
    data = dump_function(fn, forked_with=pool._forked_with)
    with pool._fn_lock:
        by_data = pool._fn_by_data
        function = by_data.get(data)
        if function is not None:
            by_data.move_to_end(data)
        else:
            function = by_data[data] = PickledFunction(data)
            pool._fn_bytes += len(data)
            while len(by_data) > 1 and (
                len(by_data) > POOL_FUNCTIONS or pool._fn_bytes > FUNCTION_BYTES
            ):
                _, old = by_data.popitem(last=False)
                pool._fn_bytes -= len(old.data)
        if len(pool._fn_cache) >= POOL_FUNCTIONS:
            pool._fn_cache = {}  # a fresh dict: readers keep the old one
        # A weak reference: the cache must not keep a bound method's
        # object alive, and the entry goes when the function does (with
        # the pickled bytes it holds). What cannot be weakly referenced is
        # pickled anew.
        with contextlib.suppress(TypeError):
            key = id(fn)
            pool._fn_cache[key] = (weakref.ref(fn, _forgetter(pool, key)), function)
    return function


def _forgetter(pool: PoolState, key: int) -> Callable[[Any], None]:
    """A weakref callback: drop ``key`` from the pool's cache when its function dies."""
    pool_ref = weakref.ref(pool)

    def forget(ref: Any) -> None:
        alive = pool_ref()
        if alive is not None:
            hit = alive._fn_cache.get(key)
            if hit is not None and hit[0] is ref:
                alive._fn_cache.pop(key, None)

    return forget


def _pack_good_items(pool: PoolState, job: Job) -> tuple[bytes, dict[int, str]]:
    """Pickle the items that can be; say why each of the others cannot."""
    bad: dict[int, str] = {}
    items = list(job.items)
    for i in range(len(items)):
        try:
            dump_arguments(pool, items[i])
        except SerializationError as exc:
            bad[i] = describe_item_error(*job.call_args(i), exc)
            items[i] = ()  # a placeholder that never runs
    return dump_arguments(pool, (job.star, job.kwargs, items), "the arguments", "many"), bad


# -- sending (caller holds _lock) ----------------------------------------------------------


def idle_worker(pool: PoolState) -> Worker | None:
    """A worker with nothing to do. Caller holds ``_lock``."""
    for worker in pool._workers:
        if (
            worker.batches == 0
            and not worker.retiring
            and not worker.borrowed
            and worker.kill_reason is None
        ):
            return worker
    return None


def send_direct(pool: PoolState, work: Work) -> bool:
    """Write ``work`` straight to an idle worker. Caller holds ``_lock``."""
    worker = idle_worker(pool)
    if worker is None:
        return False
    room = items_left(pool, worker)
    if room is not None and room < work.hi - work.lo:
        return False  # more items than it may still run: the queue splits them
    if start_work(work):
        send(pool, worker, [work])
    return True


def start_work(work: Work) -> bool:
    """Tell the sink its job starts; False if it was cancelled. Caller holds ``_lock``."""
    state = work.state
    if state.cancelled:
        return False
    if not state.started:
        state.started = True
        if not state.job.sink.start():
            state.cancelled = True
            return False
    return True


def send(pool: PoolState, worker: Worker, works: list[Work]) -> None:
    """Send ``works`` to ``worker`` as one Batch. Caller holds ``_lock``."""
    levels = wanted_levels()
    if worker.output.levels is not levels:  # its loggers take this process's levels first
        worker.output.levels = levels
        frames = [levels.frame]
    else:
        frames = []
    runs = []
    fns = worker.fns
    for work in works:
        state = work.state
        if state.fn_id in fns:
            fns.move_to_end(state.fn_id)
        else:
            fns[state.fn_id] = len(state.function.data)
            worker.fn_bytes += len(state.function.data)
            frames.append(encode(Define(state.fn_id, state.function.data)))
            # Every new function adds an item time: bound them here too.
            if len(pool._item_time) > 2 * WORKER_FUNCTIONS * len(pool._workers):
                _forget_item_times(pool)
        work.run_id = next(pool._run_ids)
        worker.runs[work.run_id] = work
        worker.items_sent += work.hi - work.lo
        if state.job.options.timeout is not None:
            pool._timed += 1
        runs.append(
            Run(
                work.run_id,
                state.fn_id,
                state.data,
                work.lo,
                work.hi,
                work.retries,
                state.job.options.timeout is not None,
            )
        )
    if len(fns) > WORKER_FUNCTIONS or (worker.fn_bytes > FUNCTION_BYTES and len(fns) > 1):
        forgotten = _forget_functions(worker)
        if forgotten:
            frames.append(encode(Forget(forgotten)))
    frames.append(encode(Batch(runs)))
    worker.batches += 1
    if pool._max_tasks is not None and worker.items_sent >= pool._max_tasks:
        worker.retiring = True  # it has all the items it may run: no new work
    worker.channel.send(frames)


def _forget_functions(worker: Worker) -> list[int]:
    """Drop ``worker``'s least recently used functions, down to three quarters
    of ``WORKER_FUNCTIONS`` and of ``FUNCTION_BYTES``, but none that a run in
    flight on it uses (the Batch being sent included): the worker reads every
    frame as it comes, and runs a Batch later. The ids dropped. Caller holds
    ``_lock``."""
    in_use = {work.state.fn_id for work in worker.runs.values()}
    count, size = len(worker.fns), worker.fn_bytes
    forgotten: list[int] = []
    for fn_id, fn_size in worker.fns.items():
        if count <= WORKER_FUNCTIONS * 3 // 4 and size <= FUNCTION_BYTES * 3 // 4:
            break
        if fn_id not in in_use:
            forgotten.append(fn_id)
            count -= 1
            size -= fn_size
    for fn_id in forgotten:
        del worker.fns[fn_id]
    worker.fn_bytes = size
    return forgotten


def _forget_item_times(pool: PoolState) -> None:
    """Keep the item times of the functions that some worker holds. Caller holds ``_lock``."""
    held = set().union(*(worker.fns for worker in pool._workers))
    for fn_id in [fn_id for fn_id in pool._item_time if fn_id not in held]:
        del pool._item_time[fn_id]


def dispatch(pool: PoolState) -> None:
    """Give queued work to workers that can take it. Caller holds ``_lock``."""
    queue = pool._queue
    while queue and queue[0].state.cancelled:
        queue.popleft()
    if not queue:
        return
    # Idle workers first, then a second batch to workers running fast items.
    for depth in (0, 1):
        for worker in pool._workers:
            if not queue:
                return
            if (
                worker.batches != depth
                or worker.retiring
                or worker.borrowed
                or worker.kill_reason is not None
            ):
                continue
            if depth == 1 and not _is_fast(pool, worker):
                continue
            works = _take(pool, len(queue), items_left(pool, worker))
            if works:
                send(pool, worker, works)


def _is_fast(pool: PoolState, worker: Worker) -> bool:
    item_time = pool._item_time
    return all(item_time.get(w.state.fn_id, 1.0) < FAST_ITEM for w in worker.runs.values())


def items_left(pool: PoolState, worker: Worker) -> int | None:
    """How many more items ``worker`` may be sent (``max_tasks_per_worker``); None: no bound."""
    if pool._max_tasks is None:
        return None
    return max(0, pool._max_tasks - worker.items_sent)


def _take(pool: PoolState, queued: int, room: int | None = None) -> list[Work]:
    """The next batch from the queue: several fast items, or one, and at most
    ``room`` items in all (a run bigger than what is left is split). Caller
    holds ``_lock``."""
    queue = pool._queue
    item_time = pool._item_time
    works: list[Work] = []
    limit = max(1, min(MAX_COALESCE, queued // max(1, 2 * len(pool._workers))))
    while queue and len(works) < limit and (room is None or room > 0):
        work = queue[0]
        if not start_work(work):
            queue.popleft()
            continue
        if works and item_time.get(work.state.fn_id, 1.0) >= FAST_ITEM:
            break
        n = work.hi - work.lo
        if room is not None and n > room:
            # Split: the first ``room`` items go now, the rest stay at the head.
            head = Work(work.state, work.lo, work.lo + room, work.retries, work.crashes)
            work.lo += room
            works.append(head)
            break
        works.append(queue.popleft())
        if room is not None:
            room -= n
        if item_time.get(work.state.fn_id, 1.0) >= FAST_ITEM:
            break
    return works


def cancel_everything(pool: PoolState) -> None:
    """Drop the queue, kill the workers that run something. Caller holds ``_lock``."""
    queued, pool._queue = pool._queue, deque()
    for work in queued:
        if not work.state.cancelled:
            pool._pending_failures.append((work.state.job, work.lo, work.hi, cancelled))
    for worker in pool._workers:
        if worker.runs and worker.kill_reason is None:
            worker.kill_reason = ("shutdown", 0, -1)
            worker.process.kill()
    pool._stopping = True


def cancel_queued(pool: PoolState) -> None:
    """Drop the queued jobs that have not started. Caller holds ``_lock``.

    A queued run of a job that started (a part of a map chunk requeued
    after a crash, a run sent again item by item) stays: its job is running.
    """
    kept: deque[Work] = deque()
    for work in pool._queue:
        state = work.state
        if state.cancelled:
            continue
        if state.started:
            kept.append(work)
        else:
            pool._pending_failures.append((state.job, work.lo, work.hi, cancelled))
    pool._queue = kept
