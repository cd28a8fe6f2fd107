"""No worker waits for ever on a lock it inherited; a user's os.fork() is noticed.

Each case is a user's script, run as ``python main.py`` under a watchdog (a
hang fails the test and names the case): the issue's reproductions (items 1,
2, 3 and the raising initializer), a module being imported by another thread
while the pool starts, and a stress loop of short-lived fork pools started
while a user thread logs and imports.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ._scripts import run_script

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="fork start methods: Linux"
)


FORK_LAMBDA = """
    import sys
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    import parfn

    @parfn.parallel
    def inc(x):
        return x + 1

    if __name__ == "__main__":
        with parfn.Pool(2, start_method="fork"):
            print("lambda", parfn.Pool(2, start_method="fork").map(lambda x: x + 1, range(4)))
        with parfn.Pool(2, start_method="fork"):
            print("decorated", inc.map(range(4)))
        with parfn.ProcessPoolExecutor(2, mp_context=get_context("fork")) as ex:
            print("executor", list(ex.map(lambda x: x + 1, range(4))))
"""


def test_fork_pools_run_lambdas_and_script_functions(tmp_path: Path) -> None:
    """Item 1: these hung at the first map (a worker forked by the manager
    thread while the caller imported cloudpickle)."""
    out = run_script(tmp_path, FORK_LAMBDA, case="item 1", timeout=60).stdout
    assert "lambda [1, 2, 3, 4]" in out
    assert "decorated [1, 2, 3, 4]" in out
    assert "executor [1, 2, 3, 4]" in out


NESTED = """
    import parfn

    @parfn.parallel
    def square(x):
        return x * x

    @parfn.parallel
    def sum_of_squares(n):
        return sum(square.map(range(n)))

    @parfn.parallel
    def own_pool(n):
        with parfn.Pool(2) as pool:
            return sum(pool.map(abs, range(-n, 0)))

    if __name__ == "__main__":
        print("nested", sum_of_squares.map([3, 4]))
        print("own-pool", own_pool.map([3, 4]))
"""


def test_nested_calls_and_pools_inside_default_pool_tasks(tmp_path: Path) -> None:
    """Item 2: the default pool's first workers were forked holding
    ``_runtime._lock`` (nested .map), or ``start_lock`` (a task's own Pool)."""
    out = run_script(tmp_path, NESTED, case="item 2", timeout=60).stdout
    assert "nested [5, 14]" in out
    assert "own-pool [6, 10]" in out


USER_FORK = """
    import os, sys
    import parfn

    @parfn.parallel
    def square(x):
        return x * x

    if __name__ == "__main__":
        print("parent", square.map(range(4)), flush=True)
        explicit = parfn.Pool(2)
        explicit.map(abs, [1])
        pid = os.fork()
        if pid == 0:
            try:
                print("child", square.map(range(5)), flush=True)
                try:
                    explicit.map(abs, [1])
                except parfn.PoolClosed as e:
                    print("explicit", "os.fork" in str(e), flush=True)
                parfn.shutdown()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        print("parent-after", square.map(range(3)), explicit.map(abs, [-2]))
        explicit.shutdown()
"""


def test_a_child_of_os_fork_gets_a_fresh_default_pool(tmp_path: Path) -> None:
    """Item 3: the child's first call on the default pool waited for ever (it
    had the pool object but no manager thread); the parent's explicit pool
    refuses with a clear error there."""
    out = run_script(tmp_path, USER_FORK, case="item 3", timeout=60).stdout
    assert "parent [0, 1, 4, 9]" in out
    assert "child [0, 1, 4, 9, 16]" in out
    assert "explicit True" in out
    assert "parent-after [0, 1, 4] [2]" in out


RAISING_INIT = """
    import parfn

    def init():
        raise ValueError("no database")

    if __name__ == "__main__":
        with parfn.Pool(2, initializer=init) as pool:
            try:
                pool.map(abs, range(8))
            except ValueError as e:
                print("raised", e)
"""


@pytest.mark.parametrize("method", ["default", "spawn"])
def test_a_raising_initializer_prints_no_broken_pipe(tmp_path: Path, method: str) -> None:
    source = RAISING_INIT
    if method != "default":
        source = source.replace("initializer=init", f"initializer=init, start_method={method!r}")
    result = run_script(tmp_path, source, case=f"raising initializer, {method}")
    assert "raised no database" in result.stdout
    assert "BrokenPipeError" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


SLOW_IMPORT = """
    import threading, time

    def started(): pass

    time.sleep(1.0)  # another thread imports this module while the pool starts
    VALUE = 42
"""

IMPORTING_THREAD = """
    import sys, threading, time
    import parfn

    def read(_):
        import slowmod
        return slowmod.VALUE

    if __name__ == "__main__":
        method = None if sys.argv[1] == "default" else sys.argv[1]
        importer = threading.Thread(target=__import__, args=("slowmod",))
        importer.start()
        time.sleep(0.3)  # it holds slowmod's import lock now
        with parfn.Pool(2, start_method=method) as pool:
            print("imported", pool.map(read, range(4)))
        importer.join()
"""


@pytest.mark.parametrize("method", ["default", "fork"])
def test_a_module_another_thread_is_importing_imports_afresh_in_workers(
    tmp_path: Path, method: str
) -> None:
    """A worker forked while another thread held a module's import lock would
    wait for ever importing that module; it imports it afresh instead."""
    out = run_script(
        tmp_path,
        IMPORTING_THREAD,
        method,
        modules={"slowmod": SLOW_IMPORT},
        case=f"import lock held by another thread, {method}",
        timeout=60,
    ).stdout
    assert "imported [42, 42, 42, 42]" in out


STRESS = """
    import importlib, logging, sys, threading
    import parfn

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    log = logging.getLogger("busy")

    def work(x):
        logging.getLogger("worker").info("item %s", x)  # logging's locks, in the worker
        import json, decimal  # and the import system
        return x * 2

    def busy(stop):
        n = 0
        while not stop.is_set():
            log.info("busy %d", n)
            for name in ("json", "decimal", "fractions", "statistics", "csv"):
                sys.modules.pop(name, None)
                importlib.import_module(name)
            n += 1

    if __name__ == "__main__":
        rounds = int(sys.argv[1])
        method = None if sys.argv[2] == "default" else sys.argv[2]
        stop = threading.Event()
        thread = threading.Thread(target=busy, args=(stop,))
        thread.start()
        try:
            for i in range(rounds):
                with parfn.Pool(2, start_method=method) as pool:
                    assert pool.map(work, range(6)) == [0, 2, 4, 6, 8, 10], i
                print("round", i, flush=True)
        finally:
            stop.set()
            thread.join()
        print("done", rounds)
"""


def _stress(tmp_path: Path, rounds: int, method: str) -> None:
    out = run_script(
        tmp_path, STRESS, str(rounds), method, case=f"stress, {method}", timeout=30 + rounds
    ).stdout
    assert f"done {rounds}" in out


@pytest.mark.parametrize("method", ["default", "fork"])
def test_short_lived_fork_pools_beside_a_busy_thread(tmp_path: Path, method: str) -> None:
    _stress(tmp_path, 15, method)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_short_lived_fork_pools_beside_a_busy_thread_long(tmp_path: Path) -> None:
    _stress(tmp_path, 300, "default")
