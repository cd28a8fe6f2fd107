"""Ending a pool (docs/contract.md section 3), on every backend.

``shutdown(cancel_pending=True)`` cancels only the tasks not yet started and
lets running ones finish (the standard library's ``cancel_futures``);
``terminate()`` ends running ones too; a ``with`` block left by an exception
terminates.
"""

from __future__ import annotations

import concurrent.futures
import time
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

import parfn

from . import funcs
from ._scripts import SCRIPT_METHODS, run_script
from .conftest import make_pool

T = 30


def wait_running(tasks: list[parfn.Task[object]]) -> None:
    deadline = time.monotonic() + T
    while not all(t.running() or t.done() for t in tasks):
        assert time.monotonic() < deadline, "the tasks never started"
        time.sleep(0.01)


def test_cancel_pending_lets_running_tasks_finish(pool: parfn.Pool) -> None:
    running = [pool.spawn(funcs.sleep_then, 1.0, f"ran {i}") for i in range(2)]
    if pool.backend_name != "dask":  # (Dask starts tasks in its own order)
        wait_running(running)
    queued = [pool.spawn(funcs.sleep_then, 0.0, f"queued {i}") for i in range(3)]
    pool.shutdown(wait=True, cancel_pending=True)
    assert [t.result(timeout=T) for t in running] == ["ran 0", "ran 1"]
    if pool.backend_name in ("serial", "dask"):
        # serial: each task ran inside spawn(); Dask given a client: every task
        # went to the cluster at once, none waits here to be cancelled.
        assert [t.result(timeout=T) for t in queued] == ["queued 0", "queued 1", "queued 2"]
        return
    assert all(t.cancelled() for t in queued)
    for task in queued:
        with pytest.raises(CancelledError):
            task.result(timeout=T)
    # concurrent.futures.wait sees them done: they were notified as cancelled.
    done, not_done = concurrent.futures.wait(queued, timeout=T)
    assert done == set(queued) and not not_done
    with pytest.raises(parfn.PoolClosed):
        pool.spawn(abs, -1)


def test_terminate_ends_running_tasks(pool: parfn.Pool, tmp_path: Path) -> None:
    if pool.backend_name == "serial":
        task = pool.spawn(abs, -2)  # it ran inside spawn()
        pool.terminate()
        assert task.result(timeout=T) == 2
        return
    # Threads and Dask tasks cannot be stopped: a short one runs on unobserved.
    seconds = 30.0 if pool.backend_name == "process" else 1.0
    flag = tmp_path / "finished"
    running = [pool.spawn(funcs.sleep_then, seconds, str(i)) for i in range(2)]
    wait_running(running)
    queued = [pool.spawn(funcs.sleep_then, 0.0, "queued") for _ in range(2)]
    pool.terminate()
    for task in [*running, *queued]:
        with pytest.raises(CancelledError):
            task.result(timeout=T)
    assert not flag.exists()
    with pytest.raises(parfn.PoolClosed):
        pool.spawn(abs, -1)
    pool.terminate()  # again: nothing more to do
    pool.shutdown()


@pytest.mark.parametrize(
    ("backend", "start_method"), [("process", None), ("thread", None), ("serial", None)]
)
def test_a_with_block_left_by_an_exception_terminates(
    backend: str, start_method: str | None
) -> None:
    seconds = 30.0 if backend == "process" else 1.0
    tasks: list[parfn.Task[object]] = []
    with pytest.raises(KeyError), make_pool(backend, start_method) as pool:
        tasks.append(pool.spawn(funcs.sleep_then, seconds if backend != "serial" else 0, "x"))
        if backend != "serial":
            wait_running(tasks)
        raise KeyError("leave the block")
    if backend == "serial":
        assert tasks[0].result(timeout=T) == "x"
        return
    with pytest.raises(CancelledError):
        tasks[0].result(timeout=T)


SCRIPT = """
import time, parfn

def nap(seconds):
    time.sleep(seconds)
    return seconds

if __name__ == "__main__":
    pool = parfn.Pool(1)
    running = pool.spawn(nap, 0.5)
    while not running.running():
        time.sleep(0.01)
    queued = pool.spawn(nap, 0.0)
    pool.shutdown(cancel_pending=True)
    print(running.result(timeout=30), queued.cancelled())
    pool = parfn.Pool(1)
    running = pool.spawn(nap, 60)
    while not running.running():
        time.sleep(0.01)
    pool.terminate()
    print(running.cancelled())
"""


@pytest.mark.parametrize("method", SCRIPT_METHODS)
def test_a_users_script(tmp_path: Path, method: str) -> None:
    code = SCRIPT
    if method != "default":
        code = code.replace("parfn.Pool(1)", f"parfn.Pool(1, start_method={method!r})")
    out = run_script(tmp_path, code, flags=("-W", "ignore::DeprecationWarning"), timeout=40)
    assert out.stdout.split() == ["0.5", "True", "True"]
