"""The public surface: names, the error tree, and no side effects at import."""

from __future__ import annotations

import concurrent.futures.process
import pickle
import subprocess
import sys
import textwrap
import types

import parfn


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(parfn).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(parfn.__all__) == public
    assert isinstance(parfn.__all__, tuple)


def test_error_tree() -> None:
    for name in ("RemoteError", "SerializationError", "WorkerCrashed", "TaskTimeout", "PoolClosed"):
        assert issubclass(getattr(parfn, name), parfn.ParfnError), name
    assert issubclass(parfn.WorkerCrashed, concurrent.futures.process.BrokenProcessPool)
    assert issubclass(parfn.SerializationError, pickle.PicklingError)
    assert issubclass(parfn.TaskTimeout, TimeoutError)


def test_every_public_name_has_a_docstring() -> None:
    for name in parfn.__all__:
        assert getattr(parfn, name).__doc__, name


def test_import_has_no_side_effects() -> None:
    code = textwrap.dedent(
        """
        import atexit, sys, threading
        before = threading.active_count()
        import parfn
        assert threading.active_count() == before, "import started a thread"
        heavy = [m for m in ("cloudpickle", "multiprocessing.pool", "tqdm", "distributed",
                             "parfn._procpool", "parfn._worker") if m in sys.modules]
        assert not heavy, heavy
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.stdout.strip() == "ok", out.stderr
