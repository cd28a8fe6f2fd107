"""The multiprocessing.Pool tutorial (docs/tutorial.md), rewritten with parfn.

Run:  python examples/tutorial.py

1. a ``with parfn.Pool(4)`` block with ``map``;
2. four ``.apply`` calls of a 1-second task: one after another, about 4 s;
3. four ``.spawn`` calls, then ``.wait()``/``.get()``: together, about 1 s,
   results in submission order;
4. lambdas, closures and ``__main__`` functions under the spawn start method,
   where ``multiprocessing.Pool`` fails.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import parfn
from parfn import parallel


@parallel
def task(n: int) -> None:
    print(n)


@parallel
def my_task(n: int) -> int:
    print(f"Task processed by Process {os.getpid()}")
    time.sleep(1)
    return n * 2


def context_manager() -> None:
    print("== 1. a with block and map")
    with parfn.Pool(4):
        print(task.map([2, 3, 4]))


def blocking_apply() -> None:
    print("== 2. apply blocks: four 1-second tasks one after another")
    with parfn.Pool(4):
        start = time.time()
        for n in (4, 3, 2, 1):
            print(my_task.apply(n))
        print(f"Time : {time.time() - start:.2f} s")


def spawn_overlaps() -> None:
    print("== 3. spawn (apply_async) overlaps them")
    with parfn.Pool(4):
        start = time.time()
        tasks = [my_task.spawn(i) for i in range(4)]
        for t in tasks:
            t.wait()
            print(f"Result: {t.get(timeout=30)}")
        print(f"Time : {time.time() - start:.2f} s")


def what_multiprocessing_cannot_send() -> None:
    print("== 4. lambdas, closures and __main__ functions, start method 'spawn'")
    offset = 100

    def closure(x: int) -> int:
        return x + offset

    with multiprocessing.get_context("spawn").Pool(2) as mp_pool:
        try:
            mp_pool.map(lambda x: x * 2, [1, 2, 3])
        except Exception as exc:
            print(f"multiprocessing.Pool with a lambda: {type(exc).__name__}: {exc}")
    with parfn.Pool(2, start_method="spawn") as pool:
        print("lambda: ", pool.map(lambda x: x * 2, [1, 2, 3]))
        print("closure:", pool.map(closure, [1, 2, 3]))
        print("__main__ function:", my_task.options(timeout=5).map([1, 2]))
        print("decorated lambda:", parallel(lambda s: s.upper()).map(["a", "b"]))


if __name__ == "__main__":
    context_manager()
    blocking_apply()
    spawn_overlaps()
    what_multiprocessing_cannot_send()
