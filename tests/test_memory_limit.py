"""max_memory_per_worker, MemoryLimitExceeded and the OOM killer (contract, section 9)."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import parfn
from parfn.backends.process import _memory, _oom
from parfn.backends.process._memory import format_bytes, parse_memory_limit, watch_memory

from ._scripts import SCRIPT_METHODS, run_script
from .conftest import START_METHODS

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the memory limit reads Linux's /proc"
)

MiB = 2**20
LIMIT = 200 * MiB

# -- what the workers run ---------------------------------------------------------------

_leaked: list[bytearray] = []


def leak(i: int) -> tuple[int, int]:
    """Keep 40 MiB more in this worker at each call (filled: resident)."""
    _leaked.append(bytearray(b"x") * (40 * MiB))
    return i, os.getpid()


def hog(i: int, mib: int = 400) -> int:
    """Item 3 holds ``mib`` MiB for a while; the others are small."""
    if i != 3:
        return i
    block = bytearray(b"x") * (mib * MiB)
    time.sleep(3)
    return len(block)


def die(_: object = None) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# -- the limit's value ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (4096, 4096),
        ("512MiB", 512 * MiB),
        ("512 mib", 512 * MiB),
        ("2GB", 2 * 10**9),
        ("1.5GiB", 3 * 2**29),
        ("100k", 100_000),
        ("64 B", 64),
        ("12345", 12345),
        (None, None),
    ],
)
def test_limits_in_bytes_or_units(value: object, size: int | None) -> None:
    assert parse_memory_limit(value) == size


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("lots", ValueError, "a size such as '512MiB' or '2GB', not 'lots'"),
        ("12 XB", ValueError, "not '12 XB'"),
        ("-5MB", ValueError, "not '-5MB'"),
        ("", ValueError, "not ''"),
        (0, ValueError, "above 0 bytes, not 0"),
        (-1, ValueError, "above 0 bytes"),
        ("0.1B", ValueError, "above 0 bytes"),
        (True, TypeError, "an int of bytes or a string such as '512MiB', not bool True"),
        (1.5e9, TypeError, "not float"),
        ([512], TypeError, "not list"),
    ],
)
def test_bad_limits_say_what_is_wrong(value: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        parfn.Pool(1, max_memory_per_worker=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["thread", "serial"])
def test_the_limit_is_for_the_process_backend(backend: str) -> None:
    with pytest.raises(ValueError, match="max_memory_per_worker applies to the process backend"):
        parfn.Pool(1, backend=backend, max_memory_per_worker="1GiB")


def test_sizes_read_back() -> None:
    assert format_bytes(LIMIT) == "200 MiB"
    assert format_bytes(3 * 2**29) == "1.5 GiB"


# -- during a task, after a task --------------------------------------------------------------


@pytest.mark.parametrize("method", START_METHODS)
def test_a_task_that_goes_over_fails_alone_and_the_next_runs(method: str) -> None:
    with parfn.Pool(2, start_method=method, max_memory_per_worker=LIMIT) as pool:
        results = pool.map(hog, range(8), return_exceptions=True)
        error = results[3]
        assert isinstance(error, parfn.MemoryLimitExceeded)
        assert isinstance(error, parfn.WorkerCrashed)
        assert error.limit == LIMIT and error.seen > LIMIT
        assert "hog() went over the memory limit" in str(error)
        assert "max_memory_per_worker=200 MiB" in str(error)
        assert format_bytes(error.seen) in str(error)
        assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5, 6, 7]
        assert pool.apply(hog, 1) == 1


@pytest.mark.parametrize("call", ["apply", "spawn"])
def test_a_call_straight_to_an_idle_worker_is_watched_too(call: str) -> None:
    """apply() talks to an idle worker from the caller's thread, spawn() sends it
    there at once: the manager must still watch that worker's memory."""
    with parfn.Pool(1, max_memory_per_worker=LIMIT) as pool:
        assert pool.apply(hog, 0) == 0  # the worker is started and idle
        with pytest.raises(parfn.MemoryLimitExceeded):
            if call == "apply":
                pool.apply(hog, 3)
            else:
                pool.spawn(hog, 3).result(timeout=30)
        assert pool.apply(hog, 2) == 2


def test_retries_run_it_again() -> None:
    with parfn.Pool(1, max_memory_per_worker=LIMIT) as pool:
        with pytest.raises(parfn.MemoryLimitExceeded):
            pool.apply(parfn.parallel(hog, retries=1), 3)
        assert pool.apply(hog, 3, 10) == 10 * MiB


@pytest.fixture
def after_tasks_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No look at a worker's memory while it runs (only the first, when it
    starts): what remains is the check after each task."""
    monkeypatch.setattr(_memory, "PERIOD", 3600.0)
    monkeypatch.setattr(_memory, "MIN_PERIOD", 3600.0)
    yield


@pytest.mark.usefixtures("after_tasks_only")
@pytest.mark.parametrize("method", START_METHODS)
def test_a_leaking_worker_is_recycled_after_a_task_and_its_result_kept(method: str) -> None:
    with parfn.Pool(1, start_method=method, max_memory_per_worker=LIMIT) as pool:
        results = pool.map(leak, range(12), chunksize=1)
    assert [i for i, _ in results] == list(range(12))
    pids = [pid for _, pid in results]
    # A worker leaks 40 MiB a task: above 200 MiB of its own after 5 or 6.
    assert len(set(pids)) >= 2
    assert max(pids.count(p) for p in set(pids)) <= 6


def test_no_timer_without_a_limit_or_a_busy_worker() -> None:
    with parfn.Pool(1) as pool:
        assert watch_memory(pool._backend) is None
    with parfn.Pool(1, max_memory_per_worker=LIMIT) as pool:
        pool.apply(abs, 1)
        assert watch_memory(pool._backend) is None


# -- a user's script ----------------------------------------------------------------------

SCRIPT = """
    import os, sys, time
    import numpy as np
    import parfn
    METHOD = None if sys.argv[1] == "default" else sys.argv[1]

    @parfn.parallel
    def work(i):
        if i == 5:
            block = np.ones(400 * 2**20 // 8)  # 400 MiB: over the limit
            time.sleep(3)
            return 0
        return i, os.getpid()

    if __name__ == "__main__":
        data = np.ones(300 * 2**20 // 8)  # the caller's own: a forked worker maps it too
        with parfn.Pool(2, start_method=METHOD, max_memory_per_worker="250MiB"):
            results = work.map(range(12), chunksize=1, return_exceptions=True)
            error = results.pop(5)
            print(type(error).__name__, error.limit, error.seen > error.limit)
            print("others", [r[0] for r in results])
            print("workers", len({r[1] for r in results}))
            print("next", work.apply(1)[0])
"""


@pytest.mark.parametrize("method", SCRIPT_METHODS)
def test_a_script(tmp_path: Path, method: str) -> None:
    pytest.importorskip("numpy")
    out = run_script(tmp_path, SCRIPT, method, timeout=120).stdout.splitlines()
    assert out[0] == f"MemoryLimitExceeded {250 * MiB} True"
    assert out[1] == "others [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]"
    # A forked worker maps the caller's 300 MiB, but they are not its own:
    # only the worker of item 5 is replaced (at most 3 pids in all). On the
    # resident set, every forked worker would be recycled after every task.
    assert int(out[2].split()[1]) <= 3
    assert out[3] == "next 1"


# -- the kernel's OOM killer --------------------------------------------------------------------


@pytest.fixture
def oom_count(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int | None]]:
    """The cgroup's oom_kill count, as the test sets it (the kernel's is not the test's)."""
    count: list[int | None] = [7]
    monkeypatch.setattr(_oom, "read_oom_kills", lambda: count[0])
    yield count


def test_a_sigkill_the_oom_killer_counted_says_so(oom_count: list[int | None]) -> None:
    with parfn.Pool(2) as pool:
        pool.map(abs, [1, 2])  # the manager has read the count: 7
        oom_count[0] = 9  # two OOM kills
        errors = [pool.spawn(die) for _ in range(3)]
        texts = sorted(str(t.exception(timeout=30)) for t in errors)
    assert all(re.match(r"the worker process \d+ running die\(\) died", t) for t in texts)
    by_oom = [t for t in texts if "killed by the kernel's out-of-memory killer" in t]
    assert len(by_oom) == 2
    (other,) = [t for t in texts if t not in by_oom]
    assert "killed by SIGKILL (not by the out-of-memory killer" in other


def test_without_a_count_it_may_have_been_the_oom_killer(oom_count: list[int | None]) -> None:
    oom_count[0] = None
    with parfn.Pool(1) as pool:
        with pytest.raises(parfn.WorkerCrashed, match=r"killed by SIGKILL \(maybe by the out"):
            pool.apply(die)


def test_the_count_is_found_where_the_kernel_keeps_it() -> None:
    with open("/proc/self/cgroup") as f:
        cgroups = f.read()
    if not any(line.split(":")[1] in ("", "memory") for line in cgroups.splitlines()):
        pytest.skip("no cgroup here")
    path = _oom.counter_file()
    if path is None:
        pytest.skip(f"no memory controller for this process's cgroup: {cgroups!r}")
    assert path.endswith(("memory.events", "memory.oom_control"))
    count = _oom.read_oom_kills()
    assert isinstance(count, int) and count >= 0
