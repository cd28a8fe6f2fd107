"""The start model: every worker of a pool, first or replacement, is forked by
the pool's zygote and sees the same world (the caller's as it was when the
pool started), whatever threads the caller has; the zygote reports how each
worker ended, and goes with the pool (and with the pool's process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import parfn

from ._scripts import run_script
from .conftest import _children_of, child_env

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the zygote is Linux only"
)

WORLD = """
    import logging, os

    def world(_):
        return (os.getppid(), os.environ.get("SETTING"), len(logging.getLogger().handlers))

    def crash(how):
        if how == "exit":
            os._exit(3)
        os.kill(os.getpid(), 9)
"""

MAIN = """
    import logging, os, sys, threading
    import parfn
    import world

    if __name__ == "__main__":
        method = None if sys.argv[1] == "default" else sys.argv[1]
        if sys.argv[2] == "thread":
            stop = threading.Event()
            threading.Thread(target=stop.wait, daemon=True).start()
        logging.basicConfig()  # a logging setup made before the pool starts
        os.environ["SETTING"] = "before"
        with parfn.Pool(2, start_method=method) as pool:
            os.environ["SETTING"] = "after"  # after it started: no worker sees it
            first = set(pool.map(world.world, range(20), chunksize=1))
            for how in ("exit", "kill"):
                try:
                    pool.apply(world.crash, how)
                except parfn.WorkerCrashed as e:
                    print("exitcode", how, e.exitcode)
            after = set(pool.map(world.world, range(40), chunksize=1))
        print("same-world", first == after, sorted(first)[0][1:])
        print("one-parent", len({w[0] for w in first | after}) == 1)
        print("not-me", os.getpid() not in {w[0] for w in first | after})
"""


@pytest.mark.parametrize("method", ["default", "fork"])
@pytest.mark.parametrize("threads", ["alone", "thread"])
def test_first_workers_and_replacements_share_one_world(
    tmp_path: Path, method: str, threads: str
) -> None:
    out = run_script(
        tmp_path, MAIN, method, threads, modules={"world": WORLD}, case=f"{method}-{threads}"
    ).stdout
    assert "exitcode exit 3" in out
    assert "exitcode kill -9" in out
    assert "same-world True ('before', 1)" in out
    assert "one-parent True" in out  # the zygote
    assert "not-me True" in out


def test_the_pool_has_one_zygote_with_its_workers_as_children() -> None:
    before = set(_children_of(os.getpid()))
    with parfn.Pool(2) as pool:
        pool.map(abs, range(4))
        children = set(_children_of(os.getpid())) - before
        zygote = pool._backend._zygote  # type: ignore[attr-defined]
        workers = {w.process.pid for w in pool._backend._workers}  # type: ignore[attr-defined]
        assert zygote.pid in children
        assert workers <= set(_children_of(zygote.pid))
        assert {pid for pid in children if pid != zygote.pid} == workers
    # (the autouse fixture checks that the zygote and its workers are gone now)


KILLED = """
    import os, sys, time
    import parfn

    def nap(_):
        time.sleep(60)

    if __name__ == "__main__":
        method = None if sys.argv[1] == "default" else sys.argv[1]
        task = parfn.Pool(2, start_method=method).spawn(nap, 0)
        time.sleep(0.5)
        print(os.getpid(), flush=True)
        sys.stdin.readline()
"""


@pytest.mark.parametrize("method", ["default", "forkserver", "spawn"])
def test_no_process_outlives_a_parent_killed_by_sigkill(tmp_path: Path, method: str) -> None:
    (tmp_path / "main.py").write_text(textwrap.dedent(KILLED))
    with subprocess.Popen(
        [sys.executable, "main.py", method],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    ) as proc:
        try:
            assert proc.stdout is not None
            pid = int(proc.stdout.readline())
            descendants = set(_children_of(pid))
            assert descendants, "no worker started"
            os.kill(pid, signal.SIGKILL)
            proc.wait(10)
            deadline = time.monotonic() + 10
            while True:
                alive = {p for p in descendants if _alive(p)}
                if not alive or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert not alive, f"outlived their parent: {alive}"
        finally:
            proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_pool_whose_zygote_was_killed_says_so_and_shuts_down() -> None:
    pool = parfn.Pool(1)
    try:
        assert pool.apply(abs, -1) == 1
        os.kill(pool._backend._zygote.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        assert pool.apply(abs, -2) == 2  # its worker lives on
        with pytest.raises(parfn.WorkerCrashed):
            pool.apply(os._exit, 1)
        with pytest.raises((parfn.PoolClosed, parfn.WorkerCrashed), match="zygote"):
            pool.apply(abs, -3)  # no worker can take its place
    finally:
        pool.shutdown()


UNGUARDED = """
    import os
    import parfn

    print("top level runs", flush=True)

    def crash_once(x):
        if x == 3 and not os.path.exists("crashed"):
            open("crashed", "w").close()
            os._exit(5)
        return x * 10

    pool = parfn.Pool(2)
    try:
        print("result", pool.map(crash_once, range(6), chunksize=1))
    except parfn.WorkerCrashed as e:
        print("crashed", e.exitcode)
    print("after", pool.map(crash_once, range(6), chunksize=1))
    pool.shutdown()
"""


def test_a_script_without_the_main_guard_runs_its_top_level_once(tmp_path: Path) -> None:
    """Item 7: replacements came from the forkserver, which ran an unguarded
    script's top level again in the middle of a map."""
    out = run_script(tmp_path, UNGUARDED, case="unguarded script").stdout
    assert out.count("top level runs") == 1, out
    assert "crashed 5" in out
    assert "after [0, 10, 20, 30, 40, 50]" in out
