"""Ctrl-C and a killed parent: run a map in a child Python, signal it, check
(with the worker pids it wrote down) that no worker survives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import START_METHODS, child_env, run_python

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import parfn
    from tests import funcs

    # As in a terminal: a process started in the background by a
    # non-interactive shell (as CI may be) inherits SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    start_method, out = sys.argv[1], sys.argv[2]
    with parfn.Pool(2, start_method=start_method) as pool:
        pids = sorted(set(pool.map(funcs.pid, range(20), chunksize=1)))
        with open(out, "w") as f:
            json.dump(pids, f)
        try:
            if sys.argv[3] == "apply":
                pool.apply(funcs.sleep_then, 60)
            else:
                pool.map(funcs.sleep_then, [60] * 8, chunksize=1)
        except KeyboardInterrupt:
            print("KeyboardInterrupt reached the caller", flush=True)
            raise
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start(
    tmp_path: Path, start_method: str, call: str = "map"
) -> tuple[subprocess.Popen[str], list[int]]:
    out = tmp_path / "pids.json"
    env = child_env()
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, start_method, str(out), call],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, as a shell would give it
    )
    deadline = time.monotonic() + 30
    while not out.exists() or not out.read_text():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the child never started its pool"
        time.sleep(0.05)
    time.sleep(0.5)  # the long map is running now
    return proc, json.loads(out.read_text())


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


@pytest.mark.parametrize("call", ["map", "apply"])
@pytest.mark.parametrize("start_method", START_METHODS)
def test_ctrl_c_reaches_the_caller_and_ends_the_workers(
    tmp_path: Path, start_method: str, call: str
) -> None:
    proc, pids = _start(tmp_path, start_method, call)
    assert pids and all(_alive(p) for p in pids)
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C goes to the whole process group
    try:
        output, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    took = time.monotonic() - start
    assert "KeyboardInterrupt reached the caller" in output, output
    assert took < 10, f"Ctrl-C took {took:.1f} s to end the map"
    leftover = _wait_gone(pids, 5)
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert not leftover, f"workers outlived Ctrl-C: {leftover}"


@pytest.mark.parametrize("start_method", START_METHODS)
def test_workers_exit_when_the_parent_is_killed(tmp_path: Path, start_method: str) -> None:
    proc, pids = _start(tmp_path, start_method)
    proc.kill()  # SIGKILL: no cleanup code runs in the parent
    proc.wait(timeout=20)
    leftover = _wait_gone(pids, 5)
    assert proc.stdout is not None
    proc.stdout.close()
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert not leftover, f"workers outlived their SIGKILLed parent: {leftover}"


def test_interpreter_exit_with_a_pool_never_shut_down(tmp_path: Path) -> None:
    """A pool left open (no with, no shutdown) must not hang interpreter exit:
    the exit hook waits for its running task, then ends the workers."""
    code = textwrap.dedent(
        """
        import time, parfn
        from tests import funcs
        pool = parfn.Pool(2)
        print(pool.apply(funcs.square, 3), flush=True)
        task = pool.spawn(funcs.sleep_then, 0.3, "late")
        """
    )
    assert run_python(code, timeout=30).strip() == "9"
