"""Run CPython's own multiprocessing.Pool tests against parfn.multiprocessing.Pool.

CPython tests its Pool in ``Lib/test/_test_multiprocessing.py``, whose classes
each start-method package (``test.test_multiprocessing_fork``, ``_forkserver``,
``_spawn``) generates in its own modules (``test_processes``, ``test_misc``).
This script runs the Pool classes (``_TestPool``, ``_TestPoolWorkerErrors``,
``_TestPoolWorkerLifetime``, as ``WithProcessesTestPool...``) and the Pool
tests among the plain TestCase classes (``TestInitializers``,
``TestStdinBadfiledescriptor``, ``TestPoolNotLeakOnFailure``,
``MiscTestCase``: the tests whose name says "pool"), for fork, forkserver and
spawn, twice: against the standard library (the baseline) and with
``parfn.multiprocessing.Pool`` put in place of ``multiprocessing.Pool`` and
``multiprocessing.pool.Pool`` before the test modules are imported (the
classes are generated there, and workers import them by name). The
substitute reads the start method when a pool is made, as the standard
library's does (each module's setUpModule sets it). Tests that start a fresh
interpreter (``assert_python_ok``, with ``-c`` code or a script file) get the
same substitution there.

Usage, with a Python 3.13 that has its ``test`` package and parfn's
dependencies (the parfn tested is always this repository's ``src/``)::

    python scripts/cpython_pool_tests.py --against both
    python scripts/cpython_pool_tests.py --against parfn -k Lifetime -k spawn
    python scripts/cpython_pool_tests.py --report-only -v

Each class runs in a child process of its own, each test under a watchdog; a
hang ends the child, is recorded as ``timeout``, and the class goes on in a
new child. The machinery (children, watchdog, reruns, verdicts, the table) is
``cpython_executor_tests.py``'s, used as it is; this script gives it the Pool
tests, the substitution and the differences by design. Verdicts for the parfn
side: ``pass``, ``by-design`` (failed, not hung, and listed below with the
reason), ``stdlib-too``, ``FAIL`` (fails or hangs here, passes on the standard
library), ``skip``. The exit status is 1 if any test is ``FAIL``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import tempfile
import unittest
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cpython_executor_tests as base  # noqa: E402 (the machinery, next to this file)

SRC = base.SRC
METHODS = ("fork", "forkserver", "spawn")
CLASSES = {
    "processes": (
        "WithProcessesTestPool",
        "WithProcessesTestPoolWorkerErrors",
        "WithProcessesTestPoolWorkerLifetime",
    ),
    "misc": (
        "TestInitializers",
        "TestStdinBadfiledescriptor",
        "TestPoolNotLeakOnFailure",
        "MiscTestCase",
    ),
}
"""Per test module: the classes to run (of the plain ones, the tests about a pool:
"pool" in the class's name or the test's)."""

# -- differences by design ---------------------------------------------------------
# Keyed by "Class.test_method" (every start method) or "test_method". Each reason is
# the docs' text for that difference (docs/guide/multiprocessing.md). A test that
# hangs or crashes is never "by design", whatever this list says.
BY_DESIGN: dict[str, str] = {
    "_TestPoolWorkerErrors.test_unpickleable_result": (
        "the task returns a lambda, which pickle cannot send; parfn sends a result that "
        "pickle refuses with cloudpickle, so the lambda comes back and works, where the "
        "standard library raises MaybeEncodingError (a result that cloudpickle cannot "
        "send either, a lock say, still raises MaybeEncodingError)"
    ),
    "TestPoolNotLeakOnFailure.test_release_unused_processes": (
        "the test hands the pool a mock context whose Process class fails to start, and "
        "checks that the standard library's pool cleans up the processes it made with it; "
        "parfn reads a context for its start method only and starts its workers its own "
        "way, so the mock's start method is refused as unknown"
    ),
}


def _short(module: str, method: str) -> str:
    return f"{module}_{method}"


def _real(short: str) -> str:
    module, method = short.split("_", 1)
    return f"test.test_multiprocessing_{method}.test_{module}"


# -- the child ------------------------------------------------------------------------


def install_parfn() -> None:
    """Put parfn.multiprocessing.Pool in place of the standard library's Pool."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p
    )
    import multiprocessing
    import multiprocessing.pool

    from parfn.multiprocessing import Pool

    multiprocessing.Pool = Pool  # type: ignore[assignment]
    multiprocessing.pool.Pool = Pool  # type: ignore[misc]

    # A fresh interpreter (assert_python_ok) gets the same substitution: the
    # code of "-c" is prefixed with it, a script file is run as a copy that is.
    from test.support import script_helper

    prefix = (
        f"import sys; sys.path.insert(0, {str(SRC)!r}); "
        "import multiprocessing as _mp, multiprocessing.pool as _mpp; "
        "from parfn.multiprocessing import Pool as _P; "
        "_mp.Pool = _mpp.Pool = _P; del _mp, _mpp, _P\n"
    )
    original = script_helper.run_python_until_end

    def run_python_until_end(*args: str, **env_vars: Any) -> Any:
        if "-c" in args:
            i = args.index("-c") + 1
            args = (*args[:i], prefix + args[i], *args[i + 1 :])
            return original(*args, **env_vars)
        scripts = [i for i, a in enumerate(args) if a.endswith(".py") and os.path.isfile(a)]
        if not scripts:
            return original(*args, **env_vars)
        i = scripts[0]
        copy = f"{args[i][:-3]}_parfn.py"
        Path(copy).write_text(prefix + Path(args[i]).read_text(encoding="utf-8"))
        try:
            return original(*args[:i], copy, *args[i + 1 :], **env_vars)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(copy)

    script_helper.run_python_until_end = run_python_until_end


def child_main(args: argparse.Namespace) -> int:
    if args.against == "parfn":
        install_parfn()  # before the test modules are imported: they bind Pool then
    short, class_name = args.cls.rsplit(".", 1)
    module = importlib.import_module(_real(short))
    cls = getattr(module, class_name)
    suite = unittest.TestSuite(cls(name) for name in args.tests.split(","))
    return base.run_suite(suite, args.events, args.test_timeout)


# -- the parent -------------------------------------------------------------------------


def discover(patterns: list[str]) -> dict[str, list[str]]:
    """{"module_method.Class": [test names]} for the Pool tests of each start method."""
    loader = unittest.TestLoader()
    found: dict[str, list[str]] = {}
    for method in METHODS:
        for module, classes in CLASSES.items():
            short = _short(module, method)
            try:
                mod = importlib.import_module(_real(short))
            except unittest.SkipTest:
                continue
            for name in classes:
                cls = getattr(mod, name, None)
                if cls is None:
                    continue
                tests = [
                    t
                    for t in loader.getTestCaseNames(cls)
                    if (module == "processes" or "pool" in f"{name}.{t}".lower())
                    and all(p in f"{short}.{name}.{t}" for p in patterns)
                ]
                if tests:
                    found[f"{short}.{name}"] = tests
    return found


def by_design_reason(test_id: str) -> str | None:
    _, cls, method = test_id.split(".")
    generic = cls.replace("WithProcesses", "_")
    return (
        BY_DESIGN.get(f"{cls}.{method}")
        or BY_DESIGN.get(f"{generic}.{method}")
        or BY_DESIGN.get(method)
    )


def _matches(key: str, test_id: str) -> bool:
    _, cls, method = test_id.split(".")
    return key in (method, f"{cls}.{method}", f"{cls.replace('WithProcesses', '_')}.{method}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--child" not in argv and "--out" not in argv:
        argv += ["--out", str(Path(tempfile.gettempdir()) / "parfn-cpython-pool-tests")]
    # The executor script's machinery, given this script's tests.
    base.__file__ = __file__  # its children run this file
    base.__doc__ = __doc__
    base.discover = discover
    base.child_main = child_main
    base.install_parfn = install_parfn
    base.BY_DESIGN = BY_DESIGN
    base.by_design_reason = by_design_reason
    base._matches = _matches
    return base.main(argv)


if __name__ == "__main__":
    sys.exit(main())
