"""parfn on Dask against plain Dask, on the same LocalCluster, in one run.

    pip install 'parfn[dask]'
    python benchmarks/bench_dask.py [--quick] [--rounds N] [--json FILE]

Measures, for ``parfn.Pool(backend="dask", client=client)`` and for the same
``client`` used directly:

* per-task overhead: the median time of one ``pool.apply(f, x)`` against one
  ``client.submit(f, x, pure=False).result()`` (a trivial ``f``);
* spawn throughput: N ``pool.spawn`` then every result, against N
  ``client.submit`` then ``client.gather``;
* map throughput: ``pool.map(f, xs)`` against ``client.gather(client.map(f, xs,
  pure=False))``, for a trivial ``f`` (where parfn batches items into chunks)
  and for items of 5 ms each.

The systems alternate within each round, so a change in machine load hits
both alike; each number is the median over the rounds. The issue's target:
parfn adds no more than 10% (ratio <= 1.10 for times, >= 0.91 for rates).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import parfn


def inc(x: int) -> int:
    return x + 1


def sleep_5ms(x: int) -> int:
    time.sleep(0.005)
    return x


def apply_p50(call: Callable[[int], Any], n: int) -> float:
    """Median seconds of one call, over ``n`` calls one after another."""
    times = []
    for i in range(n):
        start = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rate(run: Callable[[], Any], items: int) -> float:
    """Items per second of one ``run()`` of ``items`` items."""
    start = time.perf_counter()
    run()
    return items / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller rounds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 5, quick 3)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    n_apply = 100 if args.quick else 200
    n_spawn = 500 if args.quick else 2000
    n_trivial = 1000 if args.quick else 3000
    n_sleep = 200 if args.quick else 400

    import distributed

    rows: dict[str, dict[str, list[float]]] = {}

    def record(row: str, system: str, value: float) -> None:
        rows.setdefault(row, {"dask": [], "parfn": []})[system].append(value)

    from parfn.backends.dask._cluster import local_cluster  # as parfn starts its own

    with (
        local_cluster(2) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
        parfn.Pool(backend="dask", client=client) as pool,
    ):
        # Warm both paths (imports in the workers, connections).
        client.gather(client.map(inc, range(20), pure=False))
        pool.map(inc, range(20))

        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", file=sys.stderr)
            systems: list[tuple[str, dict[str, Callable[[], float]]]] = [
                (
                    "dask",
                    {
                        "apply p50 (ms)": lambda: (
                            1e3
                            * apply_p50(
                                lambda i: client.submit(inc, i, pure=False).result(), n_apply
                            )
                        ),
                        f"spawn {n_spawn} (tasks/s)": lambda: rate(
                            lambda: client.gather(
                                [client.submit(inc, i, pure=False) for i in range(n_spawn)]
                            ),
                            n_spawn,
                        ),
                        f"map {n_trivial} trivial (items/s)": lambda: rate(
                            lambda: client.gather(client.map(inc, range(n_trivial), pure=False)),
                            n_trivial,
                        ),
                        f"map {n_sleep} x 5 ms (items/s)": lambda: rate(
                            lambda: client.gather(
                                client.map(sleep_5ms, range(n_sleep), pure=False)
                            ),
                            n_sleep,
                        ),
                    },
                ),
                (
                    "parfn",
                    {
                        "apply p50 (ms)": lambda: (
                            1e3 * apply_p50(lambda i: pool.apply(inc, i), n_apply)
                        ),
                        f"spawn {n_spawn} (tasks/s)": lambda: rate(
                            lambda: [
                                t.result() for t in [pool.spawn(inc, i) for i in range(n_spawn)]
                            ],
                            n_spawn,
                        ),
                        f"map {n_trivial} trivial (items/s)": lambda: rate(
                            lambda: pool.map(inc, range(n_trivial)), n_trivial
                        ),
                        f"map {n_sleep} x 5 ms (items/s)": lambda: rate(
                            lambda: pool.map(sleep_5ms, range(n_sleep)), n_sleep
                        ),
                    },
                ),
            ]
            if r % 2:
                systems.reverse()
            for row in systems[0][1]:
                for system, measures in systems:
                    record(row, system, measures[row]())

    print(
        f"\nparfn on Dask vs plain Dask: LocalCluster of 2 workers x 1 thread, "
        f"median of {rounds} rounds\n"
    )
    print("| measure | plain Dask | parfn | parfn / Dask | within 10% |")
    print("|---|---:|---:|---:|:---:|")
    out: dict[str, Any] = {}
    for row, by_system in rows.items():
        dask_v = statistics.median(by_system["dask"])
        parfn_v = statistics.median(by_system["parfn"])
        ratio = parfn_v / dask_v
        ok = ratio <= 1.10 if "(ms)" in row else ratio >= 1 / 1.10
        print(f"| {row} | {dask_v:,.2f} | {parfn_v:,.2f} | {ratio:.2f} | {'yes' if ok else 'NO'} |")
        out[row] = {"dask": by_system["dask"], "parfn": by_system["parfn"], "ratio": ratio}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
