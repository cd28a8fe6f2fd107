"""Thread caps: how many threads the numerical libraries of each worker may start.

BLAS and OpenMP libraries start one thread per CPU in every process that uses
them, so ``workers`` processes each running a matrix product put
``workers x cpus`` threads on ``cpus`` CPUs (measured on 2 cores: 16 numpy
tasks over 2 workers take 0.94 s instead of 0.50 s). A worker's libraries are
capped at ``threads_per_worker`` threads, by default ``max(1, cpus // workers)``.

Two halves, one for each side of the pipe:

* the parent, when a pool is made: ``thread_caps`` picks the variables to set,
  those of ``VARIABLES`` that the user has not set (a variable the user set is
  left as it is);
* the worker, at start-up, before the initializer and before any user function
  is loaded: ``apply_thread_caps`` sets them in ``os.environ``, where libraries
  loaded from now on read them, and limits the libraries this process already
  has loaded, which read their variable when they loaded and never again (a
  worker forked from a process that had imported numpy, or a spawned one whose
  main module imported it before the worker's start-up ran). Those are limited
  with each library's own call, found with ``ctypes`` in the libraries mapped
  into the process (``/proc/self/maps``): ``openblas_set_num_threads`` (in its
  ``scipy_``/``64_`` builds too), ``MKL_Set_Num_Threads``,
  ``bli_thread_set_num_threads``, the OpenMP runtimes' ``omp_set_num_threads``
  (libgomp, libiomp, libomp), and ``numexpr.set_num_threads``. Apple's
  Accelerate has no such call: ``VECLIB_MAXIMUM_THREADS`` reaches it only if
  it loads after the worker's start-up; and outside Linux (no
  ``/proc/self/maps``) only the variables are set.

``default_threads_per_worker`` is what other front ends (the joblib backend)
call to get the same default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

__all__ = (
    "VARIABLES",
    "apply_thread_caps",
    "default_threads_per_worker",
    "loaded_libraries",
    "thread_caps",
)

VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
"""The variables a worker gets, each read by one family of libraries."""


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1  # pragma: no cover - macOS, Windows


def default_threads_per_worker(workers: int) -> int:
    """``max(1, cpus // workers)``: the threads each of ``workers`` processes may use.

    ``cpus`` is this process's CPU affinity (the CPUs it may run on), as for
    the pool's default number of workers.

    >>> default_threads_per_worker(10**6)
    1
    """
    return max(1, _cpus() // max(1, workers))


def thread_caps(threads: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables to set in each worker: every one of ``VARIABLES`` not set in ``environ``.

    ``environ`` is the caller's environment (default ``os.environ``), read once,
    when the pool is made. A variable set to an empty string counts as unset,
    as the libraries themselves read it.

    >>> thread_caps(2, {"OMP_NUM_THREADS": "4"})["OPENBLAS_NUM_THREADS"]
    '2'
    >>> "OMP_NUM_THREADS" in thread_caps(2, {"OMP_NUM_THREADS": "4"})
    False
    """
    environ = os.environ if environ is None else environ
    return {var: str(threads) for var in VARIABLES if not environ.get(var)}


# -- in the worker -------------------------------------------------------------------

_NATIVE = (
    # (the variable that governs it, its file names start with, its call)
    ("OPENBLAS_NUM_THREADS", ("libopenblas", "libscipy_openblas"), "openblas"),
    ("MKL_NUM_THREADS", ("libmkl_rt",), "MKL_Set_Num_Threads"),
    ("BLIS_NUM_THREADS", ("libblis",), "bli_thread_set_num_threads"),
    ("OMP_NUM_THREADS", ("libgomp", "libiomp", "libomp"), "omp_set_num_threads"),
)

_OPENBLAS_AFFIXES = [(p, s) for p in ("", "scipy_") for s in ("", "64_", "_64")]


def apply_thread_caps(caps: Mapping[str, str]) -> None:
    """Set ``caps`` in this process's environment and limit the libraries already loaded.

    Called once, in a worker, before any user code runs in it. The libraries
    already loaded are limited to what each variable now says, whether it is
    in ``caps`` or was set by the user: a variable set in the parent after a
    library had loaded there (Dask sets ``OMP_NUM_THREADS`` and others to 1 in
    the process that imports it) would otherwise be ignored by a forked worker.
    """
    os.environ.update(caps)
    limits = {var: int(value) for var in VARIABLES if (value := os.environ.get(var, "")).isdigit()}
    if not limits:
        return
    for path in loaded_libraries():
        name = os.path.basename(path)
        for var, prefixes, call in _NATIVE:
            if var in limits and name.startswith(prefixes):
                _limit(path, call, limits[var])
    numexpr = sys.modules.get("numexpr")
    if "NUMEXPR_NUM_THREADS" in limits and numexpr is not None:
        try:
            numexpr.set_num_threads(limits["NUMEXPR_NUM_THREADS"])
        except Exception:  # pragma: no cover - a numexpr without the call
            pass


def loaded_libraries() -> list[str]:
    """The shared libraries mapped into this process (Linux; elsewhere none are found)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            maps = f.read().decode(errors="replace")
    except OSError:
        return []
    found: dict[str, None] = {}
    for line in maps.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and ".so" in fields[5] and fields[5].startswith("/"):
            found[fields[5].strip()] = None
    return list(found)


def _limit(path: str, call: str, threads: int) -> None:
    """Call the library at ``path`` (already loaded: nothing new is loaded) to cap its threads."""
    try:
        import ctypes

        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except (OSError, AttributeError):
        return  # not loaded after all, or a system without RTLD_NOLOAD
    if call == "openblas":
        for prefix, suffix in _OPENBLAS_AFFIXES:
            setter = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if setter is None:
                continue
            parallel = getattr(lib, f"{prefix}openblas_get_parallel{suffix}", None)
            if parallel is not None and parallel() == 2:
                # Built on OpenMP: its threads are OpenMP's, capped through
                # omp_set_num_threads (its own call misbehaves there before 0.3.34).
                return
            setter(threads)
            return
        return
    setter = getattr(lib, call, None)
    if setter is not None:
        setter(threads)
