"""The tutorial's three ``multiprocessing.Pool`` programs, with only the import changed.

Run:  python examples/multiprocessing_tutorial.py

The blog post this project started from ("[Python] 4. 멀티프로세싱 2") shows
three programs: a ``with Pool(4)`` block with ``map``; four ``apply`` calls of
a 1-second task (one after another, about 4 s); four ``apply_async`` calls
followed by ``wait()``/``get()`` (together, about 1 s). Below they are as the
post wrote them, except for one line each: ``from parfn.multiprocessing import
Pool`` instead of ``from multiprocessing import Pool``. (Each program's
``main`` is renamed, to keep the three in one file.)
"""
# The post's code as it is: its import order and str.format calls included.
# ruff: noqa: I001, UP032

from parfn.multiprocessing import Pool  # was: from multiprocessing import Pool
import time
import os

# -- 1. the context manager ---------------------------------------------------------


def task(n):
    print(n)


def main_1():
    with Pool(4) as p:
        print(p.map(task, [2, 3, 4]))


# -- 2. apply: one task at a time ------------------------------------------------------


def myTask(n):
    print("Task processed by Process {}".format(os.getpid()))
    time.sleep(1)
    return n * 2


def main_2():
    with Pool(4) as p:
        start = time.time()
        print(p.apply(myTask, (4,)))
        print(p.apply(myTask, (3,)))
        print(p.apply(myTask, (2,)))
        print(p.apply(myTask, (1,)))
        delta_t = time.time() - start
        print("Time :", delta_t)


# -- 3. apply_async: four tasks at once --------------------------------------------------


def myTask1(n):
    print("Task processed by Process {}".format(os.getpid()))
    time.sleep(1)
    return n * 2


def main_3():
    print("apply_async")
    with Pool(4) as p:
        start = time.time()
        tasks = []
        for i in range(4):
            task = p.apply_async(func=myTask1, args=(i,))
            tasks.append(task)
        for task in tasks:
            task.wait()
            print("Result: {}".format(task.get()))
        delta_t = time.time() - start
        print("Time :", delta_t)


if __name__ == "__main__":
    main_1()
    main_2()
    main_3()
