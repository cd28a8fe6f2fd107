"""Benchmark parfn against its peers, side by side in one run, and print a markdown table.

    python benchmarks/run.py [--quick] [--only WORKLOAD,...] [--systems parfn,mp,...]
                             [--reps N] [--json FILE]

Each measurement (one workload, one system, one repetition) runs in a fresh driver
process (``_driver.py``) under a hard time cap, so nothing can hang the harness.
Repetitions go round-robin over the systems, in a rotating order, so that a change
in machine load hits every system alike. Every system uses 2 workers. See README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _systems  # noqa: E402
from _workloads import calibrate_burn  # noqa: E402

# -- what is measured --------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One row of the issue's table."""

    key: str
    title: str
    kind: str
    """``time`` (lower is better), ``rate`` or ``speedup`` (higher is better)."""
    floor: str = ""
    """What the floor pseudo-system measures for this workload ("" for none)."""
    quick: dict[str, Any] = field(default_factory=dict)
    full: dict[str, Any] = field(default_factory=dict)


_IMAP_QUICK = {"run_s": 0.8, "settle_s": 0.3, "pause_s": 0.5, "memory_limit_mib": 300}
_IMAP_FULL = {"run_s": 2.0, "settle_s": 0.5, "pause_s": 1.5, "memory_limit_mib": 1024}
for _p in (_IMAP_QUICK, _IMAP_FULL):
    # Input items a bounded imap may still pull once its consumer has paused for settle_s.
    _p["growth_tolerance"] = 1000

WORKLOADS: dict[str, Workload] = {
    w.key: w
    for w in (
        Workload(
            "latency", "blocking `apply` of a trivial function, p50", "time",
            "`multiprocessing.Pipe` ping-pong, p50",
            {"reps": 2, "warmup": 100, "calls": 500, "budget_s": 1.0},
            {"reps": 5, "warmup": 300, "calls": 3000, "budget_s": 4.0},
        ),
        Workload(
            "spawn", "`spawn` {tasks:,} tasks one by one, then gather", "rate", "",
            {"reps": 2, "tasks": 2_000},
            {"reps": 5, "tasks": 20_000},
        ),
        Workload(
            "map", "`map` of a trivial function over {items:,} items, default chunking", "rate",
            "", {"reps": 2, "items": 8_000, "chunksize": None},
            {"reps": 3, "items": 200_000, "chunksize": None},
        ),
        Workload(
            "map1", "`map` over {items:,} items, `chunksize=1`", "rate", "",
            {"reps": 2, "items": 3_000, "chunksize": 1},
            {"reps": 3, "items": 50_000, "chunksize": 1},
        ),
        Workload(
            "cpu", "{tasks} pure-Python tasks of {seconds} s, speed-up over serial", "speedup",
            "ideal 2.0 (serial time measured in the same run)",
            {"reps": 1, "tasks": 8, "seconds": 0.1},
            {"reps": 3, "tasks": 8, "seconds": 0.25},
        ),
        Workload(
            "numpy", "{tasks} numpy products of {n}x{n} matrices (BLAS threads), `map`", "time",
            "", {"reps": 1, "tasks": 16, "n": 600}, {"reps": 3, "tasks": 32, "n": 800},
        ),
        Workload(
            "array", "{mib} MiB float64 array: argument in, same array back", "time",
            "memcpy of the array (`np.copyto`)",
            {"reps": 1, "mib": 64, "round_trips": 1},
            {"reps": 4, "mib": 64, "round_trips": 2},
        ),
        Workload(
            "cold", "cold: import, first result, shutdown, fresh `python -c`", "time",
            "`python -c pass`",
            {"reps": 1, "starts": 3},
            {"reps": 3, "starts": 3},
        ),
        Workload(
            "script", "cold, a user's script: its own function, `python script.py`", "time",
            "`python -c pass`",
            {"reps": 1, "starts": 3},
            {"reps": 3, "starts": 3},
        ),
        Workload(
            "linalg", "numpy: `map` of {tasks} tasks, {n}x{n} matrix products and an "
            "eigen-solve (BLAS variables unset)", "time",
            "the same tasks in one process, its BLAS on every CPU",
            {"reps": 2, "tasks": 16, "n": 350},
            {"reps": 5, "tasks": 16, "n": 350},
        ),
        Workload(
            "imap", "`imap` over an endless generator", "rate",
            "the same consumer and input over the builtin `map`, in one process",
            {"reps": 1, **_IMAP_QUICK},
            {"reps": 2, **_IMAP_FULL},
        ),
    )
}  # fmt: skip

TIMES = "\u00d7"  # the multiplication sign of "1.5x"
DASH = "\u2013"  # the en dash of "min - max"


# -- running ------------------------------------------------------------------------


def driver_env() -> dict[str, str]:
    """The environment of every driver: the benchmarks and this checkout's ``src/`` first."""
    env = dict(os.environ)
    paths = [str(HERE), str(HERE.parent / "src")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def compile_parfn(env: dict[str, str]) -> None:
    """Compile parfn's modules to bytecode, as ``pip install`` does.

    The peers come from site-packages, compiled when installed; parfn runs
    from this checkout, and where PYTHONDONTWRITEBYTECODE is set (as on some
    CI machines) every cold start would otherwise compile it from source
    (~15 ms).
    """
    code = (
        "import compileall, os, parfn\n"
        "compileall.compile_dir(os.path.dirname(parfn.__file__), quiet=1)"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=False)


def run_process(argv: list[str], cap_s: float, env: dict[str, str]) -> tuple[bool, str]:
    """Run ``argv`` in a new session; kill its whole process group when it ends or at the cap.

    Returns (finished in time, the tail of its stderr).
    """
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
            start_new_session=True,
        )  # fmt: skip
        try:
            proc.wait(timeout=cap_s)
            in_time = True
        except subprocess.TimeoutExpired:
            in_time = False
        # Leftovers: workers of a pool the driver left behind, or the driver itself.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        err.seek(0)
        tail = err.read()[-2000:].decode(errors="replace")
    return in_time, tail


def other_cpu_busy(window_s: float = 0.2) -> float | None:
    """The share of the machine's CPU time used over ``window_s`` while the harness waits.

    Nothing of the harness runs meanwhile, so this is the load of other processes,
    which skews every measurement of the round that follows.
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except OSError:
        return None
    total = total1 - total0
    return (total - (idle1 - idle0)) / total if total > 0 else None


def available(name: str, env: dict[str, str]) -> str:
    """Why the system cannot be used here, or "" if it can."""
    probe = _systems.SYSTEMS[name].probe
    proc = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    if proc.returncode == 0:
        return ""
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit code {proc.returncode}"


def measure(
    workload: str, system: str, params: dict[str, Any], cap_s: float, env: dict[str, str]
) -> dict[str, Any]:
    """One driver run: its result dict, with status ``timeout`` if it hit the cap."""
    spec = json.dumps({"workload": workload, "system": system, "params": params})
    fd, out_path = tempfile.mkstemp(suffix=".json", prefix="parfn-bench-")
    os.close(fd)
    os.unlink(out_path)
    t0 = time.perf_counter()
    in_time, stderr = run_process(
        [sys.executable, str(HERE / "_driver.py"), spec, out_path], cap_s, env
    )
    wall = time.perf_counter() - t0
    try:
        with open(out_path) as f:
            result: dict[str, Any] = json.load(f)
        os.unlink(out_path)
    except FileNotFoundError:
        result = {"status": "timeout" if not in_time else "error", "error": stderr.strip()}
    else:
        if not in_time and result.get("status") == "ok" and workload != "imap":
            result.setdefault("extra", {})["shutdown_hung"] = True
    result.update(workload=workload, system=system, wall_s=wall)
    if not in_time and result["status"] in ("error", "timeout"):
        result["error"] = f"no result within the {cap_s:g} s cap"
    return result


def describe(result: dict[str, Any]) -> str:
    """A short progress line for one measurement."""
    status = str(result["status"])
    if status != "ok":
        error = str(result.get("error") or "").strip()
        return f"{status}: {error.splitlines()[-1][:100]}" if error else status
    samples = result["samples"]
    if not samples:
        return "no result"
    return f"{statistics.median(samples):.4g} {result['unit']}"


# -- reporting ----------------------------------------------------------------------


def fmt_value(value: float, unit: str) -> str:
    """A number with its unit, at a readable precision."""
    if unit == "us":
        return f"{value:.0f} µs" if value < 1000 else f"{value / 1000:.2f} ms"
    if unit == "ms":
        return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"
    if unit in ("items/s", "tasks/s"):
        if value >= 1e6:
            return f"{value / 1e6:.2f}M/s"
        if value >= 1e3:
            return f"{value / 1e3:.1f}k/s"
        return f"{value:.0f}/s"
    if unit == TIMES:
        return f"{value:.2f}{TIMES}"
    return f"{value:.3g} {unit}"


@dataclass
class Cell:
    """The aggregate of one (workload, system) pair."""

    unit: str = ""
    samples: list[float] = field(default_factory=list)
    status: str = "ok"
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def show(self) -> str:
        if self.median is None:
            return self.status if self.status != "ok" else "no result"
        return fmt_value(self.median, self.unit)

    def spread(self) -> str:
        if not self.samples:
            return ""
        low, high = fmt_value(min(self.samples), self.unit), fmt_value(max(self.samples), self.unit)
        return f"{low} {DASH} {high}"


def aggregate(results: list[dict[str, Any]]) -> dict[tuple[str, str], Cell]:
    """Every measurement folded into one Cell per (workload, system)."""
    cells: dict[tuple[str, str], Cell] = {}
    serial: dict[int, float] = {}
    for r in results:
        if r["workload"] == "cpu" and r["system"] == "floor" and r["status"] == "ok":
            serial[r["rep"]] = r["samples"][0]
    for r in results:
        key = (r["workload"], r["system"])
        cell = cells.setdefault(key, Cell())
        if r["status"] != "ok":
            if not cell.samples:
                cell.status = r["status"]
            if r["status"] in ("error", "timeout"):
                cell.note = (r.get("error") or r["status"]).strip().splitlines()[-1][:120]
            continue
        cell.status = "ok"
        samples, unit = list(r["samples"]), r["unit"]
        if r["workload"] == "cpu":
            base = serial.get(r["rep"]) or (statistics.median(serial.values()) if serial else None)
            if r["system"] == "floor":
                samples = [2.0]
                times = sorted(serial.values())
                cell.note = f"serial run: {times[0]:.2f} {DASH} {times[-1]:.2f} s"
            elif base is None:
                samples = []
            else:
                samples = [base / s for s in samples]
            unit = TIMES
        cell.unit = unit
        cell.samples.extend(samples)
        if r["workload"] == "imap":
            cell.note = imap_note(r, cell.note)
        if r.get("extra", {}).get("shutdown_hung"):
            cell.note = "shutdown did not finish within the cap"
    return cells


def imap_note(r: dict[str, Any], previous: str) -> str:
    """The boundedness verdict of one imap measurement (the worst one seen is kept)."""
    x = r["extra"]
    if x["bounded"]:
        verdict = f"bounded (read ≤ {x['ahead']:,} ahead)"
    elif x["memory_guard_hit"]:
        verdict = f"unbounded: memory guard hit (+{x['rss_growth_mib']:.0f} MiB)"
    else:
        verdict = (
            f"unbounded: read {x['ahead']:,} ahead, +{x['pulled_during_pause']:,} "
            f"while paused, +{x['rss_growth_mib']:.0f} MiB"
        )
    if not x["yielded"]:
        how = "the call never returned" if not x["call_returned"] else "nothing came back"
        verdict = f"no result ({how}); {verdict}"
    if previous.startswith(("unbounded", "no result")):
        return previous
    return verdict


def ratio_vs_mp(w: Workload, cell: Cell, mp: Cell | None) -> str:
    """How many times better than mp.Pool (>1: better), whatever the unit."""
    if mp is None or cell.median is None or mp.median is None or not cell.median:
        return ""
    r = mp.median / cell.median if w.kind == "time" else cell.median / mp.median
    return f"{r:.2f}{TIMES}" if r >= 0.1 else f"{r:.2g}{TIMES}"


def ratio_vs_floor(w: Workload, cell: Cell, floor: Cell | None) -> str:
    """The cell against the machine's floor: a multiple of it (time) or a share of ideal."""
    if floor is None or cell.median is None or floor.median is None:
        return ""
    if w.kind == "speedup":
        return f"{cell.median / floor.median:.0%} of ideal"
    return f"{cell.median / floor.median:.2f}{TIMES} floor"


def title(w: Workload, params: dict[str, Any]) -> str:
    return w.title.format(**params)


def table(
    cells: dict[tuple[str, str], Cell],
    workloads: list[str],
    systems: list[str],
    profile: dict[str, dict[str, Any]],
) -> str:
    """The detailed markdown table, one row per workload and system, then a compact matrix."""
    labels = {name: _systems.SYSTEMS[name].label for name in systems}
    lines = [
        f"| workload | system | median | min {DASH} max | vs mp.Pool (>1 = better) | vs floor "
        "| notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in workloads:
        w = WORKLOADS[key]
        mp = cells.get((key, "mp"))
        floor = cells.get((key, "floor"))
        first = True
        for name in [*systems, "floor"]:
            cell = cells.get((key, name))
            if cell is None:
                continue
            label = labels.get(name, "floor: " + (w.floor or "-"))
            note = cell.note
            if key == "imap" and cell.median is not None:
                map_cell = cells.get(("map", name))
                if map_cell is not None and map_cell.median:
                    note = f"{cell.median / map_cell.median:.2f}{TIMES} its own map; {note}"
            if key == "cpu" and name == "floor":
                label = "floor: ideal (serial time measured in the same run)"
            vs_floor = "" if name == "floor" else ratio_vs_floor(w, cell, floor)
            vs_mp = "" if name == "floor" else ratio_vs_mp(w, cell, mp)
            lines.append(
                f"| {title(w, profile[key]) if first else ''} | {label} | {cell.show()} | "
                f"{cell.spread()} | {vs_mp} | {vs_floor} | {note} |"
            )
            first = False
    lines += ["", "Medians side by side:", ""]
    head = ["workload", *(labels[s] for s in systems), "floor"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for key in workloads:
        w = WORKLOADS[key]
        row = [key]
        for name in [*systems, "floor"]:
            cell = cells.get((key, name))
            row.append(cell.show() if cell else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, ~1 minute: a smoke check")
    p.add_argument("--only", default="", help="comma-separated workloads: " + ",".join(WORKLOADS))
    p.add_argument(
        "--systems", default="", help="comma-separated systems: " + ",".join(_systems.SYSTEMS)
    )
    p.add_argument("--reps", type=int, default=0, help="repetitions of every workload")
    p.add_argument("--cap", type=float, default=0, help="hard cap per measurement, seconds")
    p.add_argument("--json", metavar="FILE", help="write every raw sample and the metadata here")
    return p.parse_args(argv)


def split(arg: str, known: dict[str, Any], what: str) -> list[str]:
    names = [s.strip() for s in arg.split(",") if s.strip()] or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selected = split(args.only, WORKLOADS, "workload")
    workloads = [k for k in WORKLOADS if k in selected]
    wanted = split(args.systems, _systems.SYSTEMS, "system")
    env = driver_env()
    log = sys.stderr

    compile_parfn(env)
    systems, skipped = [], {}
    for name in wanted:
        why = available(name, env)
        if why:
            skipped[name] = why
            print(f"skipping {_systems.SYSTEMS[name].label}: not available ({why})", file=log)
        else:
            systems.append(name)

    profile = {k: dict(getattr(WORKLOADS[k], "quick" if args.quick else "full")) for k in WORKLOADS}
    if "cpu" in workloads:
        cpu = profile["cpu"]
        cpu["iterations"] = calibrate_burn(cpu["seconds"])
    for params in profile.values():
        if args.reps:
            params["reps"] = args.reps
        params["cap_s"] = args.cap or (45.0 if args.quick else 180.0)

    meta: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "mode": "quick" if args.quick else "full",
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "workers": _systems.WORKERS,
        "default_start_method": multiprocessing.get_start_method(),
        "versions": {n: _systems.version(n) for n in systems},
        "skipped": skipped,
        "loadavg_start": os.getloadavg(),
        "other_cpu_busy": [],
        "profile": profile,
    }
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for key in workloads:
        w = WORKLOADS[key]
        params = profile[key]
        names = systems + (["floor"] if w.floor else [])
        cap = params["cap_s"]
        if key == "imap":
            cap = params["run_s"] + params["settle_s"] + params["pause_s"] + 30
        for rep in range(params["reps"]):
            meta["other_cpu_busy"].append(other_cpu_busy())
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                if name != "floor" and key in _systems.SYSTEMS[name].lacks:
                    r = {"status": "n/a", "workload": key, "system": name, "wall_s": 0.0}
                else:
                    r = measure(key, name, params, cap, env)
                r["rep"] = rep
                results.append(r)
                label = _systems.SYSTEMS[name].label if name != "floor" else "floor"
                print(
                    f"[{key} {rep + 1}/{params['reps']}] {label}: {describe(r)} "
                    f"({r['wall_s']:.1f} s)",
                    file=log,
                    flush=True,
                )
    meta["loadavg_end"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - t_start

    cells = aggregate(results)
    out = [
        f"`{meta['command']}`: Python {meta['python']}, {meta['platform']}, "
        f"{meta['cpus_usable']} usable CPUs, {meta['workers']} workers per system, "
        f"default start method {meta['default_start_method']}, load average "
        f"{meta['loadavg_start'][0]:.2f} → {meta['loadavg_end'][0]:.2f}, "
        f"{meta['wall_s']:.0f} s.",
        "Versions: "
        + ", ".join(f"{_systems.SYSTEMS[n].label} {v}" for n, v in meta["versions"].items() if v)
        + ".",
    ]
    busy = [b for b in meta["other_cpu_busy"] if b is not None]
    if busy:
        out.append(
            f"CPU used by other processes while the harness idled before each round: median "
            f"{statistics.median(busy):.0%}, max {max(busy):.0%} of the machine."
        )
        if statistics.median(busy) > 0.15:
            out.append(
                "Warning: the machine was busy with other work: speed-ups, rates and spreads "
                "are pessimistic and noisier than on an idle machine."
            )
    if skipped:
        out.append(
            "Not available: "
            + "; ".join(f"{_systems.SYSTEMS[n].label} ({why})" for n, why in skipped.items())
            + "."
        )
    out += ["", table(cells, workloads, systems, profile)]
    print("\n".join(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        print(f"raw samples written to {args.json}", file=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
