"""The default start: fork the first workers while the process has one thread,
forkserver for everything after (and for every worker once other threads run)."""

from __future__ import annotations

import sys
import textwrap

import pytest

from .conftest import run_python

SCRIPT = textwrap.dedent(
    """
    import os, sys, threading
    import parfn
    from tests import funcs

    if sys.argv[1] == "thread":
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
    me = os.getpid()
    with parfn.Pool(2) as pool:
        first = set(pool.map(funcs.ppid, range(20), chunksize=1))
        try:
            pool.apply(funcs.crash, "exit")
        except parfn.WorkerCrashed:
            pass
        after = set(pool.map(funcs.ppid, range(40), chunksize=1))
    print("first-forked", first == {me})
    print("replacement-from-server", any(p != me for p in after))
    """
)


def _run(mode: str) -> str:
    return run_python(SCRIPT, mode)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork-first is Linux only")
def test_one_thread_forks_the_first_workers_and_the_forkserver_replaces_them() -> None:
    out = _run("alone")
    assert "first-forked True" in out
    assert "replacement-from-server True" in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork-first is Linux only")
def test_with_another_thread_running_nothing_is_forked() -> None:
    out = _run("thread")
    assert "first-forked False" in out
