"""parfn.joblib (docs/contract.md section 11): joblib's ``"parfn"`` backend.

Tested as Ray's and joblib-spark's backends are: results equal a sequential
run, the first error propagates and stops the running tasks, generators,
scikit-learn with ``n_jobs=2``, inner thread caps, nested calls; and a
user's script under each start method.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

joblib = pytest.importorskip("joblib", reason="needs pip install 'parfn[joblib]'")

import parfn.joblib  # noqa: E402 (after the skip)

from ._scripts import SCRIPT_METHODS, run_script  # noqa: E402

T = 30


@pytest.fixture(autouse=True)
def backend() -> Iterator[None]:
    parfn.joblib.register()
    yield
    parfn.joblib.shutdown()  # the pool kept between Parallel calls


def run(tasks: list[object], n_jobs: int = 2, **kw: object) -> list[object]:
    with joblib.parallel_config(backend="parfn", n_jobs=n_jobs):
        return list(joblib.Parallel(**kw)(tasks))


def square(x: int) -> int:
    return x * x


def test_register_is_idempotent() -> None:
    parfn.joblib.register()
    parfn.joblib.register()
    assert run([joblib.delayed(square)(3)]) == [9]


def test_results_equal_a_sequential_run() -> None:
    tasks = [joblib.delayed(square)(x) for x in range(200)]
    expected = joblib.Parallel(n_jobs=1)(tasks)
    assert run(tasks) == expected
    assert run(tasks, batch_size=7) == expected
    assert run([joblib.delayed(lambda x: -x)(x) for x in range(5)]) == [0, -1, -2, -3, -4]
    assert run([joblib.delayed(square)(x) for x in range(3)], n_jobs=-1) == [0, 1, 4]
    assert run([]) == []


def test_the_work_runs_in_worker_processes() -> None:
    pids = set(run([joblib.delayed(os.getpid)() for _ in range(20)], batch_size=1))
    assert os.getpid() not in pids


def slow_then_flag(folder: str, name: str, seconds: float) -> str:
    Path(folder, f"{name}.started").touch()
    time.sleep(seconds)
    Path(folder, f"{name}.finished").touch()
    return name


def fail_once_started(folder: str, name: str) -> None:
    deadline = time.monotonic() + T
    while not Path(folder, f"{name}.started").exists():  # the other task is running
        assert time.monotonic() < deadline
        time.sleep(0.01)
    raise KeyError("the first error")


def test_the_first_error_propagates_and_running_tasks_are_stopped(tmp_path: Path) -> None:
    folder = str(tmp_path)
    tasks = [
        joblib.delayed(slow_then_flag)(folder, "slow", 3),
        joblib.delayed(fail_once_started)(folder, "slow"),
        *(joblib.delayed(slow_then_flag)(folder, f"queued{i}", 0) for i in range(4)),
    ]
    start = time.monotonic()
    with pytest.raises(KeyError, match="the first error"):
        run(tasks, batch_size=1, pre_dispatch="all")
    assert time.monotonic() - start < 3  # not after the slow task's 3 s
    assert Path(folder, "slow.started").exists()
    time.sleep(4)  # past the slow task's end, had it been left running
    assert not Path(folder, "slow.finished").exists()
    # The backend is ready again at once.
    assert run([joblib.delayed(square)(4)]) == [16]


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_generators(return_as: str) -> None:
    with joblib.parallel_config(backend="parfn", n_jobs=2):
        out = joblib.Parallel(return_as=return_as)(joblib.delayed(square)(x) for x in range(30))
        assert not isinstance(out, list)
        values = list(out)
    expected = [x * x for x in range(30)]
    assert values == expected if return_as == "generator" else sorted(values) == expected


def test_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(multiprocessing.TimeoutError):  # joblib's choice, whatever the backend
        run([joblib.delayed(time.sleep)(10)], timeout=0.5)
    assert time.monotonic() - start < 10


def inner_threads(_: object) -> tuple[str | None, str | None, dict[str, int]]:
    import numpy  # noqa: F401 (loads its BLAS, whose threads threadpoolctl sees)
    from threadpoolctl import threadpool_info

    blas = {i["internal_api"]: i["num_threads"] for i in threadpool_info()}
    return os.environ.get("OMP_NUM_THREADS"), os.environ.get("OPENBLAS_NUM_THREADS"), blas


def _expected(inner: int) -> tuple[str, str]:
    """OMP_NUM_THREADS and OPENBLAS_NUM_THREADS in a worker: ``inner``, unless
    this process has the variable set (importing Dask sets them to 1), which is
    left as it is."""
    return os.environ.get("OMP_NUM_THREADS") or str(inner), os.environ.get(
        "OPENBLAS_NUM_THREADS"
    ) or str(inner)


def test_inner_threads_are_capped() -> None:
    pytest.importorskip("threadpoolctl")
    pytest.importorskip("numpy")
    if "openblas" not in inner_threads(None)[2]:
        pytest.skip("numpy is not built on OpenBLAS here")
    default = max(1, joblib.cpu_count() // 2)
    for omp, openblas, blas in run([joblib.delayed(inner_threads)(i) for i in range(4)]):
        assert (omp, openblas) == _expected(default)
        assert blas["openblas"] == int(openblas)  # as the variable says
    for inner in (1, 2):  # on 2 CPUs, 2 differs from the default
        with joblib.parallel_config(backend="parfn", n_jobs=2, inner_max_num_threads=inner):
            for omp, openblas, blas in joblib.Parallel()(
                joblib.delayed(inner_threads)(i) for i in range(2)
            ):
                assert (omp, openblas) == _expected(inner)
                assert blas["openblas"] == int(openblas)


def nested(n: int) -> list[int]:
    return list(joblib.Parallel(n_jobs=2)(joblib.delayed(square)(x) for x in range(n)))


def test_nested_parallel_calls() -> None:
    assert run([joblib.delayed(nested)(n) for n in range(5)]) == [
        [x * x for x in range(n)] for n in range(5)
    ]


def test_scikit_learn_gives_the_same_scores() -> None:
    sklearn = pytest.importorskip("sklearn")
    del sklearn
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, cross_val_score

    x, y = make_classification(n_samples=200, n_features=8, random_state=0)
    model = LogisticRegression(max_iter=500)
    serial = cross_val_score(model, x, y, cv=4, n_jobs=1)
    with joblib.parallel_config(backend="parfn"):
        parallel = cross_val_score(model, x, y, cv=4, n_jobs=2)
    assert list(parallel) == list(serial)

    grid = {"C": [0.1, 1.0, 10.0]}
    one = GridSearchCV(model, grid, cv=3, n_jobs=1).fit(x, y)
    with joblib.parallel_config(backend="parfn"):
        two = GridSearchCV(model, grid, cv=3, n_jobs=2).fit(x, y)
    assert list(two.cv_results_["mean_test_score"]) == list(one.cv_results_["mean_test_score"])
    assert two.best_params_ == one.best_params_


SCRIPT = """
import os, sys
import joblib
import parfn.joblib

def cube(x):
    return x ** 3

if __name__ == "__main__":
    parfn.joblib.register()
    method = sys.argv[1]
    options = {} if method == "default" else {"start_method": method}
    with joblib.parallel_config(backend="parfn", n_jobs=2, **options):
        values = joblib.Parallel()(joblib.delayed(cube)(x) for x in range(6))
        pids = set(joblib.Parallel(batch_size=1)(joblib.delayed(os.getpid)() for _ in range(8)))
    print(values, os.getpid() in pids)
"""


@pytest.mark.parametrize("method", SCRIPT_METHODS)
def test_a_users_script(tmp_path: Path, method: str) -> None:
    out = run_script(
        tmp_path, SCRIPT, method, flags=("-W", "ignore::DeprecationWarning"), timeout=120
    )
    assert out.stdout.strip() == "[0, 1, 8, 27, 64, 125] False"
