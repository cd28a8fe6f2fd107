"""Results: a worker's answer, from its pipe to the job's sink.

``on_results`` accounts for a Results message under the lock (the runs leave
their worker; per-function timings steer coalescing; a worker that reached
``max_tasks_per_worker`` retires). The outcomes are then unpickled and handed
to the sinks with no lock held, by the manager thread or by a caller that
borrowed the worker. A run whose arguments or results could not be loaded as
a whole is sent again item by item (``isolate``), so that only the bad item
fails. A worker above ``max_memory_per_worker`` after a task retires too.
"""

from __future__ import annotations

from ..._typing import Any
from ..._wire.errors import SerializationError
from ..._wire.protocol import Results
from ..._wire.shm import release
from ._state import JobState, PoolState, Work, Worker, dump_arguments, load_result

__all__ = ("deliver", "deliver_one", "isolate", "on_results")


def on_results(pool: PoolState, worker: Worker, message: Results) -> list[tuple[Work, Any]]:
    """Account for a worker's answer; the runs to deliver (no lock held then)."""
    delivered: list[tuple[Work, Any]] = []
    dropped: list[bytes | None] = []
    with pool._lock:
        worker.batches -= 1
        for done in message.done:
            work = worker.runs.pop(done.run_id, None)
            if work is None:
                if not isinstance(done.payload, list):
                    dropped.append(done.payload)
                continue
            if work.state.job.options.timeout is not None:
                pool._timed -= 1
            n = work.hi - work.lo
            worker.items_run += n
            if done.retried:
                pool._retried += done.retried
            if done.payload is not None and n:
                fn_id = work.state.fn_id
                per_item = done.elapsed / n
                old = pool._item_time.get(fn_id)
                pool._item_time[fn_id] = per_item if old is None else 0.7 * old + 0.3 * per_item
            delivered.append((work, done))
        if pool._max_tasks is not None and worker.items_run >= pool._max_tasks:
            worker.retiring = True
    if pool._memory_limit is not None:
        from ._memory import recycle_if_over  # (only with max_memory_per_worker)

        recycle_if_over(pool, worker)  # above max_memory_per_worker after a task
    for payload in dropped:
        release(payload)
    return delivered


def deliver_one(pool: PoolState, work: Work, done: Any) -> None:
    """Hand one run's outcome (a ``Done``) to its sink (no lock held)."""
    if type(done.payload) is list:  # plain values, inline: nothing to load or release
        if not work.state.cancelled:
            work.state.job.sink.deliver(work.lo, done.payload, {}, done.elapsed)
        return
    if work.state.cancelled or done.payload is None:
        release(done.payload)
        return
    if not done.payload:
        isolate(pool, work)  # the worker could not load the run's arguments
        return
    deliver(pool, work, done.payload, done.elapsed)


def deliver(pool: PoolState, work: Work, payload: bytes, elapsed: float) -> None:
    """Unpickle a run's outcomes and hand them to its sink (no lock held)."""
    job = work.state.job
    try:
        values, envelopes = load_result(payload)
    except SerializationError as exc:
        release(payload)
        if work.hi - work.lo == 1:
            job.sink.deliver(work.lo, [None], {work.lo: exc}, elapsed)
            return
        # One of the results cannot be unpickled here: run the items again
        # one by one, so that only that item fails.
        isolate(pool, work)
        return
    # Ownership passes with the message: the result's segments are the
    # parent's, unlinked now; their mappings live on in ``values``.
    release(payload)
    job.sink.deliver(work.lo, values, envelopes, elapsed)


def isolate(pool: PoolState, work: Work) -> None:
    """Send a run's items again one by one, each pickled alone (no lock held)."""
    state = work.state
    works = []
    for i in range(work.lo, work.hi):
        job = state.job
        data = dump_arguments(pool, (job.star, job.kwargs, {i: job.items[i]}), shm="many")
        alone = JobState(job, state.function, data)
        alone.started = True
        works.append(Work(alone, i, i + 1, work.retries))
    with pool._lock:
        pool._queue.extendleft(reversed(works))
    pool._wake()
