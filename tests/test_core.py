"""docs/contract.md sections 1-3 and 6, on every backend and start method."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.machinery
import inspect
import itertools
import pickle
import sys
import threading
import time
import types
from pathlib import Path

import pytest

import parfn
from parfn import parallel

from . import _scripts, funcs

T = 30  # seconds: every wait in a test is bounded


def test_apply_spawn_map(pool: parfn.Pool) -> None:
    assert pool.apply(funcs.square, 3) == 9
    task = pool.spawn(funcs.square, 4)
    assert isinstance(task, parfn.Task)
    assert isinstance(task, concurrent.futures.Future)
    assert task.result(timeout=T) == 16
    assert pool.map(funcs.square, range(10)) == [x * x for x in range(10)]


def test_decorated_function_uses_the_pool_of_the_with_block(pool: parfn.Pool) -> None:
    with pool:
        assert funcs.cube.apply(3) == 27
        assert funcs.cube.spawn(2).get(timeout=T) == 8
        assert funcs.cube.map(range(5)) == [0, 1, 8, 27, 64]
        worker = funcs.cube.apply(0) == 0 and pool.apply(funcs.in_worker)
    assert worker is (pool.backend_name == "process")


def test_inline_call_runs_here() -> None:
    assert funcs.cube(3) == 27
    assert not parfn.in_worker()


def test_map_zips_several_iterables_and_stops_at_the_shortest(pool: parfn.Pool) -> None:
    assert pool.map(funcs.add, [1, 2, 3], [10, 20, 30, 40]) == [11, 22, 33]


def test_starmap(pool: parfn.Pool) -> None:
    assert pool.starmap(funcs.add, [(1, 2), (3, 4)]) == [3, 7]


def test_results_keep_their_exact_types(pool: parfn.Pool) -> None:
    """Short runs of plain scalars travel inline, others pickled: both come back as sent."""
    values = [1, 2.5, None, True, 1 + 2j, "s", "x" * 300, b"b", [1], 10**30, float("inf")]
    for got in (
        pool.map(funcs.identity, values, chunksize=1),
        pool.map(funcs.identity, values),
        [pool.spawn(funcs.identity, v).result(timeout=T) for v in values],
        [pool.apply(funcs.identity, v) for v in values],
    ):
        assert got == values
        assert [type(v) for v in got] == [type(v) for v in values]


def test_a_finished_task_keeps_no_reference_to_its_function(pool: parfn.Pool) -> None:
    """Without the garbage collector: no reference cycle holds a done task's job."""
    import gc
    import weakref

    holder = funcs.Holder()
    gone = weakref.ref(holder)
    gc.disable()
    try:
        assert pool.spawn(holder.method, 1).result(timeout=T) == 2
        assert pool.apply(holder.method, 2) == 3
        del holder
        deadline = time.monotonic() + T
        while gone() is not None and time.monotonic() < deadline:
            time.sleep(0.01)  # a backend thread may still be letting go of the job
        assert gone() is None, gc.get_referrers(gone())
    finally:
        gc.enable()


def test_values_bigger_than_a_pipe_cross_both_ways(pool: parfn.Pool) -> None:
    """Frames of 70 KB to 900 KB (over the 64 KiB a pipe holds, under the size
    that goes through shared memory) are read in several pieces, both ends."""
    values = ["a" * 70_000, list(range(60_000)), b"b" * 900_000, "c" * 10]
    assert pool.map(funcs.identity, values, chunksize=1) == values
    assert pool.map(funcs.identity, values) == values
    assert [pool.apply(funcs.identity, v) for v in values] == values
    tasks = [pool.spawn(funcs.identity, v) for v in values * 3]
    assert [t.result(timeout=T) for t in tasks] == values * 3


def test_map_keeps_input_order_with_uneven_durations(pool: parfn.Pool) -> None:
    delays = [0.2, 0.0, 0.1, 0.0]
    assert pool.map(funcs.sleep_then, delays, range(4), chunksize=1) == [0, 1, 2, 3]


def test_imap_reads_an_endless_generator_only_a_window_ahead(pool: parfn.Pool) -> None:
    pulled = itertools.count()

    def endless():
        for i in itertools.count():
            next(pulled)
            yield i

    it = pool.imap(funcs.square, endless())
    assert [next(it) for _ in range(50)] == [i * i for i in range(50)]
    time.sleep(0.2)  # give it time to read ahead, if it would
    read = next(pulled)
    time.sleep(0.2)
    assert next(pulled) == read + 1, "imap kept reading input while nobody asked for results"
    assert read < 50 + 2 * pool.workers * 4096 + 2, f"imap read {read} items ahead"
    it.close()  # type: ignore[attr-defined]


def test_imap_of_big_items_reads_only_a_few_ahead(pool: parfn.Pool) -> None:
    """The window is bounded in bytes too: 1 MB items with a function that
    takes no time go a few per chunk, not thousands."""
    pulled = itertools.count()

    def big_items():
        for i in itertools.count():
            next(pulled)
            yield bytes([i % 256]) * 1_000_000

    it = pool.imap(len, big_items())
    assert [next(it) for _ in range(30)] == [1_000_000] * 30
    time.sleep(0.2)  # give it time to read ahead, if it would
    read = next(pulled)
    assert read < 30 + 2 * pool.workers * 10 + 8, f"imap read {read} items of 1 MB"
    it.close()


def test_imap_unordered_gives_every_result(pool: parfn.Pool) -> None:
    out = list(pool.imap_unordered(funcs.square, range(100)))
    assert sorted(out) == [x * x for x in range(100)]


def test_imap_raises_at_the_failing_item(pool: parfn.Pool) -> None:
    it = pool.imap(funcs.fail_on, range(6), chunksize=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3"):
        next(it)
    assert list(it) == [], "an imap ends at its first error (as a generator does)"


def test_imap_close_ends_the_iteration_at_once(pool: parfn.Pool) -> None:
    it = pool.imap(funcs.square, range(10_000), chunksize=500)
    assert next(it) == 0
    it.close()
    assert list(it) == []


def test_map_return_exceptions_keeps_every_other_result(pool: parfn.Pool) -> None:
    out = pool.map(funcs.fail_on, range(6), return_exceptions=True, chunksize=3)
    assert out[:3] == [0, 1, 2] and out[4:] == [4, 5]
    assert isinstance(out[3], ValueError)


def test_map_raises_the_first_error(pool: parfn.Pool) -> None:
    with pytest.raises(ValueError, match="bad item 3"):
        pool.map(funcs.fail_on, range(10))


@pytest.mark.parametrize("chunksize", [None, 1, 7, 1000])
def test_chunk_sizes_give_the_same_results(pool: parfn.Pool, chunksize: int | None) -> None:
    assert pool.map(funcs.square, range(500), chunksize=chunksize) == [x * x for x in range(500)]


def test_empty_inputs(pool: parfn.Pool) -> None:
    assert pool.map(funcs.square, []) == []
    assert list(pool.imap(funcs.square, iter([]))) == []


def test_lambdas_closures_and_local_functions(pool: parfn.Pool) -> None:
    k = 10

    def local(x: int) -> int:
        return x + k

    assert pool.apply(lambda x: x * 2, 4) == 8
    assert pool.map(local, [1, 2]) == [11, 12]
    inc = parallel(lambda x: x + 1)
    with pool:
        assert inc.map([1, 2, 3]) == [2, 3, 4]
        assert inc.spawn(1).result(timeout=T) == 2


def test_keyword_arguments(pool: parfn.Pool) -> None:
    assert pool.apply(funcs.add, 1, b=5) == 6
    assert pool.spawn(funcs.add, a=2, b=3).result(timeout=T) == 5


def test_remote_exception_keeps_its_type_and_traceback(pool: parfn.Pool) -> None:
    with pytest.raises(KeyError) as info:
        pool.apply(funcs.raise_key_error, "missing")
    if pool.backend_name == "process":
        cause = info.value.__cause__
        assert cause is not None
        assert "raise_key_error" in str(cause)
        assert "_execute.py" not in str(cause), "parfn's own frames leak into the traceback"


def test_task_asyncresult_spellings(pool: parfn.Pool) -> None:
    task = pool.spawn(funcs.sleep_then, 0.05, "done")
    task.wait(timeout=T)
    assert task.ready()
    assert task.successful()
    assert task.get(timeout=T) == "done"
    failed = pool.spawn(funcs.fail_on, 3)
    failed.wait(timeout=T)
    assert not failed.successful()
    with pytest.raises(ValueError):
        failed.get(timeout=T)


def test_task_get_timeout_raises_builtin_timeout_error_and_task_goes_on(
    process_pool: parfn.Pool,
) -> None:
    task = process_pool.spawn(funcs.sleep_then, 0.5, "late")
    with pytest.raises(TimeoutError):
        task.get(timeout=0.01)
    assert task.result(timeout=T) == "late"


def test_task_works_with_concurrent_futures_helpers(pool: parfn.Pool) -> None:
    tasks = [pool.spawn(funcs.square, i) for i in range(5)]
    done, not_done = concurrent.futures.wait(tasks, timeout=T)
    assert not not_done
    assert sorted(t.result() for t in concurrent.futures.as_completed(tasks, timeout=T)) == [
        0,
        1,
        4,
        9,
        16,
    ]


def test_await_a_task(pool: parfn.Pool) -> None:
    async def main() -> list[int]:
        return [await pool.spawn(funcs.square, 3), await pool.spawn(funcs.square, 4)]

    assert asyncio.run(asyncio.wait_for(main(), T)) == [9, 16]


def test_done_callback(pool: parfn.Pool) -> None:
    seen: list[int] = []
    event = threading.Event()
    task = pool.spawn(funcs.square, 5)
    task.add_done_callback(lambda t: (seen.append(t.result()), event.set()))
    assert event.wait(T)
    assert seen == [25]


def test_options_copy_keeps_the_function() -> None:
    f = funcs.cube.options(timeout=5, retries=2)
    assert f(2) == 8
    assert f.__wrapped__ is funcs.cube.__wrapped__
    assert "timeout=5" in repr(f)
    assert funcs.cube.options(retries=1).options(timeout=None)._parfn_options.retries == 1


def test_metadata_and_signature_are_kept() -> None:
    @parallel
    def documented(a: int, b: str = "x") -> str:
        """Docstring."""
        return b * a

    assert documented.__name__ == "documented"
    assert documented.__doc__ == "Docstring."
    assert documented.__module__ == __name__
    assert "documented" in documented.__qualname__
    assert inspect.signature(documented) == inspect.signature(documented.__wrapped__)
    assert list(inspect.signature(documented).parameters) == ["a", "b"]


def test_a_parallel_is_picklable() -> None:
    assert pickle.loads(pickle.dumps(funcs.cube)) is funcs.cube
    import cloudpickle

    inc = parallel(lambda x: x + 1)
    assert pickle.loads(cloudpickle.dumps(inc)).apply(1) == 2


def test_default_pool_starts_lazily_and_shutdown_restarts_it() -> None:
    assert funcs.cube.apply(2) == 8
    parfn.shutdown()
    parfn.shutdown()  # a second time does nothing
    assert funcs.cube.apply(3) == 27


def test_with_block_is_scoped_to_its_thread() -> None:
    seen: list[bool] = []
    with parfn.Pool(1, backend="serial"):
        t = threading.Thread(
            target=lambda: seen.append(
                funcs.cube.apply(0) == 0 and funcs.in_worker.__name__ == "in_worker"
            )
        )
        t.start()
        t.join(T)
        # in this thread, serial: runs here
        assert parfn.Pool is not None
        assert funcs.cube.apply(2) == 8
    assert seen == [True]


def test_with_block_in_another_thread_does_not_take_over(process_pool: parfn.Pool) -> None:
    results: dict[str, bool] = {}
    barrier = threading.Barrier(2, timeout=T)

    def other() -> None:
        barrier.wait()
        results["other"] = parallel(funcs.in_worker).apply()

    t = threading.Thread(target=other)
    with parfn.Pool(1, backend="serial"):
        t.start()
        barrier.wait()
        results["here"] = parallel(funcs.in_worker).apply()
        t.join(T)
    assert results == {"here": False, "other": True}


def test_nested_calls_from_inside_a_worker_never_deadlock(process_pool: parfn.Pool) -> None:
    with process_pool:
        expected = sum(x**3 for x in range(5)) + 8 + 1
        assert funcs.nested_sum.map([5, 5, 5]) == [expected] * 3


def test_initializer_runs_in_every_worker(pool: parfn.Pool) -> None:
    name = pool.backend_name
    if name == "serial":
        return  # runs in the caller; covered by test_serial_initializer
    backend = name
    with parfn.Pool(2, backend=backend, initializer=funcs.initializer_sets, initargs=("hi",)) as p:
        assert set(p.map(funcs.read_init, range(8), chunksize=1)) == {"hi"}


def test_max_tasks_per_worker_replaces_workers(process_pool: parfn.Pool) -> None:
    with parfn.Pool(1, max_tasks_per_worker=2) as p:
        pids = [p.apply(funcs.pid) for _ in range(6)]
    assert len(set(pids)) == 3


def test_pool_closed_after_shutdown(pool: parfn.Pool) -> None:
    pool.shutdown()
    with pytest.raises(parfn.PoolClosed):
        pool.apply(funcs.square, 2)
    with pytest.raises(parfn.PoolClosed):
        pool.map(funcs.square, [1])
    pool.shutdown()  # a second time does nothing


def test_shutdown_waits_for_submitted_tasks(pool: parfn.Pool) -> None:
    tasks = [pool.spawn(funcs.sleep_then, 0.05, i) for i in range(6)]
    pool.shutdown(wait=True)
    assert [t.result(timeout=0) for t in tasks] == list(range(6))


def test_leaving_with_by_an_exception_cancels_queued_tasks() -> None:
    with pytest.raises(RuntimeError, match="boom"), parfn.Pool(1) as p:
        running = p.spawn(funcs.sleep_then, 30)
        queued = p.spawn(funcs.sleep_then, 30)
        raise RuntimeError("boom")
    assert queued.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        running.result(timeout=T)


def test_workers_none_means_the_cpus_this_process_may_use() -> None:
    import os

    with parfn.Pool(backend="thread") as p:
        assert p.workers == len(os.sched_getaffinity(0))


# -- bad input: a clear error in the caller, at once -----------------------------------


def test_parallel_of_a_non_function_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="decorates a function"):
        parallel(42)  # type: ignore[call-overload]


def test_map_of_none_is_a_type_error(pool: parfn.Pool) -> None:
    with pytest.raises(TypeError, match="expected a function"):
        pool.map(None, [1, 2])  # type: ignore[arg-type]


def test_wrong_arguments_raise_type_error_before_sending(pool: parfn.Pool) -> None:
    with pytest.raises(TypeError, match="square"):
        pool.apply(funcs.square, 1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        funcs.cube.spawn(1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        pool.map(funcs.add, [1], [2], [3])
    assert pool.apply(funcs.square, 2) == 4  # nothing else disturbed


@pytest.mark.parametrize("workers", [0, -1, 1.5, "2"])
def test_bad_worker_counts(workers: object) -> None:
    with pytest.raises(ValueError, match="workers must be"):
        parfn.Pool(workers)  # type: ignore[arg-type]


def test_unknown_backend_and_start_method_name_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="'process'.*'thread'.*'serial'"):
        parfn.Pool(1, backend="gpu")
    with pytest.raises(ValueError, match="'fork'.*'forkserver'.*'spawn'"):
        parfn.Pool(1, start_method="vfork")


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="timeout"):
        parallel(timeout=-1)(funcs.square)
    with pytest.raises(TypeError, match="retries"):
        funcs.cube.options(retries="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunksize"), parfn.Pool(1, backend="serial") as p:
        p.map(funcs.square, [1], chunksize=0)


# -- progress, through the public API -----------------------------------------------------


class Counter:
    """A tqdm-like object: counts the updates it gets."""

    def __init__(self) -> None:
        self.n = 0
        self.total: int | None = None

    def update(self, n: int = 1) -> None:
        self.n += n


def test_map_reports_progress_to_a_tqdm_like_object(pool: parfn.Pool) -> None:
    bar = Counter()
    assert pool.map(funcs.square, range(50), progress=bar) == [x * x for x in range(50)]
    assert bar.n == 50
    assert bar.total == 50


def test_imap_over_a_generator_reports_progress(pool: parfn.Pool) -> None:
    bar = Counter()
    assert list(pool.imap(funcs.square, (x for x in range(20)), progress=bar))[-1] == 361
    assert bar.n == 20


def test_progress_true_draws_on_stderr(
    pool: parfn.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    pool.map(funcs.square, range(10), progress=True)
    err = capsys.readouterr().err
    assert "10" in err and "square" in err


def test_a_bad_progress_value_fails_before_any_work(pool: parfn.Pool) -> None:
    with pytest.raises(TypeError, match="progress"):
        pool.map(funcs.square, range(3), progress="yes")


# -- first calls from many threads at once ----------------------------------------------

THREADS_FIRST_CALLS = """
import sys
import threading

import parfn

METHOD = None if sys.argv[1] == "default" else sys.argv[1]


@parfn.parallel
def double(x):
    return 2 * x


def call(i, out):
    try:
        if METHOD is None:  # the default pool, started by whichever call comes first
            out[i] = double.apply(i)
        else:  # a pool of each thread's own
            with parfn.Pool(1, start_method=METHOD) as pool:
                out[i] = pool.apply(double, i)
    except Exception as exc:
        out[i] = repr(exc)


if __name__ == "__main__":
    n = 20 if METHOD is None else 4
    out = {}
    threads = [threading.Thread(target=call, args=(i, out)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(sorted(out.items()) == [(i, 2 * i) for i in range(n)] or out)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", _scripts.SCRIPT_METHODS)
def test_first_calls_from_many_threads_at_once(tmp_path: Path, method: str) -> None:
    # Each thread's first call imports parfn's modules while the others do.
    out = _scripts.run_script(tmp_path, THREADS_FIRST_CALLS, method).stdout
    assert out == "True\n"


def test_a_module_half_imported_by_another_thread_is_not_read_as_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What those first calls met, 1 run in 8: a module in sys.modules that
    # another thread is still importing, without its names yet.
    from parfn._wire.errors import is_cancelled
    from parfn.backends._replay import DEFAULT_LEVELS, wanted_levels

    half = types.ModuleType("half")
    half.__spec__ = importlib.machinery.ModuleSpec("half", None)
    half.__spec__._initializing = True  # type: ignore[attr-defined]
    for name in ("parfn.backends.process._worker", "concurrent.futures._base", "logging"):
        monkeypatch.setitem(sys.modules, name, half)
    assert parfn.in_worker() is False
    assert is_cancelled(ValueError()) is False
    assert wanted_levels() is DEFAULT_LEVELS


def _interrupted() -> None:
    raise KeyboardInterrupt


def test_an_apply_interrupted_by_ctrl_c_counts_as_cancelled() -> None:
    # The serial backend runs the call where apply waits: Ctrl-C there
    # interrupts it, and no outcome ever comes. (Ctrl-C while apply waits on
    # a process or a thread: tests/test_signals.py.)
    with parfn.Pool(1, backend="serial") as pool:
        with pytest.raises(KeyboardInterrupt):
            pool.apply(_interrupted)
        assert pool.apply(abs, -2) == 2
        stats = pool.stats()
    assert (stats.submitted, stats.done, stats.cancelled, stats.queued) == (2, 1, 1, 0), stats
