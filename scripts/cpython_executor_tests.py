"""Run CPython's own ProcessPoolExecutor tests against parfn.ProcessPoolExecutor.

CPython ships the tests of its executors as ``Lib/test/test_concurrent_futures``.
This script runs the process-pool test classes of six of its modules
(``test_process_pool``, ``test_shutdown``, ``test_wait``, ``test_as_completed``,
``test_init``, ``test_deadlock``), for every start method they cover (fork,
forkserver, spawn), twice: once against the standard library's executor (the
baseline) and once with ``parfn.ProcessPoolExecutor`` put in place of
``concurrent.futures.ProcessPoolExecutor`` (and
``concurrent.futures.process.ProcessPoolExecutor``) before the suite is
imported. It prints, per test, both results side by side, then a summary.

Usage: one command, with a Python 3.13 that has its ``test`` package and can
import parfn's dependencies (a virtual environment with parfn installed; the
parfn tested is always this repository's ``src/``)::

    python scripts/cpython_executor_tests.py --against both
    python scripts/cpython_executor_tests.py --against parfn      # keeps the last baseline
    python scripts/cpython_executor_tests.py --against parfn -k test_deadlock -k Spawn
    python scripts/cpython_executor_tests.py --report-only -v     # the last results again

With ``--one-process``, the tests of each start method (every class of that
method, from all six modules, in order) run in one child process, as CPython's
own test runner runs them: what a test leaves behind (workers, threads, the
forkserver, module state) meets the tests after it, and a hang ends that child
and the rest goes on in a new one. Its results go to ``{side}-one-process.json``::

    python scripts/cpython_executor_tests.py --against both --one-process
    python scripts/cpython_executor_tests.py --against parfn --one-process -k Fork

How it runs: each test class runs in a child process of its own, and each test
in it under a watchdog (``faulthandler.dump_traceback_later(exit=True)``): a
hang ends that child, is recorded as ``timeout``, and the class goes on in a
new child. A test that fails is run once more (``flaky`` if it passes then); a
hang is not. Tests that start a fresh interpreter (``assert_python_ok('-c',
...)``) get the same substitution there. After each test the child runs
``gc.collect()`` (both sides), so that an executor a failed test left in a
reference cycle does not keep workers that the module's tear-down would wait
for. Results go to ``--out`` (JSON, one file per side; ``-k`` updates the last
full run in place) and each child's output to a log file next to them.

Verdicts, for the parfn side:

* ``pass``: passed (``pass*`` if it needed the second try);
* ``by-design``: failed (not hung), and listed in ``BY_DESIGN`` with the reason;
* ``stdlib-too``: failed, and fails (or is flaky) on the standard library too,
  on this machine: a timing-sensitive test, not a parfn difference;
* ``FAIL``: fails or hangs here, passes on the standard library;
* ``skip``: skipped by the test itself (both sides skip the same ones).

The exit status is 1 if any test is ``FAIL``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import gc
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import unittest
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = "test.test_concurrent_futures"
MODULES = (
    "test_process_pool",
    "test_shutdown",
    "test_wait",
    "test_as_completed",
    "test_init",
    "test_deadlock",
)
# test_init's FailingInitializerResourcesTest runs the process-pool
# FailingInitializer classes and checks the resource tracker afterwards.
EXTRA_CLASSES = {"test_init": ("FailingInitializerResourcesTest",)}

# -- differences by design ------------------------------------------------------
# Keyed by "module.test_method" (every start method) or "module.Class.test_method".
# Each reason is the README's text for that difference. A test that hangs or
# crashes is never "by design", whatever this list says.
NEVER_BROKEN = (
    "parfn never breaks the executor: a dead worker fails only the task it was running "
    "(with parfn.WorkerCrashed, which is a BrokenProcessPool), is replaced, and the "
    "executor keeps serving; the test expects the whole pool to become broken"
)
PRIVATE = (
    "uses private attributes of the standard library's implementation ({attrs}) that "
    "parfn's executor, built on a parfn process pool, does not have"
)
DATA_ERROR = (
    "{what} that cannot be unpickled {where} fails its own task with "
    "parfn.SerializationError (a pickle.PicklingError) saying so, and nothing else; the "
    "standard library reports BrokenProcessPool because there {consequence}"
)
PICKLED_AT_SUBMIT = (
    "parfn pickles a call in submit(), in the caller: a call that cannot be pickled (here "
    "a multiprocessing Semaphore, which pickles only while a process starts) fails its own "
    "future at once and never reaches the pool, so no worker starts for it; the standard "
    "library starts a worker for it, then fails it when its queue thread pickles it, and "
    "the test counts those workers"
)
BY_DESIGN: dict[str, str] = {
    "test_process_pool.test_killed_child": NEVER_BROKEN,
    "test_process_pool.test_saturation": PICKLED_AT_SUBMIT,
    "test_process_pool.test_python_finalization_error": (
        "the test makes the start of the standard library's second internal thread (its "
        "queue feeder) fail, as at interpreter finalization, and expects BrokenProcessPool; "
        "a parfn pool starts a single thread, so nothing fails, and the test's map call "
        "(whose arguments do not fit the function) raises its TypeError instead"
    ),
    "test_shutdown.test_processes_terminate": PICKLED_AT_SUBMIT,
    "test_shutdown.test_del_shutdown": PRIVATE.format(
        attrs="_call_queue, _executor_manager_thread"
    ),
    "test_shutdown.test_shutdown_no_wait": PRIVATE.format(
        attrs="_call_queue, _executor_manager_thread"
    ),
    **{
        f"test_init.ProcessPool{method}FailingInitializerTest.test_initializer": (
            "an initializer that raises does not break a parfn executor; the test expects "
            "BrokenExecutor, the private _broken flag, and the standard library worker's "
            "'Exception in initializer' log record"
        )
        for method in ("Fork", "Forkserver", "Spawn")
    },
    "test_init.FailingInitializerResourcesTest.test_spawn": (
        "runs the failing-initializer test above (a difference by design) inside it, then "
        "checks the resource tracker"
    ),
    "test_init.FailingInitializerResourcesTest.test_forkserver": (
        "runs the failing-initializer test above (a difference by design) inside it, then "
        "checks the resource tracker"
    ),
    "test_deadlock.test_error_at_task_unpickle": DATA_ERROR.format(
        what="an argument",
        where="in the worker",
        consequence="the worker process dies of it",
    ),
    "test_deadlock.test_error_during_result_unpickle_in_result_handler": DATA_ERROR.format(
        what="a result",
        where="in the caller",
        consequence="its manager thread gives up on the pool",
    ),
    "test_deadlock.test_exit_during_result_unpickle_in_result_handler": DATA_ERROR.format(
        what="a result (here: its unpickling calls sys.exit())",
        where="in the caller",
        consequence="its manager thread gives up on the pool",
    ),
    "test_deadlock.test_exit_during_result_pickle_on_worker": (
        "a result whose pickling calls sys.exit() ends the worker process: the task fails "
        "with parfn.WorkerCrashed (a BrokenProcessPool) and the worker is replaced; the "
        "standard library's worker catches the SystemExit and returns it as the result"
    ),
    "test_deadlock.test_shutdown_deadlock_pickle": PRIVATE.format(attrs="_executor_manager_thread"),
}

ONE_PROCESS = "*"
"""The ``--class`` of a child that runs tests of several classes (``--one-process``)."""
START_METHOD_CLASSES = ("Forkserver", "Fork", "Spawn")
"""How a class's name says its start method (Forkserver before Fork: it contains it)."""

FIXTURE_TIMEOUT = 60.0
"""Seconds the class and module fixtures between and after tests may take."""
OUTCOME_PASS = ("pass", "flaky")
OUTCOME_BAD = ("fail", "error", "timeout", "crash")


# -- the child: runs one class's tests, one event line per test -------------------
def install_parfn() -> None:
    """Put parfn.ProcessPoolExecutor in place of the standard library's."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p
    )
    import concurrent.futures
    import concurrent.futures.process

    from parfn._executor import ProcessPoolExecutor

    concurrent.futures.ProcessPoolExecutor = ProcessPoolExecutor  # type: ignore[misc]
    concurrent.futures.process.ProcessPoolExecutor = ProcessPoolExecutor  # type: ignore[misc]

    # Tests that start a fresh interpreter with assert_python_ok("-c", code) get
    # the same substitution there: prefix the code with it.
    from test.support import script_helper

    prefix = (
        f"import sys; sys.path.insert(0, {str(SRC)!r}); "
        "import concurrent.futures as _cf, concurrent.futures.process as _cfp; "
        "from parfn._executor import ProcessPoolExecutor as _ppe; "
        "_cf.ProcessPoolExecutor = _cfp.ProcessPoolExecutor = _ppe; "
        "del _cf, _cfp, _ppe\n"
    )
    original = script_helper.run_python_until_end

    def run_python_until_end(*args: str, **env_vars: Any) -> Any:
        if "-c" in args:
            i = args.index("-c") + 1
            args = (*args[:i], prefix + args[i], *args[i + 1 :])
        return original(*args, **env_vars)

    script_helper.run_python_until_end = run_python_until_end


class EventResult(unittest.TestResult):
    """Writes a JSON line as each test starts and ends; a watchdog bounds each test."""

    def __init__(self, events: Any, timeout: float) -> None:
        super().__init__()
        self.events = events
        self.timeout = timeout
        self.outcome: dict[str, Any] = {}

    def _write(self, **record: Any) -> None:
        self.events.write(json.dumps(record) + "\n")
        self.events.flush()

    def _arm(self, timeout: float | None = None) -> None:
        faulthandler.dump_traceback_later(timeout or self.timeout, exit=True, file=sys.stderr)

    def startTest(self, test: unittest.TestCase) -> None:
        super().startTest(test)
        self.outcome = {"outcome": "pass", "detail": "", "traceback": ""}
        self.started = time.monotonic()
        self._write(event="start", test=test.id())
        print(f"\n=== {test.id()}", file=sys.stderr, flush=True)
        self._arm()

    def stopTest(self, test: unittest.TestCase) -> None:
        # Re-armed, not cancelled: class and module set-up and tear-down are
        # bounded too. A hang there is reported for the class, not for a test.
        self._arm(min(self.timeout, FIXTURE_TIMEOUT))
        # An executor a failed test left in a reference cycle would keep its
        # workers, and the module's tear-down waits for them: collect it now.
        gc.collect()
        super().stopTest(test)
        self._write(
            event="end", test=test.id(), duration=time.monotonic() - self.started, **self.outcome
        )

    def _bad(self, kind: str, err: Any) -> None:
        if self.outcome.get("outcome") in ("fail", "error"):
            return  # keep the first failure (subtests)
        exc_type, exc, tb = err
        self.outcome = {
            "outcome": kind,
            "detail": traceback.format_exception_only(exc_type, exc)[-1].strip()[:300],
            "traceback": "".join(traceback.format_exception(exc_type, exc, tb))[-4000:],
        }

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        if isinstance(test, unittest.TestCase):
            self._bad("error", err)
        else:  # a module or class fixture failed (unittest's _ErrorHolder)
            self._write(
                event="fixture-error",
                test=str(test),
                detail=traceback.format_exception_only(err[0], err[1])[-1].strip()[:300],
            )

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self._bad("fail", err)

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._bad("fail" if issubclass(err[0], test.failureException) else "error", err)

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self.outcome = {"outcome": "skip", "detail": reason[:300], "traceback": ""}

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self.outcome = {"outcome": "pass", "detail": "expected failure", "traceback": ""}

    def addUnexpectedSuccess(self, test: Any) -> None:
        super().addUnexpectedSuccess(test)
        self.outcome = {"outcome": "fail", "detail": "unexpected success", "traceback": ""}


def child_main(args: argparse.Namespace) -> int:
    if args.against == "parfn":
        install_parfn()
    if args.cls == ONE_PROCESS:  # tests named "module.Class.test", of any class
        suite = unittest.TestSuite()
        for test_id in args.tests.split(","):
            module_name, class_name, name = test_id.split(".")
            module = importlib.import_module(f"{PACKAGE}.{module_name}")
            suite.addTest(getattr(module, class_name)(name))
    else:
        module_name, class_name = args.cls.rsplit(".", 1)
        module = importlib.import_module(f"{PACKAGE}.{module_name}")
        cls = getattr(module, class_name)
        suite = unittest.TestSuite(cls(name) for name in args.tests.split(","))
    return run_suite(suite, args.events, args.test_timeout)


def run_suite(suite: unittest.TestSuite, events_path: str, test_timeout: float) -> int:
    """Run ``suite`` in this child, each test's outcome appended to ``events_path``."""
    with open(events_path, "a", encoding="utf-8") as events:
        result = EventResult(events, test_timeout)
        result._arm()
        suite.run(result)
    faulthandler.cancel_dump_traceback_later()
    return 0


# -- the parent: children, reruns, the table -------------------------------------
def discover(patterns: list[str]) -> dict[str, list[str]]:
    """{"module.Class": [test names]} for the process-pool classes of MODULES."""
    loader = unittest.TestLoader()
    found: dict[str, list[str]] = {}
    for module_name in MODULES:
        module = importlib.import_module(f"{PACKAGE}.{module_name}")
        for name, obj in sorted(vars(module).items()):
            if not (isinstance(obj, type) and issubclass(obj, unittest.TestCase)):
                continue
            if obj.__module__ != module.__name__:
                continue
            if not name.startswith("ProcessPool") and name not in EXTRA_CLASSES.get(
                module_name, ()
            ):
                continue
            tests = [
                t
                for t in loader.getTestCaseNames(obj)
                if all(p in f"{module_name}.{name}.{t}" for p in patterns)
            ]
            if tests:
                found[f"{module_name}.{name}"] = tests
    return found


def run_class(
    against: str, cls: str, tests: list[str], out: Path, timeout: float, log: Any, notes: list[str]
) -> dict[str, dict[str, Any]]:
    """Run ``tests`` of ``cls`` in children until each has an outcome.

    A child that hangs or dies after its last test (in a class or module
    tear-down) adds a line to ``notes``.
    """
    results: dict[str, dict[str, Any]] = {}
    remaining = list(tests)
    while remaining:
        events_path = out / f".events-{os.getpid()}.jsonl"
        events_path.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-X",
            "faulthandler",
            __file__,
            "--child",
            "--against",
            against,
            "--class",
            cls,
            "--tests",
            ",".join(remaining),
            "--events",
            str(events_path),
            "--test-timeout",
            str(timeout),
        ]
        log.write(f"\n##### {against} {cls}: {' '.join(remaining)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=log, start_new_session=True, cwd=tempfile.gettempdir()
        )
        backstop = timeout * (len(remaining) + 2)
        killed = False
        try:
            proc.wait(backstop)
        except subprocess.TimeoutExpired:
            killed = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the child's leftover workers too
        proc.wait()
        started: str | None = None
        fixture_errors: list[str] = []
        with contextlib.suppress(FileNotFoundError):
            for line in events_path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                name = record["test"].rsplit(".", 1)[-1]
                if cls == ONE_PROCESS and record["event"] != "fixture-error":
                    name = record["test"].removeprefix(PACKAGE + ".")  # module.Class.test
                if record["event"] == "start":
                    started = name
                elif record["event"] == "end":
                    started = None
                    results[name] = {k: record[k] for k in ("outcome", "detail", "duration")}
                    results[name]["traceback"] = record.get("traceback", "")
                else:
                    fixture_errors.append(record["detail"])
        events_path.unlink(missing_ok=True)
        if started is not None:
            how = "timeout" if killed or proc.returncode == 1 else "crash"
            detail = (
                f"no result within {timeout:.0f}s: the watchdog ended the run"
                if how == "timeout"
                else f"the test process died (exit code {proc.returncode})"
            )
            results[started] = {"outcome": how, "detail": detail, "duration": 0.0, "traceback": ""}
        left = [t for t in remaining if t not in results]
        if not left and started is None and proc.returncode != 0:
            notes.append(
                f"{against} {cls}: after its last test the run "
                + ("hung in tear-down" if proc.returncode == 1 else "died")
                + f" (exit code {proc.returncode}); see the log"
            )
        if left and started is None:
            # The child ended without starting them: a fixture failed, or it died
            # between tests. Either way they cannot run in this class.
            detail = "; ".join(fixture_errors) or f"not run (exit code {proc.returncode})"
            for t in left:
                results[t] = {"outcome": "error", "detail": detail, "duration": 0.0}
            left = []
        remaining = left
    return results


def by_start_method(classes: dict[str, list[str]]) -> dict[str, list[str]]:
    """The tests of ``classes``, as "module.Class.test", grouped by start method
    (for ``--one-process``); a class of no one start method is a group of its own."""
    groups: dict[str, list[str]] = {}
    for cls, tests in classes.items():
        name = cls.split(".")[1]
        method = next((m for m in START_METHOD_CLASSES if m in name), name)
        groups.setdefault(method.lower(), []).extend(f"{cls}.{t}" for t in tests)
    return groups


def run_side(against: str, args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    classes = discover(args.k)
    if args.one_process:
        # Each group is one "class" whose tests are full ids: one child runs them all.
        classes = {ONE_PROCESS + group: ids for group, ids in by_start_method(classes).items()}
    suffix = "-one-process" if args.one_process else ""
    total = sum(len(v) for v in classes.values())
    log_path = out / f"{against}{suffix}.log"
    print(f"[{against}] {total} tests in {len(classes)} groups; log: {log_path}")
    results: dict[str, Any] = {}
    notes: list[str] = []
    started = time.monotonic()
    with open(out / f"{against}{suffix}.log", "w", encoding="utf-8") as log:
        for cls, tests in classes.items():
            t0 = time.monotonic()
            child_cls = ONE_PROCESS if args.one_process else cls
            got = run_class(against, child_cls, tests, out, args.test_timeout, log, notes)
            # A failure gets a second try; a hang does not (it is never acceptable).
            bad = [t for t in tests if got[t]["outcome"] in ("fail", "error")]
            for _ in range(args.reruns):
                if not bad:
                    break
                again = run_class(against, child_cls, bad, out, args.test_timeout, log, notes)
                for t in bad:
                    got[t]["first"] = dict(got[t])
                    if again[t]["outcome"] in OUTCOME_PASS:
                        got[t]["outcome"] = "flaky"
                        got[t]["detail"] = "passed on the second try; first: " + got[t]["detail"]
                bad = [t for t in bad if got[t]["outcome"] in ("fail", "error")]
            for t in tests:
                results[t if args.one_process else f"{cls}.{t}"] = got[t]
            counts = _count(got[t]["outcome"] for t in tests)
            print(f"[{against}] {cls}: {counts} ({time.monotonic() - t0:.0f}s)", flush=True)
    data = {
        "against": against,
        "python": sys.version.split()[0],
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started),
        "selection": args.k,
        "notes": notes,
        "tests": results,
    }
    previous = load(out / f"{against}{suffix}.json")
    if args.k and previous is not None:
        # A selection updates the last full run's results in place.
        previous["tests"].update(results)
        rerun = {cls for cls in classes}
        kept = [n for n in previous.get("notes", []) if n.split()[1] not in rerun]
        previous["notes"] = [*kept, *notes]
        previous["updated"] = f"{data['date']} ({' '.join(args.k)})"
        data = previous
    (out / f"{against}{suffix}.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    return data


def _count(outcomes: Any) -> str:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    return ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))


def by_design_reason(test_id: str) -> str | None:
    module, cls, method = test_id.split(".")
    return BY_DESIGN.get(f"{module}.{cls}.{method}") or BY_DESIGN.get(f"{module}.{method}")


def _matches(key: str, test_id: str) -> bool:
    module, cls, method = test_id.split(".")
    return key in (f"{module}.{method}", test_id)


def verdict(stdlib: dict[str, Any] | None, parfn: dict[str, Any], test_id: str) -> str:
    outcome = parfn["outcome"]
    if outcome == "skip":
        return "skip"
    if outcome in OUTCOME_PASS:
        return "pass*" if outcome == "flaky" else "pass"
    if by_design_reason(test_id) and outcome in ("fail", "error"):
        return "by-design"
    if stdlib is not None and stdlib["outcome"] not in ("pass", "skip"):
        return "stdlib-too"
    return "FAIL" if stdlib is not None else "FAIL?"


def report(stdlib: dict[str, Any] | None, parfn: dict[str, Any] | None, verbose: bool) -> int:
    """Print the table and the summary; return the number of real failures."""
    sides = [d for d in (stdlib, parfn) if d is not None]
    ids = sorted({t for d in sides for t in d["tests"]})
    s_tests = stdlib["tests"] if stdlib else {}
    p_tests = parfn["tests"] if parfn else {}
    verdicts = {t: verdict(s_tests.get(t), p_tests[t], t) for t in ids if t in p_tests}
    width = max((len(t) for t in ids), default=10)
    print(f"\n{'test':<{width}}  {'stdlib':<8}  {'parfn':<8}  verdict")
    print("-" * (width + 32))
    for t in ids:
        s, p = s_tests.get(t, {}), p_tests.get(t, {})
        print(
            f"{t:<{width}}  {s.get('outcome', '-'):<8}  {p.get('outcome', '-'):<8}  "
            f"{verdicts.get(t, '')}"
        )
    if parfn is not None:
        problems = [t for t, v in verdicts.items() if v in ("FAIL", "FAIL?", "stdlib-too")]
        if problems:
            print("\nFailures on parfn that are not by design:")
            for t in problems:
                print(f"  {verdicts[t]:<10} {t}: {p_tests[t]['detail']}")
                if verbose and p_tests[t].get("traceback"):
                    print("    " + p_tests[t]["traceback"].replace("\n", "\n    "))
        listed = [t for t, v in verdicts.items() if v == "by-design"]
        if listed:
            print("\nDifferences by design (what parfn did):")
            for t in listed:
                print(f"  {t}: {p_tests[t]['detail']}")
            reasons: dict[str, list[str]] = {}
            for t in listed:
                reasons.setdefault(by_design_reason(t) or "", []).append(t.split(".")[-1])
            print("\nThe reasons:")
            for reason, names in reasons.items():
                print(f"  {', '.join(sorted(set(names)))}: {reason}")
        passing = [
            key
            for key in BY_DESIGN
            if (hits := [v for t, v in verdicts.items() if _matches(key, t)])
            and all(v.startswith("pass") for v in hits)
        ]
        if passing:
            print("\nListed as by design but passing (the list could shrink):")
            for key in passing:
                print(f"  {key}")
    for d in sides:
        for note in d.get("notes", []):
            print(f"note: {note}")
    print("\nSummary")
    for d in sides:
        c = {k: 0 for k in ("pass", "flaky", "fail", "error", "timeout", "crash", "skip")}
        for r in d["tests"].values():
            c[r["outcome"]] += 1
        when = d.get("updated") or d["date"]
        print(
            f"  {d['against']:<6} (Python {d['python']}, {when}): {len(d['tests'])} tests: "
            f"{c['pass']} passed, {c['flaky']} passed on a retry, "
            f"{c['fail'] + c['error']} failed, {c['timeout']} timed out, "
            f"{c['crash']} crashed, {c['skip']} skipped"
        )
    if parfn is None:
        return 0
    v = list(verdicts.values())
    print(
        f"  parfn against stdlib: {v.count('pass') + v.count('pass*')} passed "
        f"({v.count('pass*')} on a retry), {v.count('FAIL') + v.count('FAIL?')} failed, "
        f"{v.count('by-design')} by design, {v.count('stdlib-too')} fail on stdlib too, "
        f"{v.count('skip')} skipped"
    )
    if stdlib is None:
        print("  (no stdlib baseline yet: run with --against stdlib or both)")
    return v.count("FAIL") + v.count("FAIL?")


def load(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", choices=("parfn", "stdlib", "both"), default="both")
    parser.add_argument(
        "-k",
        action="append",
        default=[],
        metavar="TEXT",
        help="only tests whose id (module.Class.test) contains TEXT; repeatable (all must match)",
    )
    parser.add_argument("--test-timeout", type=float, default=90.0, help="seconds per test")
    parser.add_argument("--reruns", type=int, default=1, help="reruns of a failing test")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(tempfile.gettempdir()) / "parfn-cpython-executor-tests",
        help="where results (JSON) and logs go",
    )
    parser.add_argument("--report-only", action="store_true", help="print the last results")
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="run the tests of each start method in one process (not one per class)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks of failures")
    # The child's own arguments.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--class", dest="cls", help=argparse.SUPPRESS)
    parser.add_argument("--tests", help=argparse.SUPPRESS)
    parser.add_argument("--events", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    if sys.version_info[:2] != (3, 13):
        print(f"note: these are CPython 3.13's tests; this is Python {sys.version.split()[0]}")
    sides = ("stdlib", "parfn") if args.against == "both" else (args.against,)
    suffix = "-one-process" if args.one_process else ""
    data: dict[str, dict[str, Any] | None] = {
        s: load(args.out / f"{s}{suffix}.json") for s in ("stdlib", "parfn")
    }
    if not args.report_only:
        for side in sides:
            data[side] = run_side(side, args)
    if args.against == "stdlib":
        data["parfn"] = None
    failures = report(data["stdlib"], data["parfn"], args.verbose)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
