"""threads_per_worker: the numerical libraries' thread pools in each worker (contract, section 9).

Seen from inside the workers of a user's script, under every start method:
the six variables, and what threadpoolctl reports of the BLAS numpy loaded
(before the pool started, so that forked workers inherit it loaded, or only
inside the task).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import parfn
from parfn._wire.threadcaps import VARIABLES, default_threads_per_worker, thread_caps

from ._scripts import SCRIPT_METHODS, run_script
from .conftest import FORK_WARNING

pytest.importorskip("numpy")
pytest.importorskip("threadpoolctl")

CPUS = len(os.sched_getaffinity(0))
CAP = max(1, CPUS // 2)  # the default, for 2 workers
OTHER = CAP + 1  # a count that is not the default (OpenBLAS starts at most one per CPU)
needs_two_cpus = pytest.mark.skipif(CPUS < 2, reason="one CPU: no count but the default")

SCRIPT = """
    import json, os, sys
    {numpy_at_top}
    {setup}
    import parfn
    METHOD = None if sys.argv[1] == "default" else sys.argv[1]
    VARIABLES = {variables!r}

    @parfn.parallel
    def caps(_):
        import numpy
        from threadpoolctl import threadpool_info

        numpy.ones((64, 64)) @ numpy.ones((64, 64))
        blas = {{i["internal_api"]: i["num_threads"] for i in threadpool_info()}}
        return {{v: os.environ.get(v) for v in VARIABLES}}, blas

    if __name__ == "__main__":
        with parfn.Pool(2, start_method=METHOD, {options}):
            seen = caps.map(range(6), chunksize=1)
        print(json.dumps({{"workers": seen, "caller": caps(0)}}))
"""


def _run(
    folder: Path,
    method: str,
    *,
    numpy_at_top: bool = True,
    options: str = "",
    env: dict[str, str] | None = None,
    setup: str = "",
) -> dict[str, Any]:
    source = SCRIPT.format(
        numpy_at_top="import numpy" if numpy_at_top else "",
        setup=setup,
        variables=VARIABLES,
        options=options,
    )
    out = run_script(folder, source, method, env=env, unset=VARIABLES, timeout=120).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def _each_worker(result: dict[str, Any]) -> list[tuple[dict[str, str | None], dict[str, int]]]:
    return [(env, blas) for env, blas in result["workers"]]


@pytest.mark.parametrize("method", SCRIPT_METHODS)
def test_workers_are_capped_at_cpus_over_workers(tmp_path: Path, method: str) -> None:
    """numpy loaded before the pool: forked workers inherit OpenBLAS already
    started, and are limited all the same."""
    result = _run(tmp_path, method)
    for env, blas in _each_worker(result):
        assert env == dict.fromkeys(VARIABLES, str(CAP))
        assert blas and set(blas.values()) == {CAP}, blas
    caller_env, _ = result["caller"]
    assert caller_env == dict.fromkeys(VARIABLES)  # the caller is left alone


def test_libraries_loaded_after_start_up_read_the_variables(tmp_path: Path) -> None:
    result = _run(tmp_path, "default", numpy_at_top=False)
    for env, blas in _each_worker(result):
        assert env == dict.fromkeys(VARIABLES, str(CAP))
        assert set(blas.values()) == {CAP}


def _numpy_uses_openblas() -> bool:
    import numpy
    from threadpoolctl import threadpool_info

    numpy.ones(1)
    return any(i["internal_api"] == "openblas" for i in threadpool_info())


@needs_two_cpus
@pytest.mark.skipif(not _numpy_uses_openblas(), reason="numpy is not built on OpenBLAS here")
@pytest.mark.parametrize("method", ["default", "fork", "spawn"])
def test_a_variable_the_user_set_is_left_as_it_is(tmp_path: Path, method: str) -> None:
    result = _run(tmp_path, method, env={"OPENBLAS_NUM_THREADS": str(OTHER)})
    for env, blas in _each_worker(result):
        assert env["OPENBLAS_NUM_THREADS"] == str(OTHER)
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(CAP)
        assert blas["openblas"] == OTHER


@needs_two_cpus
@pytest.mark.skipif(not _numpy_uses_openblas(), reason="numpy is not built on OpenBLAS here")
@pytest.mark.parametrize("method", SCRIPT_METHODS)
def test_a_variable_set_after_numpy_loaded_holds_in_the_workers(
    tmp_path: Path, method: str
) -> None:
    """What importing Dask does: the script sets the variable to 1 once OpenBLAS
    has loaded (with a thread per CPU), too late for this process's OpenBLAS;
    the workers' follows it all the same (forked ones have OpenBLAS loaded
    already, from the script). Two workers but three threads each, so that the
    1 is the variable's, not the default cap."""
    setup = "os.environ['OPENBLAS_NUM_THREADS'] = '1'"
    result = _run(tmp_path, method, setup=setup, options="threads_per_worker=3")
    for env, blas in _each_worker(result):
        assert env["OPENBLAS_NUM_THREADS"] == "1"
        assert env["OMP_NUM_THREADS"] == "3"
        assert blas["openblas"] == 1


@needs_two_cpus
@pytest.mark.parametrize("method", ["default", "spawn"])
def test_an_explicit_cap(tmp_path: Path, method: str) -> None:
    result = _run(tmp_path, method, options=f"threads_per_worker={OTHER}")
    for env, blas in _each_worker(result):
        assert env == dict.fromkeys(VARIABLES, str(OTHER))
        assert set(blas.values()) == {OTHER}


def test_the_executor_gets_the_same_default(tmp_path: Path) -> None:
    source = """
        import json, os, sys
        import numpy
        from parfn import ProcessPoolExecutor
        from threadpoolctl import threadpool_info

        def caps(_):
            return os.environ.get("OMP_NUM_THREADS"), threadpool_info()[0]["num_threads"]

        if __name__ == "__main__":
            with ProcessPoolExecutor(2) as ex:
                print(json.dumps(list(ex.map(caps, range(4)))))
    """
    seen = json.loads(run_script(tmp_path, source, "default", unset=VARIABLES, timeout=120).stdout)
    assert seen == [[str(CAP), CAP]] * 4


def _variables(_: object = None) -> dict[str, str | None]:
    return {v: os.environ.get(v) for v in VARIABLES}


@pytest.mark.parametrize("backend", ["thread", "serial"])
def test_thread_and_serial_backends_change_nothing(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in VARIABLES:
        monkeypatch.delenv(var, raising=False)
    with parfn.Pool(2, backend=backend) as pool:
        assert pool.map(_variables, range(4)) == [dict.fromkeys(VARIABLES)] * 4


@pytest.mark.filterwarnings(FORK_WARNING)
def test_a_forked_pool_made_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit pool of this process: the caps are those of when it was made."""
    for var in VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NUMEXPR_NUM_THREADS", "5")
    with parfn.Pool(2, start_method="fork", threads_per_worker=2) as pool:
        monkeypatch.setenv("BLIS_NUM_THREADS", "7")  # after the pool was made: not the user's
        seen = pool.map(_variables, range(4), chunksize=1)
    expected = {**dict.fromkeys(VARIABLES, "2"), "NUMEXPR_NUM_THREADS": "5"}
    assert seen == [expected] * 4


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_bad_threads_per_worker(bad: object) -> None:
    with pytest.raises(ValueError, match="threads_per_worker must be an int >= 1"):
        parfn.Pool(1, threads_per_worker=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["thread", "serial"])
def test_threads_per_worker_is_for_the_process_backend(backend: str) -> None:
    with pytest.raises(ValueError, match="threads_per_worker applies to the process backend"):
        parfn.Pool(1, backend=backend, threads_per_worker=1)


def test_the_variables_to_set() -> None:
    assert default_threads_per_worker(1) == CPUS
    assert default_threads_per_worker(CPUS + 1) == 1
    assert thread_caps(2, {}) == dict.fromkeys(VARIABLES, "2")
    user = {"MKL_NUM_THREADS": "4", "OMP_NUM_THREADS": ""}  # empty: unset, as libraries read it
    assert thread_caps(1, user) == {v: "1" for v in VARIABLES if v != "MKL_NUM_THREADS"}
