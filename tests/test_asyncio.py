"""parfn inside asyncio: awaiting tasks, cancelling them, iterating maps."""

from __future__ import annotations

import asyncio
import time

import pytest

import parfn

from . import funcs

T = 30


def test_async_for_over_imap_does_not_block_the_loop(pool: parfn.Pool) -> None:
    async def main() -> tuple[list[int], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick = asyncio.create_task(ticker())
        out = [x async for x in pool.imap(funcs.sleep_then, [0.05] * 6, range(6), chunksize=1)]
        tick.cancel()
        return out, ticks

    out, ticks = asyncio.run(asyncio.wait_for(main(), T))
    assert out == list(range(6))
    if pool.backend_name != "serial":  # serial runs items in the calling thread
        assert ticks > 3, "the event loop was blocked while waiting for results"


def test_async_for_over_imap_unordered(pool: parfn.Pool) -> None:
    async def main() -> list[int]:
        return [x async for x in pool.imap_unordered(funcs.square, range(20))]

    assert sorted(asyncio.run(asyncio.wait_for(main(), T))) == [x * x for x in range(20)]


def test_async_for_raises_the_items_exception(pool: parfn.Pool) -> None:
    async def main() -> list[int]:
        got = []
        async for x in pool.imap(funcs.fail_on, range(6), chunksize=1):
            got.append(x)
        return got

    with pytest.raises(ValueError, match="bad item 3"):
        asyncio.run(asyncio.wait_for(main(), T))


def test_cancelling_the_awaiting_coroutine_stops_the_running_task(
    process_pool: parfn.Pool,
) -> None:
    task = process_pool.spawn(funcs.sleep_then, 30, "never")

    async def main() -> None:
        waiter = asyncio.ensure_future(_await(task))
        deadline = time.monotonic() + T
        while not task.running() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # it runs in its worker now
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    start = time.monotonic()
    asyncio.run(asyncio.wait_for(main(), T))
    assert task.cancelled()
    assert time.monotonic() - start < 10
    assert process_pool.apply(funcs.square, 3) == 9  # the worker was replaced


async def _await(task: parfn.Task[str]) -> str:
    return await task


def test_decorated_imap_is_async_iterable(pool: parfn.Pool) -> None:
    async def main() -> list[int]:
        with pool:
            return [x async for x in funcs.cube.imap(range(4))]

    assert asyncio.run(asyncio.wait_for(main(), T)) == [0, 1, 8, 27]
