"""Run a user's script as users run it: a file, ``python script.py``, its functions in it.

The script gets the start method as ``sys.argv[1]`` (``default`` for parfn's
own choice); ``START_METHODS`` parametrises a test over all four. A script
turns it into Pool's argument with::

    METHOD = None if sys.argv[1] == "default" else sys.argv[1]
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

import pytest

from .conftest import child_env

__all__ = ("START_METHODS", "run_script")

START_METHODS = [
    pytest.param("default", id="default"),
    pytest.param("fork", id="fork"),
    pytest.param("forkserver", id="forkserver"),
    pytest.param("spawn", id="spawn"),
]


def run_script(
    folder: Path,
    source: str,
    method: str,
    *,
    env: dict[str, str] | None = None,
    unset: Iterable[str] = (),
    timeout: float = 120,
) -> str:
    """Write ``source`` to ``folder/script.py`` and run it with ``method``; its stdout.

    Fails, with its stderr, unless it exits with 0. The child's environment
    is this one (with ``tests`` importable), less ``unset``, plus ``env``.
    """
    path = folder / "script.py"
    path.write_text(textwrap.dedent(source))
    full_env = {k: v for k, v in child_env().items() if k not in set(unset)}
    full_env.update(env or {})
    done = subprocess.run(
        [sys.executable, str(path), method],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )
    assert done.returncode == 0, f"exit code {done.returncode}\n{done.stderr}"
    return done.stdout
