"""Dispatch: from a submitted Job to Batch frames in workers' pipes.

A job is pickled in the caller's thread (its function once per pool, its
arguments once per job) into ``Work``, runs of its items. The queued runs go
to workers that can take them: idle workers first, then a second batch to
workers running fast items, several fast runs coalesced into one Batch.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

from ._errors import PoolClosed, SerializationError
from ._procstate import JobState, PoolState, Work, Worker
from ._protocol import Batch, Define, Run, encode
from ._serialize import describe_item_error, dump_function, dumps
from .backends._base import Job

__all__ = (
    "FAST_ITEM",
    "MAX_COALESCE",
    "cancel_everything",
    "dispatch",
    "idle_worker",
    "prepare",
    "send",
    "send_direct",
    "start_work",
)

FAST_ITEM = 0.002
"""Seconds: items quicker than this are coalesced into batches, two in flight per worker."""
MAX_COALESCE = 64


# -- pickling a job (in the caller's thread) ----------------------------------------------


def prepare(pool: PoolState, job: Job) -> tuple[list[Work], dict[int, str]]:
    """Pickle a job (in the caller): its runs of sendable items, and why
    each other item cannot be sent."""
    if pool._closed:
        raise PoolClosed("the pool is shut down")
    fn_id, _ = function_id(pool, job.fn)
    n = len(job.items)
    try:
        data = dumps((job.star, job.kwargs, job.items), "the arguments", shm="many")
        bad: dict[int, str] = {}
    except SerializationError as exc:
        if n == 1:
            args, kwargs = job.call_args(0)
            raise SerializationError(describe_item_error(args, kwargs, exc)) from exc.__cause__
        data, bad = _pack_good_items(job)
    state = JobState(job, fn_id, data)
    works = []
    lo = 0
    for i in [*sorted(bad), n]:
        if i > lo:
            works.append(Work(state, lo, i, job.options.retries))
        lo = i + 1
    return works, bad


def function_id(pool: PoolState, fn: Callable[..., Any]) -> tuple[int, bytes]:
    """The id and bytes of ``fn``, pickled once per function.

    The hot path reads ``_fn_cache`` without a lock (a dict read is atomic):
    callers must not queue behind the manager thread just to find this.
    """
    hit = pool._fn_cache.get(id(fn))
    if hit is not None and hit[0]() is fn:
        return hit[1], pool._fn_data[hit[1]]
    data = dump_function(fn)
    with pool._fn_lock:
        fn_id = pool._fn_by_data.get(data)
        if fn_id is None:
            fn_id = pool._fn_by_data[data] = next(pool._fn_ids)
            pool._fn_data[fn_id] = data
        if len(pool._fn_cache) >= 256:
            pool._fn_cache = {}  # a fresh dict: readers keep the old one
        # A weak reference: the cache must not keep a bound method's
        # object alive. What cannot be weakly referenced is pickled anew.
        with contextlib.suppress(TypeError):
            pool._fn_cache[id(fn)] = (weakref.ref(fn), fn_id)
    return fn_id, data


def _pack_good_items(job: Job) -> tuple[bytes, dict[int, str]]:
    """Pickle the items that can be; say why each of the others cannot."""
    bad: dict[int, str] = {}
    items = list(job.items)
    for i in range(len(items)):
        try:
            dumps(items[i])
        except SerializationError as exc:
            bad[i] = describe_item_error(*job.call_args(i), exc)
            items[i] = ()  # a placeholder that never runs
    return dumps((job.star, job.kwargs, items), "the arguments", shm="many"), bad


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
    frames = []
    runs = []
    for work in works:
        state = work.state
        if state.fn_id not in worker.fns:
            worker.fns.add(state.fn_id)
            frames.append(encode(Define(state.fn_id, pool._fn_data[state.fn_id])))
        work.run_id = next(pool._run_ids)
        worker.runs[work.run_id] = work
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
    frames.append(encode(Batch(runs)))
    worker.batches += 1
    worker.channel.send(frames)


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
            works = _take(pool, len(queue))
            if works:
                send(pool, worker, works)


def _is_fast(pool: PoolState, worker: Worker) -> bool:
    item_time = pool._item_time
    return all(item_time.get(w.state.fn_id, 1.0) < FAST_ITEM for w in worker.runs.values())


def _take(pool: PoolState, queued: int) -> list[Work]:
    """The next batch from the queue: several fast items, or one. Caller holds ``_lock``."""
    queue = pool._queue
    item_time = pool._item_time
    works: list[Work] = []
    limit = max(1, min(MAX_COALESCE, queued // max(1, 2 * len(pool._workers))))
    while queue and len(works) < limit:
        work = queue[0]
        if not start_work(work):
            queue.popleft()
            continue
        if works and item_time.get(work.state.fn_id, 1.0) >= FAST_ITEM:
            break
        works.append(queue.popleft())
        if item_time.get(work.state.fn_id, 1.0) >= FAST_ITEM:
            break
    return works


def cancel_everything(pool: PoolState) -> None:
    """Drop the queue, kill the workers that run something. Caller holds ``_lock``."""
    queued, pool._queue = pool._queue, deque()
    for work in queued:
        if not work.state.cancelled:
            pool._pending_failures.append((work.state.job, work.lo, work.hi, CancelledError))
    for worker in pool._workers:
        if worker.runs and worker.kill_reason is None:
            worker.kill_reason = ("shutdown", 0, -1)
            worker.process.kill()
    pool._stopping = True
