"""Fixtures shared by the suite.

* ``pool``: a 2-worker ``parfn.Pool`` for every backend and start method,
  written once and parametrised (``process-forkserver``, ``process-spawn``,
  ``process-fork``, ``thread``, ``serial``).
* ``process_pool``: the process backend only, for crash/timeout/cancel cases.
* An autouse fixture fails any test that leaves a child process behind.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

import parfn

# fork from a process that has threads (the pool's manager thread) is what
# Python 3.12+ warns about; the fork start method is tested all the same.
FORK_WARNING = "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"

START_METHODS = [
    pytest.param("forkserver", id="forkserver"),
    pytest.param("spawn", id="spawn"),
    pytest.param("fork", id="fork", marks=pytest.mark.filterwarnings(FORK_WARNING)),
]

BACKENDS = [
    pytest.param(("process", "forkserver"), id="process-forkserver"),
    pytest.param(("process", "spawn"), id="process-spawn"),
    pytest.param(
        ("process", "fork"), id="process-fork", marks=pytest.mark.filterwarnings(FORK_WARNING)
    ),
    pytest.param(("thread", None), id="thread"),
    pytest.param(("serial", None), id="serial"),
    pytest.param(
        ("dask", None),
        id="dask",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("distributed") is None,
            reason="needs pip install 'parfn[dask]'",
        ),
    ),
]


def child_env() -> dict[str, str]:
    """The environment for a child Python that must import ``tests`` and ``parfn``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def run_python(code: str, *args: str, timeout: float = 60) -> str:
    """Run ``code`` in a child Python; its stdout, after checking it exited 0."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def make_pool(backend: str, start_method: str | None, workers: int = 2, **kw: object) -> parfn.Pool:
    if backend == "process":
        return parfn.Pool(workers, start_method=start_method, **kw)  # type: ignore[arg-type]
    return parfn.Pool(workers, backend=backend, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def dask_client() -> Iterator[Any]:
    """One LocalCluster for the session, on loopback, with no dashboard."""
    distributed = pytest.importorskip("distributed")
    from parfn.backends.dask._cluster import local_cluster

    with (
        local_cluster(2) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield client


@pytest.fixture(params=BACKENDS)
def pool(request: pytest.FixtureRequest) -> Iterator[parfn.Pool]:
    backend, start_method = request.param
    if backend == "dask":
        with parfn.Pool(backend="dask", client=request.getfixturevalue("dask_client")) as p:
            yield p
        return
    with make_pool(backend, start_method) as p:
        yield p


@pytest.fixture(params=START_METHODS)
def process_pool(request: pytest.FixtureRequest) -> Iterator[parfn.Pool]:
    with parfn.Pool(2, start_method=request.param) as p:
        yield p


# -- no process outlives its test ------------------------------------------------


def _children_of(pid: int) -> dict[int, str]:
    """Every descendant of ``pid``: {pid: command line}, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue  # a zombie is dead already
        parents[int(entry)] = int(fields[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as f:
                        found[child] = f.read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    found[child] = "?"
                frontier.append(child)
    return found


def _is_helper(cmdline: str) -> bool:
    """multiprocessing's long-lived helpers (forkserver, resource tracker) are not workers."""
    return ("forkserver" in cmdline and "main(" in cmdline) or "resource_tracker" in cmdline


def _workers_alive() -> dict[int, str]:
    return {pid: cmd for pid, cmd in _children_of(os.getpid()).items() if not _is_helper(cmd)}


@pytest.fixture(autouse=True)
def no_orphans(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a worker process (or any other child) behind."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("pool") == ("dask", None):
        request.getfixturevalue("dask_client")  # its workers live for the session
    before = set(_workers_alive())
    yield
    parfn.shutdown()
    deadline = time.monotonic() + 5
    while True:
        left = {p: c for p, c in _workers_alive().items() if p not in before}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"child processes outlived the test: {left}"


if not sys.platform.startswith("linux"):  # pragma: no cover
    warnings.warn("the orphan check reads /proc and needs Linux", stacklevel=1)
