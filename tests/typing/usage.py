"""Typed usage of parfn, checked by ``mypy --strict`` and ``pyright``; never run.

Every ``assert_type`` line states what a type checker must infer. Every line
marked ``# type: ignore[...]  # pyright: ignore[...]`` MUST be reported as an
error: mypy runs with ``warn_unused_ignores`` and pyright with
``reportUnnecessaryTypeIgnoreComment``, so if parfn's types stop catching the
mistake, the comment becomes unused and the check fails. (pyright is set not
to honour ``# type: ignore``, so each checker answers only for its own
comment.)
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator

from typing_extensions import assert_type

import parfn
from parfn import Parallel, Task, parallel
from parfn.multiprocessing import Pool as MpPool

# -- the two decorator forms ------------------------------------------------------------


@parallel
def square(x: int) -> int:
    """The bare form."""
    return x * x


@parallel(timeout=5, retries=1)
def fetch(url: str, *, attempts: int = 1) -> bytes:
    """The form with per-task options; a keyword-only parameter."""
    return url.encode() * attempts


def plain(x: int, y: str = "") -> float:
    """Not decorated: for the pool's methods."""
    return x / 2


# (assignments, not assert_type: mypy's exact form keeps the parameter names)
as_declared: Parallel[[int], int] = square
undecorated: Parallel[[int, str], float] = parallel(plain)
with_options: Parallel[[int], int] = square.options(timeout=1, retries=2)
no_timeout: Parallel[[int], int] = square.options(timeout=None)
decorate: Callable[[Callable[[int], str]], Parallel[[int], str]] = parallel(timeout=1.5)
assert_type(parallel(retries=2)(plain).apply(1), float)

# -- results ----------------------------------------------------------------------------

assert_type(square(3), int)
assert_type(square.apply(3), int)
assert_type(square.apply(x=3), int)
assert_type(square.spawn(3), Task[int])
assert_type(square.spawn(3).result(timeout=10), int)
assert_type(square.spawn(3).get(timeout=10), int)
assert_type(square.spawn(3).ready(), bool)
assert_type(square.map(range(10)), list[int])
assert_type(square.map(range(10), chunksize=4, progress=True), list[int])
assert_type(square.map(range(10), return_exceptions=False), list[int])
assert_type(square.map(range(10), return_exceptions=True), list[int | BaseException])
assert_type(square.starmap([(1,), (2,)]), list[int])
assert_type(square.starmap([(1,)], return_exceptions=True), list[int | BaseException])
# imap's result is an iterator of R (whatever its class), also async-iterable
lazy: Iterator[int] = square.imap(range(10))
lazy_unordered: Iterator[int] = square.imap_unordered(range(10), chunksize=1)
for item in square.imap(range(10)):
    assert_type(item, int)
assert_type(next(square.imap_unordered(range(10))), int)
assert_type(fetch.apply("u"), bytes)
assert_type(fetch.apply("u", attempts=2), bytes)
assert_type(fetch.spawn(url="u"), Task[bytes])

# A Task is a concurrent.futures.Future.
done, pending = concurrent.futures.wait([square.spawn(1), square.spawn(2)], timeout=10)
assert_type(done, set[concurrent.futures.Future[int]])
for finished in concurrent.futures.as_completed([square.spawn(1)], timeout=10):
    assert_type(finished.result(), int)


async def awaiting() -> None:
    """``await task`` gives the result."""
    assert_type(await square.spawn(3), int)
    assert_type(await fetch.spawn("u"), bytes)
    async for value in square.imap(range(3)):
        assert_type(value, int)
    async for value in square.imap_unordered(range(3)):
        assert_type(value, int)
    assert_type([url async for url in fetch.imap(["u"])], list[bytes])


# -- the pool: its methods take the function first, typed through ParamSpec -------------

with parfn.Pool(2) as pool:
    assert_type(pool, parfn.Pool)
    assert_type(pool.apply(square, 3), int)
    assert_type(pool.apply(plain, 3), float)
    assert_type(pool.apply(plain, 3, y="a"), float)
    assert_type(pool.apply(fetch.options(timeout=1), "u"), bytes)
    assert_type(pool.spawn(plain, 3), Task[float])
    assert_type(pool.map(square, range(3)), list[int])
    assert_type(pool.map(plain, range(3), return_exceptions=True), list[float | BaseException])
    assert_type(pool.starmap(plain, [(1, "a")]), list[float])
    assert_type(next(pool.imap(plain, range(3))), float)
    assert_type(next(pool.imap_unordered(square, range(3))), int)
    in_order: Iterator[float] = pool.imap(plain, range(3))
    assert_type(pool.workers, int)
    stats = pool.stats()
    assert_type(stats, parfn.PoolStats)
    assert_type(stats.submitted, int)
    assert_type(stats.done + stats.failed + stats.cancelled + stats.running + stats.queued, int)
    assert_type(stats.by_function["square"], parfn.FunctionStats)
    assert_type(stats.by_function["square"].total_seconds, float)
    assert_type(stats.by_function["square"].calls, int)
    pool.shutdown(wait=True, cancel_pending=False)
    pool.terminate()

parfn.shutdown()
assert_type(parfn.in_worker(), bool)

# -- the drop-in ProcessPoolExecutor ---------------------------------------------------

with parfn.ProcessPoolExecutor(2) as executor:
    assert_type(executor, parfn.ProcessPoolExecutor)
    assert_type(executor.submit(square, 3), Task[int])
    assert_type(executor.submit(plain, 3, y="a"), Task[float])
    assert_type(next(executor.map(plain, [1], timeout=10)), float)

# -- the drop-in multiprocessing.Pool ----------------------------------------------------

with MpPool(2) as mp_pool:
    assert_type(mp_pool.map(square, [1]), list[int])
    assert_type(mp_pool.apply(plain, (1,)), float)
    assert_type(mp_pool.apply_async(plain, (1,)).get(timeout=1), float)
    assert_type(mp_pool.map_async(square, [1]).get(), list[int])
    assert_type(next(mp_pool.imap(square, [1])), int)

# -- resources: per-worker values, limits (section 9) ------------------------------------


class Model:
    def predict(self, x: int) -> float:
        return x / 2


def load_model(path: str, *, threads: int = 1) -> Model:
    return Model()


model = parfn.WorkerLocal(load_model, "weights.bin", threads=2)
assert_type(model, parfn.WorkerLocal[Model])
assert_type(model.value, Model)
assert_type(model.value.predict(3), float)
assert_type(parfn.WorkerLocal(dict, a=1).value, dict[str, int])
with parfn.Pool(2, threads_per_worker=1, max_memory_per_worker="512MiB") as limited:
    assert_type(limited.map(square, range(3)), list[int])
limit_error = parfn.MemoryLimitExceeded("f() went over", 2**20, 2**21)
assert_type(limit_error.seen, int)
assert_type(limit_error, parfn.MemoryLimitExceeded)

# -- mistakes a type checker must report -------------------------------------------------

square.apply("3")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
square.spawn("3")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
square("3")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
square.apply(1, 2)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
square.spawn(1, 2)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
square(1, 2)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
square.apply()  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
square.apply(y=3)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
fetch.apply("u", tries=2)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
fetch.apply("u", 2)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
pool.apply(square, "3")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
pool.spawn(plain, 1, 2)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
pool.apply(plain, 1, "a", "b")  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
executor.submit(plain, "3")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
executor.submit(square, 1, 2)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
stats.submitted = 0  # type: ignore[misc]  # pyright: ignore[reportAttributeAccessIssue]
wrong: str = square.apply(3)  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
wrong_task: Task[str] = square.spawn(3)  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
wrong_list: list[str] = square.map([1])  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
unchecked: list[int] = square.map([1], return_exceptions=True)  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
wrong_item: Iterator[str] = square.imap([1])  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
square.map([1], chunksize="4")  # type: ignore[call-overload]  # pyright: ignore[reportArgumentType]
square.options(retries="1")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
parallel(timeout="5")  # type: ignore[call-overload]  # pyright: ignore[reportArgumentType]
parallel(3)  # type: ignore[call-overload]  # pyright: ignore[reportArgumentType]
parfn.WorkerLocal(load_model, 3)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
parfn.WorkerLocal(load_model, "w", thread=2)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
wrong_model: str = model.value  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
parfn.Pool(2, max_memory_per_worker=1.5)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
