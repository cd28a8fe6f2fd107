"""The user scripts the tests in ``test_user_scripts.py`` write to files and run.

Each is a template: ``{sm}`` becomes the start method (``None`` for the
default) and ``{entry}`` the entry point. Every script is shaped like a
user's: its functions defined in the script, the ``__main__`` guard, the
default pool where a user would use it. It prints one line per case
(``start NAME`` as the case begins, then ``case NAME ok`` or ``case NAME
WRONG ...``/``ERROR ...``), and a per-case watchdog (``faulthandler``) ends
it, with every thread's traceback, if a case hangs.
"""

from __future__ import annotations

HELPERS = """
def square(x):
    return x * x + 1
"""
"""``helpers.py``, beside the script: a function of an importable module."""

WATCHDOG = """
import faulthandler
import os
import signal
import sys

CASE_TIMEOUT = 45


def say(*words):
    # One line in one write: the lines of the user's fork child and of its
    # parent cannot interleave (with PYTHONUNBUFFERED set, print writes each
    # word apart).
    sys.stdout.flush()
    os.write(1, (" ".join(str(w) for w in words) + "\\n").encode())


def start(name):
    say("start", name)
    faulthandler.dump_traceback_later(CASE_TIMEOUT, exit=True)


def check(name, got, want):
    faulthandler.cancel_dump_traceback_later()
    say("case", name, "ok" if got == want else f"WRONG {{got!r}} != {{want!r}}")


def failed(name, exc):
    faulthandler.cancel_dump_traceback_later()
    say("case", name, f"ERROR {{type(exc).__name__}}: {{exc}}".replace("\\n", " "))
"""

MATRIX = (
    WATCHDOG
    + '''
import asyncio
import functools
import multiprocessing
import threading

import parfn
import helpers

SM = {sm!r}
ENTRY = {entry!r}


def square(x):
    return x * x + 1


class Scaler:
    def __init__(self, k):
        self.k = k

    def apply(self, x):
        return x * x + self.k


def add(a, x):
    return a + x * x


def make_closure(k):
    def inner(x):
        return x * x + k

    return inner


FUNCS = {{
    "module": helpers.square,
    "script": square,
    "lambda": lambda x: x * x + 1,
    "closure": make_closure(1),
    "method": Scaler(1).apply,
    "partial": functools.partial(add, 1),
}}
WANT = [x * x + 1 for x in range(4)]


def nested(name):
    # In a worker: a decorated call of its own, which stays in that worker.
    return parfn.parallel(FUNCS[name]).map(range(4))


class Entry:
    """The entry point under test: the decorator, parfn.Pool, or the executor."""

    def __init__(self):
        self.pool = self.ex = self.block = None

    def __enter__(self):
        if ENTRY == "pool":
            self.pool = parfn.Pool(2, start_method=SM)
        elif ENTRY == "executor":
            ctx = None if SM is None else multiprocessing.get_context(SM)
            self.ex = parfn.ProcessPoolExecutor(2, mp_context=ctx)
        elif SM is not None:  # the decorator, in a with-block of that start method
            self.block = parfn.Pool(2, start_method=SM)
            self.block.__enter__()
        return self  # the decorator with no start method: the default pool

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown()
        if self.ex is not None:
            self.ex.shutdown()
        if self.block is not None:
            self.block.__exit__(*exc)
        parfn.shutdown()

    def map(self, fn):
        if ENTRY == "pool":
            return self.pool.map(fn, range(4))
        if ENTRY == "executor":
            return list(self.ex.map(fn, range(4), timeout=CASE_TIMEOUT))
        return parfn.parallel(fn).map(range(4))

    def one(self, fn, arg):
        if ENTRY == "pool":
            return self.pool.apply(fn, arg)
        if ENTRY == "executor":
            return self.ex.submit(fn, arg).result(timeout=CASE_TIMEOUT)
        return parfn.parallel(fn).apply(arg)

    async def gather(self, fn):
        if ENTRY == "executor":
            loop = asyncio.get_running_loop()
            calls = [loop.run_in_executor(self.ex, fn, x) for x in range(4)]
        elif ENTRY == "pool":
            calls = [self.pool.spawn(fn, x) for x in range(4)]
        else:
            calls = [parfn.parallel(fn).spawn(x) for x in range(4)]
        return list(await asyncio.wait_for(asyncio.gather(*calls), CASE_TIMEOUT))


def in_threads(entry, fn):
    out = [None] * 3

    def user(i):
        out[i] = entry.map(fn)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


SITES = {{
    "main": lambda entry, name: (entry.map(FUNCS[name]), WANT),
    "threads": lambda entry, name: (in_threads(entry, FUNCS[name]), [WANT] * 3),
    "asyncio": lambda entry, name: (asyncio.run(entry.gather(FUNCS[name])), WANT),
    "nested": lambda entry, name: (entry.one(nested, name), WANT),
}}


def run_cases(entry, sites, prefix=""):
    for site in sites:
        for name in FUNCS:
            case = f"{{prefix}}{{site}}/{{name}}"
            start(case)
            try:
                got, want = SITES[site](entry, name)
            except BaseException as exc:
                failed(case, exc)
            else:
                check(case, got, want)


def after_fork():
    """The user's own os.fork(), while the pool runs: the child uses parfn too."""
    sys.stdout.flush()
    faulthandler.cancel_dump_traceback_later()  # its thread would not exist in the child
    pid = os.fork()
    if pid == 0:
        signal.alarm(3 * CASE_TIMEOUT)  # the child's watchdog, besides its cases'
        try:
            with Entry() as entry:
                run_cases(entry, ["main"], prefix="fork-child/")
        finally:
            sys.stdout.flush()
            os._exit(0)
    start("fork-parent/wait")
    _, status = os.waitpid(pid, 0)
    check("fork-parent/wait", os.waitstatus_to_exitcode(status), 0)


if __name__ == "__main__":
    with Entry() as entry:
        run_cases(entry, list(SITES))
        after_fork()
        run_cases(entry, ["main"], prefix="after-fork/")
    print("end", flush=True)
'''
)
"""The matrix: every way of defining the function x every call site, for one
start method and one entry point."""

WORLD = (
    WATCHDOG
    + """
import multiprocessing
import pickle
from dataclasses import dataclass

import parfn

SM = {sm!r}
G = None


def init(value):
    global G
    G = value


@dataclass
class Point:
    x: int


def helper(x):
    return x * 2


def task(x):
    # What a function of the script sees in a worker: the initializer's
    # global, and the script's own names, which pickle by reference.
    return (G, helper(x), pickle.loads(pickle.dumps(helper))(x), pickle.dumps(Point(x)) != b"")


@parfn.parallel
def decorated(x):
    return task(x)


WANT = [(42, 2 * x, 2 * x, True) for x in range(4)]


def case(name, call):
    start(name)
    try:
        got = call()
    except BaseException as exc:
        failed(name, exc)
    else:
        check(name, got, WANT)


if __name__ == "__main__":

    def in_guard(x):  # not in the __main__ of a worker that imports the script
        return task(x)

    with parfn.Pool(2, start_method=SM, initializer=init, initargs=(42,)) as pool:

        def late(x):  # defined after the pool started
            return (G, helper(x), pickle.loads(pickle.dumps(helper))(x), True)

        case("pool/script", lambda: pool.map(task, range(4)))
        case("pool/decorated", lambda: decorated.map(range(4)))
        case("pool/in-guard", lambda: pool.map(in_guard, range(4)))
        case("pool/late", lambda: pool.map(late, range(4)))
        case("pool/apply", lambda: [pool.apply(task, x) for x in range(4)])
    ctx = None if SM is None else multiprocessing.get_context(SM)
    with parfn.ProcessPoolExecutor(2, mp_context=ctx, initializer=init, initargs=(42,)) as ex:
        case("executor/script", lambda: list(ex.map(task, range(4), timeout=CASE_TIMEOUT)))
    print("end", flush=True)
"""
)
"""Items 4 and 5 of issue 12: a script's functions see the worker's ``__main__``."""

ITEMS = (
    WATCHDOG
    + """
import asyncio
import collections
import multiprocessing
import threading

import parfn


def pid(x):
    return os.getpid()


@parfn.parallel
def leaf(x):
    return x + 1


@parfn.parallel
def branch(n):
    return sum(leaf.map(range(n)))


def interrupted(x):
    raise KeyboardInterrupt(f"raised by task {{x}}")


def count(name, pids, want_each, want_workers):
    seen = collections.Counter(pids)
    check(name, (max(seen.values()), len(seen)), (want_each, want_workers))


if __name__ == "__main__":
    start("max-tasks/map")
    with parfn.Pool(2, max_tasks_per_worker=1) as pool:
        count("max-tasks/map", pool.map(pid, range(12)), 1, 12)
    start("max-tasks/chunks")
    with parfn.Pool(2, max_tasks_per_worker=3) as pool:
        count("max-tasks/chunks", pool.map(pid, range(12), chunksize=6), 3, 4)
    start("max-tasks/spawn")
    with parfn.Pool(2, max_tasks_per_worker=1) as pool:
        tasks = [pool.spawn(pid, i) for i in range(12)]
        count("max-tasks/spawn", [t.result(timeout=CASE_TIMEOUT) for t in tasks], 1, 12)
    start("max-tasks/executor")
    with parfn.ProcessPoolExecutor(2, max_tasks_per_child=1) as ex:
        futures = [ex.submit(pid, i) for i in range(12)]
        count("max-tasks/executor", [f.result(timeout=CASE_TIMEOUT) for f in futures], 1, 12)

    # Nested calls inside a thread pool's tasks: more nested maps than threads.
    start("thread-nested")
    with parfn.Pool(2, backend="thread") as pool:
        got = pool.map(branch, [5] * 8)
        check("thread-nested", (got, multiprocessing.active_children()), ([15] * 8, []))

    # A KeyboardInterrupt raised by a task is its outcome; the worker lives on.
    start("keyboard-interrupt")
    with parfn.Pool(1) as pool:
        before = pool.apply(pid, 0)
        try:
            pool.apply(interrupted, 1)
            outcome = "nothing raised"
        except KeyboardInterrupt as exc:
            outcome = str(exc)
        errors = pool.map(interrupted, range(2), return_exceptions=True)
        check(
            "keyboard-interrupt",
            (outcome, [type(e).__name__ for e in errors], pool.apply(pid, 0) == before),
            ("raised by task 1", ["KeyboardInterrupt"] * 2, True),
        )

    # Threads on the default pool while another thread calls parfn.shutdown().
    start("shutdown-race")
    failures = []

    def user():
        try:
            for _ in range(30):
                assert leaf.map(range(20)) == list(range(1, 21))
                assert leaf.apply(1) == 2
                assert leaf.spawn(2).result(timeout=CASE_TIMEOUT) == 3
        except BaseException as exc:
            failures.append(f"{{type(exc).__name__}}: {{exc}}")

    users = [threading.Thread(target=user) for _ in range(3)]
    for t in users:
        t.start()
    while any(t.is_alive() for t in users):
        parfn.shutdown()
        users[0].join(0.02)
    check("shutdown-race", failures[:2], [])

    # The user's own os.fork(): the child gets a default pool of its own.
    start("user-fork")
    assert leaf.map(range(3)) == [1, 2, 3]
    sys.stdout.flush()
    faulthandler.cancel_dump_traceback_later()  # its thread would not exist in the child
    child = os.fork()
    if child == 0:
        signal.alarm(CASE_TIMEOUT)  # the child's watchdog: SIGALRM ends it
        code = 0 if leaf.map(range(3)) == [1, 2, 3] and leaf.apply(5) == 6 else 3
        parfn.shutdown()
        os._exit(code)
    faulthandler.dump_traceback_later(CASE_TIMEOUT, exit=True)
    _, status = os.waitpid(child, 0)
    check("user-fork", (os.waitstatus_to_exitcode(status), leaf.apply(1)), (0, 2))
    print("end", flush=True)
"""
)
"""Items 6 and 8 of issue 12, a task's KeyboardInterrupt, the shutdown race,
and the default pool after the user's ``os.fork()`` (default start method)."""

MEMORY = """
import os
import sys

import parfn


def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024  # MB


def make(data):
    def closure(x):
        return (os.getpid(), len(data), rss())

    return closure


if __name__ == "__main__":
    rounds, megabytes = int(sys.argv[1]), int(sys.argv[2])
    with parfn.Pool(2) as pool:
        pool.map(abs, range(4))
        first = None
        workers = {}
        for r in range(rounds):
            data = os.urandom(megabytes << 20)  # fresh data each round
            for worker, n, size in pool.map(make(data), range(2), chunksize=1):
                workers[worker] = size
            del data
            if r == 3:  # from here on, what is kept no longer grows
                first = (rss(), max(workers.values()))
        print("parent", first[0], rss(), flush=True)
        print("worker", first[1], max(workers.values()), flush=True)
"""
"""Item 9 of issue 12: closures over fresh big data, made in a loop."""
