"""Scripts shaped like users' code, written to files and run as ``python script.py``.

The matrix (``tests/user_scripts.py``): how the function is defined (an
importable module, the script, a lambda, a closure, a bound method, a
partial) x where the call comes from (the main thread, user threads, asyncio,
a nested call inside a task, the child of the user's ``os.fork()``, and after
that fork) x start method (the default, fork, forkserver, spawn) x entry point
(the decorator, ``parfn.Pool``, ``parfn.ProcessPoolExecutor``). One child
Python per start method and entry point prints one line per case; a case that
hangs is ended by the script's watchdog and named here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from . import _scripts, user_scripts

START_METHODS = ["default", "fork", "forkserver", "spawn"]

ENTRIES = ["decorator", "pool", "executor"]


def run_script(
    tmp_path: Path, text: str, *args: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Write ``text`` as ``script.py`` (with ``helpers.py`` beside it) and run it;
    its exit code is for ``case_lines`` to judge, after naming any case that hung."""
    return _scripts.run_script(
        tmp_path,
        text,
        *args,
        name="script.py",
        modules={"helpers": user_scripts.HELPERS},
        timeout=timeout,
        check=False,
    )


def case_lines(out: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """``{case: outcome}`` from the script's output; a case that started and
    never finished fails here, by name, with the watchdog's tracebacks."""
    started: list[str] = []
    outcomes: dict[str, str] = {}
    for line in out.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word == "start":
            started.append(rest)
        elif word == "case":
            name, _, outcome = rest.partition(" ")
            outcomes[name] = outcome
    hung = [name for name in started if name not in outcomes]
    assert not hung, f"hung in {hung} (the watchdog ended it):\n{out.stderr[-6000:]}"
    assert out.returncode == 0, f"exit code {out.returncode}:\n{out.stderr[-6000:]}"
    return outcomes


def assert_all_ok(outcomes: dict[str, str], expected: set[str]) -> None:
    """Exactly the ``expected`` cases ran, and each printed ``ok``."""
    assert set(outcomes) == expected
    wrong = {name: outcome for name, outcome in outcomes.items() if outcome != "ok"}
    assert not wrong, f"{len(wrong)} of {len(outcomes)} cases failed: {wrong}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_matrix(tmp_path: Path, start_method: str, entry: str) -> None:
    sm = None if start_method == "default" else start_method
    out = run_script(tmp_path, user_scripts.MATRIX.format(sm=sm, entry=entry))
    outcomes = case_lines(out)
    assert "end" in out.stdout.splitlines(), out.stderr[-6000:]
    definitions = ["module", "script", "lambda", "closure", "method", "partial"]
    sites = ["main", "threads", "asyncio", "nested", "fork-child/main", "after-fork/main"]
    expected = {f"{site}/{d}" for site in sites for d in definitions} | {"fork-parent/wait"}
    assert_all_ok(outcomes, expected)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_scripts_functions_see_the_workers_main(tmp_path: Path, start_method: str) -> None:
    """Items 4 and 5: the initializer's globals, pickle of the script's names,
    for functions named in the script, defined in the guard, or after the pool."""
    sm = None if start_method == "default" else start_method
    out = run_script(tmp_path, user_scripts.WORLD.format(sm=sm))
    outcomes = case_lines(out)
    assert_all_ok(
        outcomes,
        {
            "pool/script",
            "pool/decorated",
            "pool/in-guard",
            "pool/late",
            "pool/apply",
            "executor/script",
        },
    )


@pytest.mark.timeout(300)
def test_counting_nesting_interrupts_shutdown_and_fork(tmp_path: Path) -> None:
    """Items 6 and 8, a task's KeyboardInterrupt, threads racing
    ``parfn.shutdown()``, and the default pool in the child of ``os.fork()``."""
    out = run_script(tmp_path, user_scripts.ITEMS.format())
    outcomes = case_lines(out)
    assert "end" in out.stdout.splitlines(), out.stderr[-6000:]
    assert_all_ok(
        outcomes,
        {
            "max-tasks/map",
            "max-tasks/chunks",
            "max-tasks/spawn",
            "max-tasks/executor",
            "thread-nested",
            "keyboard-interrupt",
            "shutdown-race",
            "user-fork",
        },
    )


@pytest.mark.timeout(300)
def test_closures_over_big_data_are_let_go(tmp_path: Path) -> None:
    """Item 9: 16 rounds of a closure over 32 MB of fresh data. The tables
    keep a few (64 MiB of functions), not all: from the 4th round on neither
    the parent nor a worker grows (the old code grew both by ~32 MB a round)."""
    out = run_script(tmp_path, user_scripts.MEMORY, "16", "32")
    assert out.returncode == 0, out.stderr[-6000:]
    sizes = {}
    for line in out.stdout.splitlines():
        who, first, last = line.split()
        sizes[who] = (int(first), int(last))
    for who in ("parent", "worker"):
        first, last = sizes[who]
        assert last - first < 100, f"the {who} grew from {first} MB to {last} MB"


REDEFINED = """
import sys

import parfn

METHOD = None if sys.argv[1] == "default" else sys.argv[1]


def version(x):
    return ("first", x)


def other(x):
    return ("other", x)


def get_config():  # memoized by rebinding its own name, in the worker
    global get_config
    config = {"ready": True}
    get_config = lambda: config  # noqa: E731
    return config


def uses_config(x):
    return (get_config()["ready"], x)


def work(x):
    return ("the script's", x)


def rebind_work():  # an initializer that rebinds a script function in the worker
    global work

    def work(x):
        return ("rebound", x)


class AnswersAnything(type):
    def __getattr__(cls, name):
        return f"<{name}>"


class Settings(metaclass=AnswersAnything):  # an unrelated global with odd attributes
    pass


settings = Settings()


if __name__ == "__main__":
    with parfn.Pool(1, start_method=METHOD, initializer=rebind_work) as pool:
        print(pool.apply(uses_config, 1), pool.apply(get_config), pool.apply(work, 2))
    with parfn.Pool(2, start_method=METHOD) as pool:
        print(pool.apply(version, 1))

        def version(x):  # the same name, new code, after the pool started
            return ("second", x)

        print(pool.apply(version, 2), pool.map(version, [3]))
        other.__code__ = (lambda x: ("third", x)).__code__  # changed in place
        print(pool.apply(other, 4))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", _scripts.SCRIPT_METHODS)
def test_a_function_redefined_after_the_pool_started_runs_its_new_code(
    tmp_path: Path, start_method: str
) -> None:
    """Workers forked when the pool started have the script's functions of
    then, and get them by name alone; a function defined or changed since
    travels by value."""
    out = _scripts.run_script(tmp_path, REDEFINED, start_method).stdout
    assert out.splitlines() == [
        "(True, 1) {'ready': True} (\"the script's\", 2)",
        "('first', 1)",
        "('second', 2) [('second', 3)]",
        "('third', 4)",
    ]


OWN_CLASSES = """
import dataclasses
import sys

import parfn

METHOD = None if sys.argv[1] == "default" else sys.argv[1]


class MyError(Exception):
    pass


@dataclasses.dataclass
class Point:
    x: int


def fail(x):
    raise MyError(f"bad {x}")


def make(x):
    return Point(x)


if __name__ == "__main__":
    with parfn.Pool(2, start_method=METHOD) as pool:
        try:
            pool.apply(fail, 1)
        except MyError as exc:
            print("caught", exc)
        got = pool.map(make, [1, 2])
        print(got == [Point(1), Point(2)], all(type(p) is Point for p in got))
        print([type(e) is MyError for e in pool.map(fail, [3], return_exceptions=True)])

        class Late(Exception):  # defined after the pool started
            pass

        def late(x):
            raise Late(x)

        try:
            pool.apply(late, 4)
        except Late as exc:
            print("caught late", exc)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", _scripts.SCRIPT_METHODS)
def test_the_scripts_own_classes_come_back_as_themselves(tmp_path: Path, start_method: str) -> None:
    """A worker's results and exceptions of classes the script defines are the
    script's own classes in the caller: ``except MyError`` catches."""
    out = _scripts.run_script(tmp_path, OWN_CLASSES, start_method).stdout
    assert out.splitlines() == ["caught bad 1", "True True", "[True]", "caught late 4"]


OWN_ARGUMENTS = """
import dataclasses
import enum
import sys

import parfn

METHOD = None if sys.argv[1] == "default" else sys.argv[1]


@dataclasses.dataclass
class Point:
    x: int


class Color(enum.Enum):
    RED = 1


def init():
    global SEEN
    SEEN = "set by the initializer"


def seen(_):
    return SEEN


def check(p):
    return isinstance(p, Point), p.x


def same(c):
    return c is Color.RED


def call(f):
    return f(0)


def describe(p):
    return f"{p.x} {type(p).unit}"


@dataclasses.dataclass
class Rec:
    a: int


def fields(r):
    return [f.name for f in dataclasses.fields(r)], type(r) is Rec


def ks(a, b):
    return type(a).k, type(b).k


if __name__ == "__main__":
    with parfn.Pool(2, start_method=METHOD, initializer=init) as pool:
        print(pool.apply(check, Point(1)), pool.map(check, [Point(2), Point(3)]))
        print(pool.apply(same, Color.RED), pool.map(same, [Color.RED]))
        print(pool.apply(call, seen))  # a function of the script, passed as an argument

        @dataclasses.dataclass
        class Late:  # defined after the pool started: travels by value
            x: int

        Late.unit = "cm"
        print(pool.apply(describe, Late(4)))
        Late.unit = "m"  # changed since it was last sent: sent anew
        print(pool.apply(describe, Late(5)))

        print(pool.apply(fields, Rec(1)))

        @dataclasses.dataclass
        class Rec:  # redefined: the worker's Rec is another class now
            a: int
            b: int

        print(pool.apply(fields, Rec(1, 2)))

        class Base:
            k = 1

        class Sub(Base):
            pass

        print(pool.apply(ks, Base(), Sub()))
        Base.k = 2  # Sub's copy, made before, must not bring back k = 1
        print(pool.apply(ks, Sub(), Base()), pool.apply(ks, Base(), Sub()))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", _scripts.SCRIPT_METHODS)
def test_the_scripts_own_classes_and_functions_as_arguments(
    tmp_path: Path, start_method: str
) -> None:
    """An argument of a class (or a function) the script defines is, in a
    worker, the worker's own class (function), as ``multiprocessing`` passes
    it: not a copy of it made by value (and a class the worker lacks comes by value)."""
    lines = _scripts.run_script(tmp_path, OWN_ARGUMENTS, start_method).stdout.splitlines()
    assert lines == [
        "(True, 1) [(True, 2), (True, 3)]",
        "True [True]",
        "set by the initializer",
        "4 cm",
        "5 m",
        "(['a'], True)",
        "(['a', 'b'], False)",
        "(1, 1)",
        "(2, 2) (2, 2)",
    ]


CHUNKED_WITH_INITIALIZER = """
import multiprocessing
import sys

import parfn

METHOD = None if sys.argv[1] == "default" else sys.argv[1]


def init(base):
    global BASE
    BASE = base


def with_base(x):
    return BASE + x


if __name__ == "__main__":
    context = multiprocessing.get_context(METHOD)
    with parfn.ProcessPoolExecutor(1, mp_context=context, initializer=init, initargs=(100,)) as ex:
        print(list(ex.map(with_base, range(6), chunksize=3)))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", _scripts.SCRIPT_METHODS)
def test_the_executors_chunked_map_sees_the_initializers_globals(
    tmp_path: Path, start_method: str
) -> None:
    """As with the standard library's: a script's function runs with the
    worker's globals, chunked or not."""
    out = _scripts.run_script(tmp_path, CHUNKED_WITH_INITIALIZER, start_method).stdout
    assert out.splitlines() == ["[100, 101, 102, 103, 104, 105]"]


UNSENDABLE_IN_GUARD = """
import sys
import threading

import parfn

METHOD = None if sys.argv[1] == "default" else sys.argv[1]

if __name__ == "__main__":
    LOCK = threading.Lock()

    def guarded(x):  # inside the guard: a spawned worker's __main__ lacks it
        with LOCK:
            return x

    with parfn.Pool(1, start_method=METHOD) as pool:
        try:
            print(pool.apply(guarded, 1))
        except parfn.SerializationError as exc:
            print(exc)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", _scripts.SCRIPT_METHODS)
def test_a_function_a_worker_lacks_and_that_cannot_travel_says_why(
    tmp_path: Path, start_method: str
) -> None:
    out = _scripts.run_script(tmp_path, UNSENDABLE_IN_GUARD, start_method).stdout
    if start_method in ("default", "fork"):
        assert out == "1\n"  # a forked worker has it, lock and all
    else:
        assert "__main__ has no function 'guarded' here" in out, out
        assert "(TypeError: cannot pickle '_thread.lock' object)" in out, out
