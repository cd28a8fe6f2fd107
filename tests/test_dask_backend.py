"""The dask backend, through the public API.

One LocalCluster of 2 worker processes on loopback serves the module, as a
user's own ``client=``; the cases that crash or stop workers start their own
cluster (parfn's, or a user's) so that no worker process outlives its test.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest

import parfn
from parfn import parallel

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")

T = 30  # seconds: every wait is bounded

# No dashboard, and the scheduler's small HTTP server on a free loopback port
# rather than on 8787, where another cluster may be.
CLUSTER = {
    "threads_per_worker": 1,
    "processes": True,
    "dashboard_address": None,
    "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"},
    "host": "127.0.0.1",
}


# -- functions sent to the workers (by reference: this module is importable there) --


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0) -> int:
    return a + b


def fail_on(x: int, bad: int = 3) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def kill_on(x: int, bad: int = 2) -> int:
    """SIGKILL the worker process running item ``bad``."""
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def count_then(path: str, outcome: str, times: int = 0) -> str:
    """Count the call in ``path``; the first ``times`` calls fail as ``outcome`` says."""
    with open(path, "a+") as f:
        f.seek(0)
        count = len(f.read())
        f.write("x")
    if count < times:
        if outcome == "raise":
            raise RuntimeError(f"attempt {count + 1} fails")
        if outcome == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if outcome == "sleep":
            time.sleep(3)
    return f"ok after {count + 1}"


def read_env(_: object = None) -> str | None:
    return os.environ.get("PARFN_DASK_INIT")


def set_env(value: str) -> None:
    os.environ["PARFN_DASK_INIT"] = value


def batched_identity(x: int) -> int:
    return x


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with distributed.LocalCluster(n_workers=2, **CLUSTER) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster: Any) -> Iterator[Any]:
    with distributed.Client(cluster, set_as_default=False) as c:
        yield c


@pytest.fixture
def pool(client: Any) -> Iterator[parfn.Pool]:
    with parfn.Pool(backend="dask", client=client) as p:
        yield p


def _calls(path: Path) -> int:
    return len(path.read_text()) if path.exists() else 0


# -- everything of docs/contract.md sections 1-3 ---------------------------------------------------


def test_apply_spawn_await_map_starmap(pool: parfn.Pool) -> None:
    assert pool.workers == 2
    assert pool.apply(square, 3) == 9
    task = pool.spawn(add, 2, b=3)
    assert isinstance(task, parfn.Task)
    assert task.result(timeout=T) == 5

    async def main() -> list[int]:
        return [await pool.spawn(square, 4), await pool.spawn(square, 5)]

    assert asyncio.run(asyncio.wait_for(main(), T)) == [16, 25]
    assert pool.map(add, [1, 2, 3], [10, 20, 30, 40]) == [11, 22, 33]
    assert pool.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
    assert pool.map(square, []) == []


@parallel
def cube(x: int) -> int:
    return x * x * x


def nested_cubes(n: int) -> tuple[list[int], int, bool]:
    """A task's own decorated calls: they run in the task, on the Dask worker."""
    return cube.map(range(n)), cube.spawn(2).result(timeout=T), parfn.in_worker()


def test_nested_calls_run_inside_the_dask_task(pool: parfn.Pool) -> None:
    # More nested maps than the cluster has threads; none starts a process pool there.
    assert pool.map(nested_cubes, [3] * 6) == [([0, 1, 8], 8, False)] * 6


def test_imap_and_imap_unordered(pool: parfn.Pool) -> None:
    assert list(pool.imap(square, range(50), chunksize=3)) == [x * x for x in range(50)]
    assert sorted(pool.imap_unordered(square, range(50))) == [x * x for x in range(50)]
    assert pool.map(square, range(30), progress=True) == [x * x for x in range(30)]
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        while True:
            pulled += 1
            yield pulled

    it = pool.imap(square, endless(), chunksize=4)
    assert [next(it) for _ in range(20)] == [x * x for x in range(1, 21)]
    read = pulled
    time.sleep(0.2)  # give it time to read on, if it would
    assert pulled == read, "imap kept reading input while nobody asked for results"
    assert read < 20 + 2 * pool.workers * 4096, f"imap read {read} items ahead"
    it.close()  # type: ignore[attr-defined]


def test_a_big_map_is_batched_into_few_dask_tasks(pool: parfn.Pool, cluster: Any) -> None:
    assert pool.map(batched_identity, range(100_000)) == list(range(100_000))
    tasks = cluster.scheduler.task_prefixes["batched_identity"].state_counts["processing"]
    assert 0 < tasks < 1_000, f"{tasks} Dask tasks for a 100,000-item map"


def test_remote_exceptions_and_return_exceptions(pool: parfn.Pool) -> None:
    with pytest.raises(ValueError, match="bad item 3") as info:
        pool.apply(fail_on, 3)
    cause = str(info.value.__cause__)
    assert "fail_on" in cause and "_execute.py" not in cause, cause
    out = pool.map(fail_on, range(6), return_exceptions=True, chunksize=3)
    assert out[:3] == [0, 1, 2] and out[4:] == [4, 5]
    assert isinstance(out[3], ValueError)
    with pytest.raises(ValueError, match="bad item 3"):
        pool.map(fail_on, range(10))
    it = pool.imap(fail_on, range(6), chunksize=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3"):
        next(it)


def test_unpicklable_argument_and_result(pool: parfn.Pool) -> None:
    import threading

    with pytest.raises(parfn.SerializationError, match="argument 1"):
        pool.apply(square, threading.Lock())
    out = pool.map(lambda x: threading.Lock() if x == 1 else x, range(3), return_exceptions=True)
    assert out[0] == 0 and out[2] == 2
    assert isinstance(out[1], parfn.SerializationError) and "the result" in str(out[1])


def test_retries_rerun_an_item_that_raised_at_most_that_many_times(
    pool: parfn.Pool, tmp_path: Path
) -> None:
    ok = tmp_path / "ok"
    assert pool.apply(parallel(count_then, retries=2), str(ok), "raise", 2) == "ok after 3"
    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="attempt 2 fails"):
        pool.apply(parallel(count_then, retries=1), str(failed), "raise", 5)
    assert _calls(failed) == 2


def test_timeout_raises_task_timeout_and_fails_only_its_item(
    pool: parfn.Pool, tmp_path: Path
) -> None:
    slow = parallel(sleep_then, timeout=0.3)
    with pytest.raises(
        parfn.TaskTimeout, match=re.escape("sleep_then() ran past its timeout")
    ) as info:
        pool.apply(slow, 1.5)
    assert isinstance(info.value, TimeoutError)
    out = pool.map(slow, [0.0, 1.5, 0.0], [0, 1, 2], return_exceptions=True)
    assert out[0] == 0 and out[2] == 2 and isinstance(out[1], parfn.TaskTimeout)
    path = tmp_path / "calls"
    with pytest.raises(parfn.TaskTimeout):
        pool.apply(parallel(count_then, timeout=0.3, retries=1), str(path), "sleep", 9)
    assert _calls(path) == 2
    assert pool.apply(square, 7) == 49


def test_address_connects_to_a_running_scheduler(cluster: Any, client: Any) -> None:
    with parfn.Pool(backend="dask", address=cluster.scheduler_address) as p:
        assert p.map(square, range(5)) == [0, 1, 4, 9, 16]
        own = p._backend._client  # type: ignore[attr-defined]
    assert own.status == "closed", "parfn's own Client to the address was left open"
    assert client.submit(square, 3, pure=False).result(timeout=T) == 9  # cluster still up


def test_a_users_client_is_left_open_and_the_pool_closed(client: Any) -> None:
    p = parfn.Pool(backend="dask", client=client)
    assert p.apply(square, 2) == 4
    p.shutdown()
    p.shutdown()  # a second time does nothing
    assert client.status == "running"
    assert client.submit(square, 3, pure=False).result(timeout=T) == 9
    with pytest.raises(parfn.PoolClosed):
        p.apply(square, 2)


def test_shutdown_waits_for_submitted_tasks(pool: parfn.Pool) -> None:
    tasks = [pool.spawn(sleep_then, 0.05, i) for i in range(6)]
    pool.shutdown(wait=True)
    assert [t.result(timeout=0) for t in tasks] == list(range(6))


# -- clusters started here: crashes, initializer, cancel, close ---------------------


def test_a_killed_worker_fails_its_item_alone_and_the_pool_goes_on(tmp_path: Path) -> None:
    with parfn.Pool(2, backend="dask") as p:
        cluster = p._backend._conn.cluster  # type: ignore[attr-defined]
        with pytest.raises(parfn.WorkerCrashed, match=re.escape("kill_on()")) as info:
            p.apply(kill_on, 2)
        assert isinstance(info.value, BrokenProcessPool)
        assert p.apply(square, 3) == 9
        out = p.map(kill_on, range(5), chunksize=5, return_exceptions=True)
        assert out[:2] == [0, 1] and out[3:] == [3, 4]
        assert isinstance(out[2], parfn.WorkerCrashed)
        path = tmp_path / "calls"
        assert p.apply(parallel(count_then, retries=1), str(path), "kill", 1) == "ok after 2"
    assert cluster.status.name == "closed", "the LocalCluster parfn started is still running"


def test_crash_retries_count_the_runs_a_users_cluster_made(tmp_path: Path) -> None:
    # A cluster that re-runs a task once when its worker dies: that run counts.
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 1}),
        distributed.LocalCluster(n_workers=2, **CLUSTER) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
        parfn.Pool(backend="dask", client=client) as p,
    ):
        crashing = tmp_path / "crashing"
        with pytest.raises(parfn.WorkerCrashed):
            p.apply(parallel(count_then, retries=1), str(crashing), "kill", 9)
        assert _calls(crashing) == 2
        recovering = tmp_path / "recovering"
        assert p.apply(parallel(count_then, retries=2), str(recovering), "kill", 2) == (
            "ok after 3"
        )


def test_initializer_and_leaving_by_an_exception(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="boom"),
        parfn.Pool(1, backend="dask", initializer=set_env, initargs=("hi",)) as p,
    ):
        cluster = p._backend._conn.cluster  # type: ignore[attr-defined]
        assert p.map(read_env, range(4), chunksize=1) == ["hi"] * 4
        running = p.spawn(sleep_then, 30)
        queued = p.spawn(sleep_then, 30)
        waiting = p.spawn(sleep_then, 30)  # beyond the two per worker sent to Dask
        assert waiting.cancel()
        time.sleep(0.2)
        raise RuntimeError("boom")
    assert queued.cancelled() and waiting.cancelled()
    with pytest.raises(CancelledError):
        running.result(timeout=T)
    assert cluster.status.name == "closed"


def test_initializer_on_a_users_cluster_is_removed_at_shutdown(client: Any) -> None:
    with parfn.Pool(backend="dask", client=client, initializer=set_env, initargs=("x",)) as p:
        assert set(p.map(read_env, range(4), chunksize=1)) == {"x"}
        name = p._backend._conn.plugin_name  # type: ignore[attr-defined]
    plugins = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins))
    assert name not in plugins


# -- options and the missing extra -----------------------------------------------------


def test_bad_options(client: Any) -> None:
    with pytest.raises(ValueError, match="workers= sets the size"):
        parfn.Pool(2, backend="dask", client=client)
    with pytest.raises(ValueError, match="not both"):
        parfn.Pool(backend="dask", client=client, address="tcp://127.0.0.1:1")
    with pytest.raises(TypeError, match=re.escape("distributed.Client")):
        parfn.Pool(backend="dask", client="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="process backend only"):
        parfn.Pool(backend="dask", start_method="spawn")
    with pytest.raises(ValueError, match="process backend only"):
        parfn.Pool(backend="dask", max_tasks_per_worker=3)


def test_without_distributed_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'parfn[dask]'")):
        parfn.Pool(backend="dask")
