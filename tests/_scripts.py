"""Run a user's script as users run it: a file, ``python script.py``, in a child Python.

The one way the tests run a script. It is written to a directory (with any
module files beside it) and run there, under a watchdog: a hang kills the
child's whole process group and fails the test, naming the case and showing
what the script printed so far.

A script that takes the start method as ``sys.argv[1]`` is parametrised over
``SCRIPT_METHODS`` (``default`` is parfn's own choice) and turns it into
Pool's argument with::

    METHOD = None if sys.argv[1] == "default" else sys.argv[1]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from .conftest import START_METHODS, child_env

__all__ = ("SCRIPT_METHODS", "run_script")

SCRIPT_METHODS = [pytest.param("default", id="default"), *START_METHODS]
"""The start methods a script can be given: parfn's default and the three."""


def run_script(
    directory: Path,
    source: str,
    *args: str,
    name: str = "main.py",
    modules: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    unset: Iterable[str] = (),
    flags: Sequence[str] = (),
    timeout: float = 60,
    case: str = "",
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Write ``source`` as ``directory/name`` (and ``modules``: name -> source)
    and run ``python flags name args`` there.

    The child's environment is this one (with ``tests`` importable), less
    ``unset``, plus ``env``. With ``check``, fails unless it exits with 0.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for module, text in (modules or {}).items():
        (directory / f"{module}.py").write_text(textwrap.dedent(text))
    script = directory / name
    script.write_text(textwrap.dedent(source))
    full_env = {k: v for k, v in child_env().items() if k not in set(unset)}
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, *flags, str(script), *args],
        cwd=directory,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"{case or 'the script'} hung (killed after {timeout} s)\n"
            f"stdout:\n{out}\nstderr:\n{err}"
        )
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        assert proc.returncode == 0, f"{case}: exit {proc.returncode}\n{out}\n{err}"
    return result
