"""parfn.multiprocessing.Pool (docs/contract.md section 10): the stdlib Pool, on parfn.

CPython's own Pool tests run against it with ``scripts/cpython_pool_tests.py``;
these are parfn's own: the tutorial's programs as scripts, the standard
library's interface, and what parfn changes (crashes, lambdas, terminate).
"""

from __future__ import annotations

import inspect
import multiprocessing
import multiprocessing.pool
import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

import parfn
from parfn.multiprocessing import Pool

from . import funcs
from ._scripts import run_script
from .conftest import FORK_WARNING

T = 30  # seconds: every wait in a test is bounded
ROOT = Path(__file__).resolve().parent.parent

START_METHODS = [
    pytest.param("forkserver", id="forkserver"),
    pytest.param("spawn", id="spawn"),
    pytest.param("fork", id="fork", marks=pytest.mark.filterwarnings(FORK_WARNING)),
]


@pytest.fixture(params=START_METHODS)
def pool(request: pytest.FixtureRequest) -> Iterator[Pool]:
    with Pool(2, context=multiprocessing.get_context(request.param)) as p:
        yield p


# -- the tutorial, as users run it ------------------------------------------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize("method", ["default", "fork", "forkserver", "spawn"])
def test_the_tutorials_programs_run_with_only_the_import_changed(
    tmp_path: Path, method: str
) -> None:
    """examples/multiprocessing_tutorial.py, as a script, under each start method."""
    source = (ROOT / "examples" / "multiprocessing_tutorial.py").read_text()
    main = 'if __name__ == "__main__":\n'
    assert main in source
    if method != "default":
        source = source.replace(
            main,
            main
            + f"    import multiprocessing\n    multiprocessing.set_start_method({method!r})\n",
        )
    out = run_script(
        tmp_path,
        source,
        name="tutorial.py",
        flags=("-W", "ignore::DeprecationWarning"),
        env={"PYTHONUNBUFFERED": "1"},  # the parent's prints in order with the workers'
        timeout=120,
    )
    text = out.stdout
    # 1: map prints each item in a worker, then the list of None results.
    first, text = text.split("[None, None, None]\n", 1)
    assert sorted(first.replace("\n", "")) == ["2", "3", "4"]
    # 2: apply, one after another: 8 6 4 2, each after its worker's line.
    second, third = text.split("apply_async\n", 1)
    assert re.findall(r"^(\d)$", second, re.M) == ["8", "6", "4", "2"]
    assert len(re.findall(r"Task processed by Process \d+", second)) == 4
    assert "Time :" in second
    # 3: apply_async: four tasks of 1 s at once, on four workers; the results
    # in submission order.
    pids = re.findall(r"Task processed by Process (\d+)", third)
    assert len(set(pids)) == 4, third
    assert re.findall(r"Result: \d+", third) == [f"Result: {n}" for n in (0, 2, 4, 6)]
    assert "Time :" in third


def test_a_script_with_lambdas_and_a_crash(tmp_path: Path) -> None:
    """What parfn adds, in a user's script: a lambda works, a dead worker fails its task."""
    source = (
        "import os\n"
        "from parfn.multiprocessing import Pool\n"
        "def die(x):\n"
        "    os._exit(3)\n"
        "if __name__ == '__main__':\n"
        "    with Pool(2) as p:\n"
        "        print(p.map(lambda x: x + 1, range(4)))\n"
        "        r = p.apply_async(die, (1,))\n"
        "        try:\n"
        "            r.get(timeout=30)\n"
        "        except Exception as e:\n"
        "            print(type(e).__name__)\n"
        "        print(p.apply(abs, (-5,)))\n"
    )
    out = run_script(tmp_path, source, name="crash.py", timeout=120)
    assert out.stdout.splitlines() == ["[1, 2, 3, 4]", "WorkerCrashed", "5"]


# -- the standard library's interface -------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "__init__",
        "apply",
        "apply_async",
        "map",
        "map_async",
        "starmap",
        "starmap_async",
        "imap",
        "imap_unordered",
        "close",
        "terminate",
        "join",
    ],
)
def test_signatures_are_the_standard_librarys(name: str) -> None:
    ours = inspect.signature(getattr(Pool, name))
    theirs = inspect.signature(getattr(multiprocessing.pool.Pool, name))
    assert [(p.name, p.kind) for p in ours.parameters.values()] == [
        (p.name, p.kind) for p in theirs.parameters.values()
    ]
    for p in theirs.parameters.values():
        default = ours.parameters[p.name].default
        assert default == p.default or (default == {} and p.default == {}), p.name


def test_calls_and_results(pool: Pool) -> None:
    assert pool.apply(funcs.add, (1,), {"b": 2}) == 3
    assert pool.apply_async(funcs.square, (7,)).get(timeout=T) == 49
    assert pool.map(funcs.square, range(10)) == [x * x for x in range(10)]
    assert pool.map(funcs.square, range(100), chunksize=7) == [x * x for x in range(100)]
    assert pool.map_async(funcs.square, range(5)).get(timeout=T) == [0, 1, 4, 9, 16]
    assert pool.starmap(funcs.add, [(1, 2), (3, 4)]) == [3, 7]
    assert pool.starmap_async(funcs.add, [(1, 2)]).get(timeout=T) == [3]
    assert list(pool.imap(funcs.square, range(10))) == [x * x for x in range(10)]
    assert sorted(pool.imap_unordered(funcs.square, range(10), 3)) == [x * x for x in range(10)]
    assert pool.map(funcs.square, []) == []
    assert pool.map_async(funcs.square, []).get(timeout=T) == []
    assert list(pool.imap(funcs.square, [])) == []


def test_async_result(pool: Pool) -> None:
    result = pool.apply_async(funcs.sleep_then, (0.5, "done"))
    assert not result.ready()
    with pytest.raises(ValueError, match="not ready"):
        result.successful()
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=0.01)
    result.wait(T)
    assert result.ready() and result.successful()
    assert result.get(timeout=0) == "done"
    failed = pool.apply_async(funcs.fail_on, (3,))
    failed.wait(T)
    assert not failed.successful()
    with pytest.raises(ValueError, match="bad item 3"):
        failed.get(timeout=0)


def test_callbacks_run_before_wait_returns(pool: Pool) -> None:
    got: list[object] = []
    seen = threading.get_ident()
    threads: list[int] = []

    def keep(value: object) -> None:
        time.sleep(0.2)  # a slow callback: wait() must still wait for it
        threads.append(threading.get_ident())
        got.append(value)

    pool.apply_async(funcs.square, (3,), callback=keep, error_callback=keep).wait(T)
    assert got == [9]
    pool.map_async(funcs.square, [1, 2], callback=keep).wait(T)
    assert got == [9, [1, 4]]
    pool.map_async(int, ["a"], callback=keep, error_callback=keep).wait(T)
    assert isinstance(got[-1], ValueError)
    assert seen not in threads or len(threads) == 3  # (the caller's, or parfn's thread)


def test_errors_are_the_standard_librarys(pool: Pool) -> None:
    with pytest.raises(ValueError) as info:
        pool.apply(funcs.fail_on, (3,))
    cause = info.value.__cause__
    assert type(cause) is multiprocessing.pool.RemoteTraceback
    assert "bad item 3" in cause.tb
    with pytest.raises(ValueError):
        pool.map(funcs.fail_on, range(6))

    # a result that cannot be pickled
    with pytest.raises(multiprocessing.pool.MaybeEncodingError) as encoding:
        pool.apply_async(funcs.identity, (None,)).get(timeout=T)  # fine
        pool.apply(_returns_a_lock)
    assert isinstance(encoding.value.__cause__, parfn.SerializationError)

    # an argument that cannot be pickled: the pickler's own exception
    with pytest.raises(TypeError, match="pickle"):
        pool.map(funcs.identity, [threading.Lock()] * 3)
    with pytest.raises(TypeError, match="pickle"):
        pool.apply_async(funcs.identity, (threading.Lock(),)).get(timeout=T)


def _returns_a_lock() -> object:
    return threading.Lock()


def test_a_closed_pool_says_so() -> None:
    p = Pool(1)
    with pytest.raises(ValueError, match="Pool is still running"):
        p.join()
    p.close()
    for call in (
        lambda: p.apply(abs, (-1,)),
        lambda: p.apply_async(abs, (-1,)),
        lambda: p.map(abs, [1]),
        lambda: p.imap(abs, [1]),
    ):
        with pytest.raises(ValueError, match="Pool not running"):
            call()
    p.join()
    with pytest.raises(ValueError, match="Pool not running"), p:
        pass


def test_bad_arguments_as_the_standard_library() -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match="Number of processes must be at least 1"):
            Pool(bad)
    for bad in (0, -1, 0.5, "12"):
        with pytest.raises(ValueError, match="maxtasksperchild"):
            Pool(1, maxtasksperchild=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="initializer must be a callable"):
        Pool(1, initializer=1)  # type: ignore[arg-type]


def test_imap_raises_an_input_error_after_the_values_before_it(pool: Pool) -> None:
    def numbers() -> Iterator[int]:
        yield from range(3)
        raise KeyError("input")

    it = pool.imap(funcs.square, numbers())
    assert [next(it) for _ in range(3)] == [0, 1, 4]
    with pytest.raises(KeyError):
        next(it)
    with pytest.raises(KeyError):
        pool.map(funcs.square, numbers())


def test_imap_next_with_a_timeout(pool: Pool) -> None:
    it = pool.imap(funcs.sleep_then, [1.0, 0.0])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.05)
    assert it.next(timeout=T) is None
    assert it.next(timeout=T) is None
    with pytest.raises(StopIteration):
        it.next(timeout=T)


# -- the private attributes code in the wild reads --------------------------------------


def test_pool_lists_live_worker_processes(pool: Pool) -> None:
    workers = pool._pool
    assert len(workers) == 2
    assert all(w.is_alive() and isinstance(w.pid, int) for w in workers)
    pids = {w.pid for w in workers}
    assert set(pool.map(funcs.pid, range(20), chunksize=1)) <= pids


def test_killing_a_worker_fails_its_task_only(pool: Pool) -> None:
    result = pool.apply_async(funcs.sleep_then, (30,))
    time.sleep(0.3)  # it runs on one of them: kill both
    for worker in pool._pool:
        worker.kill()
    with pytest.raises(parfn.WorkerCrashed):
        result.get(timeout=T)
    assert pool.apply(abs, (-3,)) == 3


def test_maxtasksperchild_replaces_workers() -> None:
    with Pool(1, maxtasksperchild=2) as p:
        pids = [p.apply(funcs.pid) for _ in range(6)]
    # Two tasks per worker, whatever the timing: three workers in turn.
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]


def test_context_chooses_the_start_method() -> None:
    for method in ("spawn", "forkserver"):
        with Pool(1, context=multiprocessing.get_context(method)) as p:
            assert p._parfn._backend.start_method == method  # type: ignore[attr-defined]


def test_with_block_terminates() -> None:
    with Pool(1) as p:
        running = p.apply_async(funcs.sleep_then, (30,))
        queued = p.apply_async(funcs.sleep_then, (30,))
        time.sleep(0.3)
        workers = p._pool
    assert all(not w.is_alive() for w in workers)
    for result in (running, queued):
        with pytest.raises(CancelledError):
            result.get(timeout=T)


def test_close_then_join_waits_for_every_task() -> None:
    p = Pool(2)
    results = [p.apply_async(funcs.sleep_then, (0.3, i)) for i in range(4)]
    p.close()
    p.join()
    assert [r.get(timeout=0) for r in results] == [0, 1, 2, 3]


def test_repr_and_pickling() -> None:
    with Pool(2) as p:
        assert re.fullmatch(r"<parfn\.multiprocessing\.Pool state=RUN pool_size=2>", repr(p))
        with pytest.raises(NotImplementedError):
            __import__("pickle").dumps(p)


def test_initializer_runs_in_each_worker() -> None:
    with Pool(2, funcs.initializer_sets, ("hello",)) as p:
        assert set(p.map(funcs.read_init, range(4))) == {"hello"}
        assert os.getpid() not in set(p.map(funcs.pid, range(4)))


def test_imap_goes_on_past_an_item_that_raised(pool: Pool) -> None:
    it = pool.imap(funcs.fail_on, range(5))
    assert [next(it), next(it)] == [0, 1]
    assert next(it) == 2
    with pytest.raises(ValueError, match="bad item 3") as info:
        next(it)
    assert type(info.value.__cause__) is multiprocessing.pool.RemoteTraceback
    assert next(it) == 4  # as the standard library's imap: the iteration goes on
    with pytest.raises(StopIteration):
        next(it)
