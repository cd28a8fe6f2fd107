"""Run a user's script as ``python main.py`` in a child Python, under a watchdog.

The script (and any module files beside it) is written to a fresh directory;
a hang kills the child's whole process group and fails the test, naming the
case and showing what the script printed so far.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import child_env


def run_script(
    directory: Path,
    source: str,
    *args: str,
    modules: dict[str, str] | None = None,
    timeout: float = 60,
    case: str = "",
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Write ``source`` as ``main.py`` (and ``modules``: name -> source) and run it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (modules or {}).items():
        (directory / f"{name}.py").write_text(textwrap.dedent(text))
    script = directory / "main.py"
    script.write_text(textwrap.dedent(source))
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=directory,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
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
