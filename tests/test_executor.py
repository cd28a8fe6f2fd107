"""parfn.ProcessPoolExecutor (docs/contract.md section 7): the stdlib executor, on parfn.

CPython's own executor tests run against it with
``scripts/cpython_executor_tests.py``; these are parfn's own: the usual
``concurrent.futures`` usage, and what parfn adds (lambdas, crash isolation,
per-task options).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import inspect
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

import parfn
from parfn import ProcessPoolExecutor

from . import funcs

T = 30  # seconds: every wait in a test is bounded

FORK_WARNING = "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"
START_METHODS = [
    pytest.param("forkserver", id="forkserver"),
    pytest.param("spawn", id="spawn"),
    pytest.param("fork", id="fork", marks=pytest.mark.filterwarnings(FORK_WARNING)),
]


@pytest.fixture(params=START_METHODS)
def executor(request: pytest.FixtureRequest) -> Iterator[ProcessPoolExecutor]:
    """A 2-worker executor for each start method."""
    context = multiprocessing.get_context(request.param)
    with ProcessPoolExecutor(2, mp_context=context) as ex:
        yield ex


@pytest.fixture
def ex() -> Iterator[ProcessPoolExecutor]:
    """A 2-worker executor with the default start method."""
    with ProcessPoolExecutor(2) as ex:
        yield ex


def write_file(folder: str, name: str, seconds: float) -> str:
    time.sleep(seconds)
    Path(folder, name).write_text(name)
    return name


def wait_until_running(task: concurrent.futures.Future[object]) -> None:
    deadline = time.monotonic() + T
    while not task.running() and not task.done():
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.01)


# -- the standard library's interface ---------------------------------------------


@pytest.mark.parametrize("name", ["__init__", "submit", "map", "shutdown"])
def test_signatures_are_the_standard_librarys(name: str) -> None:
    ours = inspect.signature(getattr(ProcessPoolExecutor, name))
    theirs = inspect.signature(getattr(concurrent.futures.ProcessPoolExecutor, name))
    expected = [(p.name, p.kind, p.default) for p in theirs.parameters.values()]
    if name == "__init__" and sys.version_info < (3, 11):  # added in Python 3.11
        expected.append(("max_tasks_per_child", inspect.Parameter.KEYWORD_ONLY, None))
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == expected
    assert issubclass(ProcessPoolExecutor, concurrent.futures.Executor)


def test_submit_returns_a_task(executor: ProcessPoolExecutor) -> None:
    task = executor.submit(funcs.add, 2, b=3)
    assert isinstance(task, parfn.Task)
    assert isinstance(task, concurrent.futures.Future)
    assert task.result(timeout=T) == 5
    assert executor.submit(pow, 2, 8).result(timeout=T) == 256


def test_submit_rejects_its_own_bad_arguments(ex: ProcessPoolExecutor) -> None:
    with pytest.raises(TypeError):
        ex.submit(fn=funcs.add, a=1)  # type: ignore[call-arg]


def test_a_call_that_cannot_be_made_fails_its_future_not_submit(ex: ProcessPoolExecutor) -> None:
    # As in the standard library: submit() returns, the future holds the error.
    wrong = ex.submit(funcs.add, 1, 2, 3)  # type: ignore[call-arg]
    assert isinstance(wrong.exception(timeout=T), TypeError)
    unpicklable = ex.submit(funcs.identity, threading.Lock())
    with pytest.raises(parfn.SerializationError) as info:
        unpicklable.result(timeout=T)
    assert isinstance(info.value, pickle.PicklingError)
    assert ex.submit(funcs.square, 3).result(timeout=T) == 9


def test_an_exception_keeps_its_type_and_the_workers_traceback(ex: ProcessPoolExecutor) -> None:
    task = ex.submit(funcs.raise_key_error, "missing")
    with pytest.raises(KeyError) as info:
        task.result(timeout=T)
    assert info.value.args == ("missing",)
    assert "raise KeyError(key)" in str(info.value.__cause__)
    # The standard library's type for the cause, as code (and CPython's tests) check it.
    assert type(info.value.__cause__) is concurrent.futures.process._RemoteTraceback
    assert "raise KeyError(key)" in info.value.__cause__.tb
    with pytest.raises(ValueError) as in_map:
        list(ex.map(funcs.fail_on, range(6), chunksize=3))
    assert type(in_map.value.__cause__) is concurrent.futures.process._RemoteTraceback


class _Traced:
    @classmethod
    def fail(cls) -> None:
        raise RuntimeError(123)  # the line the traceback shows


def test_a_classmethod_travels_by_reference_and_its_traceback_shows_its_source(
    ex: ProcessPoolExecutor,
) -> None:
    with pytest.raises(RuntimeError) as info:
        ex.submit(_Traced.fail).result(timeout=T)
    assert "raise RuntimeError(123)  # the line the traceback shows" in str(info.value.__cause__)


# -- the worker processes: _processes, started on demand ----------------------------------


def test_processes_maps_pids_to_live_workers_started_on_demand() -> None:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(3, mp_context=context) as ex:
        assert ex._processes == {}  # nothing submitted: no worker yet
        for _ in range(3):  # one after another: the idle worker takes each
            assert ex.submit(funcs.square, 2).result(timeout=T) == 4
        workers = ex._processes
        assert len(workers) == 1
        ((pid, worker),) = workers.items()
        assert worker.pid == pid and worker.is_alive()
        assert ex.submit(funcs.pid).result(timeout=T) == pid
        # Three at once: as many workers as the tasks need, up to max_workers.
        tasks = [ex.submit(funcs.sleep_then, 0.5) for _ in range(5)]
        assert len(ex._processes) == 3
        for task in tasks:
            task.result(timeout=T)
    worker.join()  # safe once the executor reaped it
    assert not worker.is_alive()


@pytest.mark.filterwarnings(FORK_WARNING)
def test_fork_starts_every_worker_at_once() -> None:
    """As the standard library's executor does with fork: on the first submit."""
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as ex:
        assert ex.submit(funcs.square, 2).result(timeout=T) == 4
        assert len(ex._processes) == 2


def test_killing_a_worker_through_processes_fails_only_its_task(ex: ProcessPoolExecutor) -> None:
    task = ex.submit(funcs.sleep_then, 30)
    wait_until_running(task)
    pid = ex.submit(funcs.pid)  # the other worker, or the same one after it
    for worker in ex._processes.values():
        if worker.pid != pid.result(timeout=T):
            worker.kill()
    with pytest.raises(parfn.WorkerCrashed):
        task.result(timeout=T)
    assert ex.submit(funcs.square, 5).result(timeout=T) == 25


def test_map_in_order(executor: ProcessPoolExecutor) -> None:
    expected = [pow(x, x) for x in range(20)]
    for chunksize in (1, 3, 50):
        got = executor.map(pow, range(20), range(20), chunksize=chunksize, timeout=T)
        assert list(got) == expected
    assert list(executor.map(funcs.add, range(5), range(3), timeout=T)) == [0, 2, 4]


def test_map_reads_its_input_and_submits_everything_at_once(ex: ProcessPoolExecutor) -> None:
    seen: list[int] = []

    def numbers() -> Iterator[int]:
        for i in range(6):
            seen.append(i)
            yield i

    results = ex.map(funcs.square, numbers(), timeout=T)
    assert seen == list(range(6))  # before the first result is asked for
    assert list(results) == [x * x for x in range(6)]


def test_map_raises_an_items_exception_where_it_stands(ex: ProcessPoolExecutor) -> None:
    # With chunks too: the exception is raised at its own item, not at its chunk's first.
    for chunksize in (1, 2, 4):
        results = ex.map(funcs.fail_on, range(6), chunksize=chunksize, timeout=T)
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="bad item 3") as info:
            next(results)
        assert "raise ValueError" in str(info.value.__cause__)


def test_map_chunksize_must_be_positive(ex: ProcessPoolExecutor) -> None:
    with pytest.raises(ValueError, match="chunksize must be >= 1"):
        ex.map(funcs.square, range(3), chunksize=0)


def test_map_timeout_bounds_the_whole_wait(ex: ProcessPoolExecutor) -> None:
    assert ex.submit(funcs.square, 1).result(timeout=T) == 1  # the workers are up
    results = ex.map(funcs.sleep_then, [0, 0, 4], timeout=1.5)
    assert next(results) is None
    assert next(results) is None
    with pytest.raises(concurrent.futures.TimeoutError):
        next(results)


def test_leaving_map_early_cancels_the_calls_not_started(tmp_path: Path) -> None:
    with ProcessPoolExecutor(1) as ex:
        names = [str(i) for i in range(12)]
        results = ex.map(write_file, [str(tmp_path)] * 12, names, [0.1] * 12, timeout=T)
        assert next(results) == "0"
        results.close()  # as a break out of the for loop, or an exception, does
    assert 1 <= len(list(tmp_path.iterdir())) < 12


# -- shutdown ------------------------------------------------------------------------


def test_shutdown_cancel_futures_cancels_queued_tasks_only() -> None:
    ex = ProcessPoolExecutor(1)
    first = ex.submit(funcs.sleep_then, 0.5, "first")
    wait_until_running(first)
    rest = [ex.submit(funcs.square, i) for i in range(20)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert first.result(timeout=T) == "first"  # running: left to finish
    cancelled = [t for t in rest if t.cancelled()]
    assert len(cancelled) >= 15
    for task in rest:
        assert task.done()
        if not task.cancelled():
            assert task.exception(timeout=0) is None


def test_submit_after_shutdown_raises_runtime_error(ex: ProcessPoolExecutor) -> None:
    ex.shutdown()
    ex.shutdown()  # a second call does nothing
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown") as info:
        ex.submit(funcs.square, 2)
    assert isinstance(info.value, parfn.PoolClosed)
    with pytest.raises(RuntimeError):
        ex.map(funcs.square, [1])


def test_shutdown_without_wait_lets_the_tasks_finish() -> None:
    ex = ProcessPoolExecutor(2)
    tasks = [ex.submit(funcs.sleep_then, 0.2, i) for i in range(4)]
    ex.shutdown(wait=False)
    assert [t.result(timeout=T) for t in tasks] == [0, 1, 2, 3]


def test_with_block_waits_for_every_task() -> None:
    with ProcessPoolExecutor(2) as ex:
        tasks = [ex.submit(funcs.sleep_then, 0.1, i) for i in range(6)]
    assert all(t.done() for t in tasks)
    assert [t.result(timeout=0) for t in tasks] == list(range(6))


def test_an_executor_dropped_without_shutdown_closes_its_pool() -> None:
    ex = ProcessPoolExecutor(1)
    task = ex.submit(funcs.sleep_then, 0.2, "done")
    del ex
    gc.collect()
    # The task still finishes; the autouse fixture checks the worker then exits.
    assert task.result(timeout=T) == "done"


# -- concurrent.futures' helpers and asyncio ----------------------------------------


def test_as_completed_and_wait(ex: ProcessPoolExecutor) -> None:
    tasks = [ex.submit(funcs.sleep_then, d, d) for d in (0.4, 0.0, 0.2)]
    finished = [t.result() for t in concurrent.futures.as_completed(tasks, timeout=T)]
    assert sorted(finished) == [0.0, 0.2, 0.4]
    done, not_done = concurrent.futures.wait(tasks, timeout=T)
    assert done == set(tasks) and not not_done

    slow = ex.submit(funcs.sleep_then, 20, "slow")
    quick = ex.submit(funcs.square, 3)
    done, not_done = concurrent.futures.wait(
        [slow, quick], timeout=T, return_when=concurrent.futures.FIRST_COMPLETED
    )
    assert done == {quick} and not_done == {slow}
    assert slow.cancel()  # a parfn Task stops a running task


def test_asyncio_run_in_executor(ex: ProcessPoolExecutor) -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        calls = [loop.run_in_executor(ex, funcs.square, i) for i in range(5)]
        return list(await asyncio.gather(*calls))

    assert asyncio.run(asyncio.wait_for(main(), T)) == [0, 1, 4, 9, 16]


# -- what parfn adds ---------------------------------------------------------------------


def test_lambdas_and_closures(executor: ProcessPoolExecutor) -> None:
    offset = 10

    def add_offset(x: int) -> int:
        return x + offset

    assert executor.submit(lambda x: x + 1, 1).result(timeout=T) == 2
    assert list(executor.map(add_offset, range(4), timeout=T)) == [10, 11, 12, 13]
    assert list(executor.map(lambda a, b: a * b, range(4), range(4), chunksize=2)) == [0, 1, 4, 9]


def test_a_crash_fails_only_its_future_and_the_executor_keeps_serving(
    executor: ProcessPoolExecutor,
) -> None:
    assert executor.submit(funcs.square, 2).result(timeout=T) == 4
    other = executor.submit(funcs.sleep_then, 0.5, "other")
    crashed = executor.submit(os._exit, 1)
    with pytest.raises(parfn.WorkerCrashed) as info:
        crashed.result(timeout=T)
    assert isinstance(info.value, BrokenProcessPool)
    assert other.result(timeout=T) == "other"
    assert executor.submit(funcs.square, 5).result(timeout=T) == 25
    assert list(executor.map(funcs.square, range(6), timeout=T)) == [x * x for x in range(6)]


def test_a_crash_in_map_fails_only_that_item(ex: ProcessPoolExecutor) -> None:
    results = ex.map(funcs.crash_on, range(6), timeout=T)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(BrokenProcessPool):
        next(results)
    assert list(ex.map(funcs.square, range(3), timeout=T)) == [0, 1, 4]


def test_a_parallel_with_options_keeps_them(ex: ProcessPoolExecutor) -> None:
    with pytest.raises(parfn.TaskTimeout):
        ex.submit(funcs.slow_cube, 2).result(timeout=T)
    results = ex.map(funcs.slow_cube, [1, 2], chunksize=2, timeout=T)
    with pytest.raises(TimeoutError):
        next(results)
    assert ex.submit(funcs.cube, 3).result(timeout=T) == 27


# -- construction ------------------------------------------------------------------------


def test_constructor_checks_its_arguments_as_the_standard_library() -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            ProcessPoolExecutor(bad)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        ProcessPoolExecutor(1, initializer=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_tasks_per_child must be an integer"):
        ProcessPoolExecutor(1, max_tasks_per_child="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tasks_per_child must be >= 1"):
        ProcessPoolExecutor(1, max_tasks_per_child=0)
    with pytest.raises(ValueError, match="incompatible with the 'fork'"):
        ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("fork"), max_tasks_per_child=3
        )


def test_initializer_runs_in_every_worker() -> None:
    with ProcessPoolExecutor(2, initializer=funcs.initializer_sets, initargs=("ready",)) as ex:
        assert list(ex.map(funcs.read_init, range(4), timeout=T)) == ["ready"] * 4


def test_max_tasks_per_child_replaces_the_worker() -> None:
    with ProcessPoolExecutor(1, max_tasks_per_child=2) as ex:
        pids = [ex.submit(funcs.pid).result(timeout=T) for _ in range(3)]
    assert pids[0] == pids[1] != pids[2]


# -- interpreter exit ----------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_tasks_finish_at_interpreter_exit() -> None:
    done = run_python(
        """
        import time
        from parfn import ProcessPoolExecutor

        if __name__ == "__main__":
            ex = ProcessPoolExecutor(1)
            ex.submit(lambda: (time.sleep(0.3), print("apple", flush=True)))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "apple"
    assert done.stderr == ""


def test_submit_after_interpreter_exit_began_raises() -> None:
    done = run_python(
        """
        import atexit

        @atexit.register
        def last():
            try:
                ex.submit(id, None)
            except RuntimeError as e:
                print(e)

        from parfn import ProcessPoolExecutor

        if __name__ == "__main__":
            ex = ProcessPoolExecutor(1)
            ex.submit(id, 42).result(timeout=30)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cannot schedule new futures after interpreter shutdown"
