"""parfn.WorkerLocal: built once per worker process, on first use (contract, section 9).

Every build appends a line to a file (the pid that built it), so the tests
count builds wherever they happened.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import parfn

from ._scripts import SCRIPT_METHODS, run_script
from .conftest import FORK_WARNING, START_METHODS


def build(log: str, pause: float = 0.0) -> dict[str, Any]:
    """The expensive set-up: records who built it."""
    if pause:
        time.sleep(pause)
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    return {"pid": os.getpid(), "token": os.urandom(8).hex()}


def builds(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def _reader(local: parfn.WorkerLocal[dict[str, Any]], pause: float = 0.0) -> Any:
    def read(_: object) -> tuple[int, int, str]:
        value = local.value
        time.sleep(pause)
        return os.getpid(), value["pid"], value["token"]

    return read


def test_built_once_per_process_on_every_backend(pool: parfn.Pool, tmp_path: Path) -> None:
    log = tmp_path / "builds"
    local = parfn.WorkerLocal(build, str(log))
    seen = pool.map(_reader(local), range(40), chunksize=1)
    pids = {pid for pid, _, _ in seen}
    assert all(pid == built_by for pid, built_by, _ in seen)  # its own, built there
    tokens = {pid: {t for p, _, t in seen if p == pid} for pid in pids}
    assert all(len(t) == 1 for t in tokens.values()), tokens  # one value per process
    assert sorted(builds(log)) == sorted(pids)  # one build per process that used it


def test_not_built_until_used(tmp_path: Path) -> None:
    log = tmp_path / "builds"
    local = parfn.WorkerLocal(build, str(log))
    with parfn.Pool(2) as pool:
        pool.map(abs, range(10))
        pickle.loads(pickle.dumps(local))
    assert builds(log) == []
    assert "not built" in repr(local)


@pytest.mark.parametrize("method", START_METHODS)
def test_rebuilt_in_each_replaced_worker(method: str, tmp_path: Path) -> None:
    log = tmp_path / "builds"
    local = parfn.WorkerLocal(build, str(log))
    with parfn.Pool(1, start_method=method, max_tasks_per_worker=2) as pool:
        seen = pool.map(_reader(local, pause=0.02), range(6), chunksize=1)
    pids = [pid for pid, _, _ in seen]
    assert len(set(pids)) == 3  # three workers, two tasks each (not quick: none coalesced)
    assert sorted(builds(log)) == sorted(set(pids))


def test_rebuilt_after_a_crash(tmp_path: Path) -> None:
    log = tmp_path / "builds"
    local = parfn.WorkerLocal(build, str(log))

    def use_then_die(die: bool) -> int:
        _ = local.value
        if die:
            os._exit(3)
        return os.getpid()

    with parfn.Pool(1) as pool:
        first = pool.apply(use_then_die, False)
        with pytest.raises(parfn.WorkerCrashed):
            pool.apply(use_then_die, True)
        second = pool.apply(use_then_die, False)
    assert first != second
    assert builds(log) == [first, second]


def test_in_the_caller_built_once_across_threads(tmp_path: Path) -> None:
    log = tmp_path / "builds"
    local = parfn.WorkerLocal(build, str(log), pause=0.2)
    values = []
    threads = [threading.Thread(target=lambda: values.append(local.value)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(values) == 8 and all(v is values[0] for v in values)
    assert builds(log) == [os.getpid()]
    assert local.value is values[0]
    assert "built here" in repr(local)


def test_copies_in_one_process_share_the_value(tmp_path: Path) -> None:
    local = parfn.WorkerLocal(build, str(tmp_path / "builds"))
    copy = pickle.loads(pickle.dumps(local))
    assert copy.value is local.value


@pytest.mark.filterwarnings(FORK_WARNING)
def test_a_forked_worker_builds_its_own(tmp_path: Path) -> None:
    log = tmp_path / "builds"
    local = parfn.WorkerLocal(build, str(log))
    mine = local.value  # built here, before the fork
    with parfn.Pool(1, start_method="fork") as pool:
        pid, built_by, token = pool.apply(_reader(local), 0)
    assert pid == built_by != os.getpid() and token != mine["token"]
    assert builds(log) == [os.getpid(), pid]


def test_a_factory_that_raises_is_tried_again(tmp_path: Path) -> None:
    attempts = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("not yet")
        return "connected"

    local = parfn.WorkerLocal(flaky)
    with pytest.raises(ConnectionError):
        _ = local.value
    assert local.value == "connected" and len(attempts) == 2


def test_a_factory_that_reads_its_own_value() -> None:
    local: parfn.WorkerLocal[int] = parfn.WorkerLocal(lambda: local.value + 1)
    with pytest.raises(RuntimeError, match="read the WorkerLocal's own .value while building it"):
        _ = local.value


def test_the_factory_must_be_callable() -> None:
    with pytest.raises(TypeError, match="WorkerLocal needs a callable"):
        parfn.WorkerLocal(42)  # type: ignore[call-overload]


# -- a user's script: a module global, and a closure -----------------------------------------

SCRIPT = """
    import os, sys
    import parfn
    METHOD = None if sys.argv[1] == "default" else sys.argv[1]
    LOG = os.environ["BUILD_LOG"]

    class Model:
        def __init__(self, path):
            with open(LOG, "a") as f:
                f.write(f"{os.getpid()}\\n")
            self.pid = os.getpid()
            self.lock = __import__("threading").Lock()  # not picklable: never pickled

        def predict(self, x):
            return x * 2, self.pid

    model = parfn.WorkerLocal(Model, "weights.bin")

    @parfn.parallel
    def predict(x):
        return (*model.value.predict(x), os.getpid())

    def make_scorer(offset):
        table = parfn.WorkerLocal(dict, offset=offset)

        def score(x):
            return x + table.value["offset"]
        return score

    if __name__ == "__main__":
        with parfn.Pool(2, start_method=METHOD, max_tasks_per_worker=5):
            out = predict.map(range(20), chunksize=1)
            scores = parfn.parallel(make_scorer(100)).map(range(3))
        pids = {pid for _, _, pid in out}
        with open(LOG) as f:
            built = sorted(int(line) for line in f)
        print("results", [value for value, _, _ in out] == [2 * x for x in range(20)])
        print("own", all(built_by == pid for _, built_by, pid in out))
        print("once per worker", built == sorted(pids))
        print("scores", scores)
"""


@pytest.mark.parametrize("method", SCRIPT_METHODS)
def test_a_script_with_a_model_per_worker(tmp_path: Path, method: str) -> None:
    log = tmp_path / "builds"
    out = run_script(tmp_path, SCRIPT, method, env={"BUILD_LOG": str(log)}, timeout=120).stdout
    assert out.splitlines() == [
        "results True",
        "own True",
        "once per worker True",
        "scores [100, 101, 102]",
    ]
    assert len(builds(log)) >= 4  # 20 tasks, 5 per worker
