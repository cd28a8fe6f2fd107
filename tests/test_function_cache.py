"""The process pool's function tables stay bounded.

A program that makes a new closure per call (``pool.apply(lambda: f(x))`` in
a loop) sends a new function each time: the pool, and each worker, keep only
the most recent ones, and forgetting a function never breaks a task that is
queued or running. The tables are looked at through the pool's backend and,
in a worker, through a task that finds the worker's loop on its stack.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import parfn
from parfn.backends.process import _dispatch

from . import funcs

T = 30


def make_adder(n: int) -> Callable[[int], int]:
    def add(x: int) -> int:
        return x + n

    return add  # a closure: pickled by value, its bytes differ for each n


def make_napper(tag: str) -> Callable[[float], str]:
    def nap(seconds: float) -> str:
        time.sleep(seconds)
        return tag

    return nap


def _unpickle_raises() -> Any:
    raise RuntimeError("refuses to unpickle")


class UnpickleRaises:
    def __reduce__(self) -> Any:
        return (_unpickle_raises, ())


def make_unloadable(n: int) -> Callable[[], int]:
    captured = UnpickleRaises()

    def unloadable() -> int:
        return n if captured else -n

    return unloadable  # pickles here, cannot be loaded in a worker


def worker_tables(seconds: float) -> tuple[int, int, int]:
    """(pid, functions loaded, functions that failed to load) of this worker."""
    time.sleep(seconds)  # long enough that the other worker takes the next probe
    loop_type = sys.modules["parfn.backends.process._worker"]._Worker
    frame = sys._getframe()
    while not isinstance(frame.f_locals.get("self"), loop_type):
        frame = frame.f_back  # type: ignore[assignment]
    loop = frame.f_locals["self"]
    return os.getpid(), len(loop.functions), len(loop.broken_functions)


def each_worker_tables(pool: parfn.Pool) -> list[tuple[int, int]]:
    """(functions loaded, failed to load) of each of the pool's two idle workers."""
    probes = [pool.spawn(worker_tables, 0.3) for _ in range(2)]
    found = [p.result(timeout=T) for p in probes]
    assert len({pid for pid, _, _ in found}) == 2
    return [(loaded, broken) for _, loaded, broken in found]


def check_bounded(pool: parfn.Pool) -> None:
    backend: Any = pool._backend
    assert len(backend._fn_by_data) <= _dispatch.POOL_FUNCTIONS
    assert len(backend._fn_cache) <= _dispatch.POOL_FUNCTIONS
    assert len(backend._item_time) <= 2 * _dispatch.WORKER_FUNCTIONS * 2
    for loaded, broken in each_worker_tables(pool):
        assert loaded + broken <= _dispatch.WORKER_FUNCTIONS
    # The parent's record of each worker's table (after the probes' Forget).
    assert all(len(w.fns) <= _dispatch.WORKER_FUNCTIONS for w in backend._workers)


@pytest.fixture
def small_worker_tables(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Workers hold 8 functions: a Batch of many distinct ones overflows that."""
    monkeypatch.setattr(_dispatch, "WORKER_FUNCTIONS", 8)
    yield


@pytest.fixture
def small_tables(monkeypatch: pytest.MonkeyPatch, small_worker_tables: None) -> Iterator[None]:
    """The pool, too, remembers 8 functions."""
    monkeypatch.setattr(_dispatch, "POOL_FUNCTIONS", 8)
    yield


def test_many_closures_leave_every_table_bounded(process_pool: parfn.Pool) -> None:
    spawned = [process_pool.spawn(make_adder(i), 1) for i in range(2000)]
    assert [t.result(timeout=T) for t in spawned] == [i + 1 for i in range(2000)]
    applied = [process_pool.apply(make_adder(i), 2) for i in range(300)]
    assert applied == [i + 2 for i in range(300)]
    check_bounded(process_pool)


def test_equal_closures_share_one_function(process_pool: parfn.Pool) -> None:
    assert [process_pool.apply(make_adder(7), i) for i in range(50)] == list(range(7, 57))
    assert len(process_pool._backend._fn_by_data) == 1  # type: ignore[attr-defined]


def test_a_batch_is_never_left_without_its_functions(
    process_pool: parfn.Pool, small_worker_tables: None
) -> None:
    # Functions the pool has timed as fast: their items are sent in batches.
    fast = [make_adder(i) for i in range(20)]
    old = make_napper("old")
    for f in fast:
        assert process_pool.apply(f, 0) in range(20)
    assert process_pool.apply(old, 0) == "old"
    # Both workers busy, so that what follows is queued: a Batch of the long
    # item of an old function followed by 60 items of 20 functions, then
    # one-item Batches of new functions, one of them to the same worker while
    # it runs the long item. Each overflows that worker's table: what it
    # forgets must not include what its waiting items use.
    blockers = [process_pool.spawn(funcs.sleep_then, 0.3, "blocker") for _ in range(2)]
    long = process_pool.spawn(old, 1.0)
    batched = [process_pool.spawn(fast[i % 20], 100) for i in range(60)]
    new = [process_pool.spawn(make_adder(1000 + i), 1) for i in range(600)]
    again = [process_pool.spawn(old, 0) for _ in range(5)]
    assert [t.result(timeout=T) for t in blockers] == ["blocker", "blocker"]
    assert [t.result(timeout=T) for t in batched] == [100 + i % 20 for i in range(60)]
    assert [t.result(timeout=T) for t in new] == [1001 + i for i in range(600)]
    assert long.result(timeout=T) == "old"
    assert [t.result(timeout=T) for t in again] == ["old"] * 5
    check_bounded(process_pool)


def test_a_function_that_cannot_load_fails_alone_after_evictions(
    process_pool: parfn.Pool, small_worker_tables: None
) -> None:
    first = make_unloadable(0)
    with pytest.raises(parfn.SerializationError, match="could not be loaded in the worker"):
        process_pool.spawn(first).result(timeout=T)
    good, bad = [], []
    for i in range(1, 101):
        good.append(process_pool.spawn(make_adder(i), 1))
        bad.append(process_pool.spawn(make_unloadable(i)))
    assert [t.result(timeout=T) for t in good] == [i + 1 for i in range(1, 101)]
    for task in bad:
        with pytest.raises(parfn.SerializationError, match="could not be loaded in the worker"):
            task.result(timeout=T)
    # Forgotten by now, and still failing alone once sent again.
    with pytest.raises(parfn.SerializationError, match="could not be loaded in the worker"):
        process_pool.spawn(first).result(timeout=T)
    assert process_pool.apply(funcs.square, 7) == 49
    check_bounded(process_pool)


def test_items_sent_again_one_by_one_keep_their_function(
    process_pool: parfn.Pool, small_tables: None
) -> None:
    # A chunk whose arguments cannot be loaded in the worker is sent again
    # item by item; by then the pool has forgotten the function (20 newer
    # ones), and so have the workers.
    backend: Any = process_pool._backend
    blockers = [process_pool.spawn(funcs.sleep_then, 0.5, "blocker") for _ in range(2)]
    items: list[Any] = [1, 2, UnpickleRaises(), 4, 5, 6, 7, 8]
    out: list[Any] = []
    fn = make_adder(10)
    mapper = threading.Thread(
        target=lambda: out.extend(process_pool.map(fn, items, return_exceptions=True, chunksize=4))
    )
    mapper.start()
    deadline = time.monotonic() + T
    while len(backend._queue) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # until both chunks are queued behind the blockers
    newer = [process_pool.spawn(make_adder(i), 1) for i in range(20)]
    assert [t.result(timeout=T) for t in blockers] == ["blocker", "blocker"]
    assert [t.result(timeout=T) for t in newer] == [i + 1 for i in range(20)]
    mapper.join(T)
    assert not mapper.is_alive()
    assert isinstance(out[2], parfn.SerializationError)
    assert out[:2] + out[3:] == [11, 12, 14, 15, 16, 17, 18]
    check_bounded(process_pool)


def make_holder(data: bytes) -> Callable[[int], int]:
    def holder(x: int) -> int:
        return len(data) + x

    return holder  # a closure over big data: its pickled bytes are that big


def test_the_tables_are_bounded_in_bytes_too(
    process_pool: parfn.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_dispatch, "FUNCTION_BYTES", 3 << 20)
    backend: Any = process_pool._backend
    for i in range(12):  # 1 MB closures: 4 fit the bound at the most
        assert process_pool.map(make_holder(bytes([i]) * (1 << 20)), [0, 1]) == [
            1 << 20,
            1 + (1 << 20),
        ]
        assert backend._fn_bytes <= 3 << 20
        assert len(backend._fn_by_data) <= 3
        # A dead closure leaves the identity cache at once, with its pickled bytes.
        assert len(backend._fn_cache) <= 1
    for worker in backend._workers:
        assert worker.fn_bytes <= (3 << 20) + (1 << 21) and len(worker.fns) <= 4
    for loaded, broken in each_worker_tables(process_pool):
        assert loaded + broken <= 5  # (and the probe itself)
