"""Pool events: a record on ``logging.getLogger("parfn")`` when a worker is
replaced, and why; or when a task runs past its timeout.

WARNING for what went wrong (a crash, a timeout, an initializer that raised,
a task during which the worker went over ``max_memory_per_worker``), INFO
for what was planned (recycling after ``max_tasks_per_worker``, or because
the worker's memory was above the limit after a task; a worker ended to stop
a cancelled task). Each
record carries ``parfn_event``, ``parfn_reason``, ``parfn_pid``,
``parfn_exitcode`` and ``parfn_function`` for handlers and filters.

The library's logger has a ``NullHandler``, as libraries do: with logging
not configured, nothing is printed; ``logging.basicConfig()`` shows them.
Called with no lock of the pool held (handlers may be slow). ``logging`` is
imported by the first event, not before (it costs ~2 ms of a program's start).
"""

from __future__ import annotations

from .._typing import Any

__all__ = ("REASONS", "task_timed_out", "worker_replaced")

WARNING, INFO = 30, 20
"""``logging.WARNING`` and ``logging.INFO``."""

REASONS: dict[str, tuple[int, str]] = {
    # reason: (level, what happened to the worker)
    "crash": (WARNING, "died"),
    "timeout": (WARNING, "was ended: its task ran past its timeout"),
    "memory": (WARNING, "was ended: it went over its memory limit during a task"),
    "init": (WARNING, "exited: its initializer raised"),
    "cancel": (INFO, "was ended to stop a cancelled task"),
    "recycle": (INFO, "was retired"),  # max_tasks_per_worker, or its memory after a task
}
"""Why a worker is replaced: the level of the record and how the message says it."""


def worker_replaced(
    reason: str,
    pid: int | None,
    *,
    detail: str = "",
    exitcode: int | None = None,
    function: str | None = None,
    replaced: bool = True,
) -> None:
    """Log that worker ``pid`` ended for ``reason`` (a key of ``REASONS``)."""
    level, what = REASONS.get(reason, (WARNING, "ended"))
    log = _logger()
    if not log.isEnabledFor(level):
        return
    text = f"worker process {pid}"
    if function is not None:
        text += f" running {function}()"
    text += f" {what}"
    if detail:
        text += f": {detail}"
    text += "; a new worker replaces it" if replaced else "; the pool is closing"
    extra = {
        "parfn_event": "worker_replaced",
        "parfn_reason": reason,
        "parfn_pid": pid,
        "parfn_exitcode": exitcode,
        "parfn_function": function,
    }
    log.log(level, "%s", text, extra=extra)


def task_timed_out(function: str, timeout: float, detail: str) -> None:
    """Log that a task of ``function`` ran past ``timeout`` (where no worker is replaced)."""
    extra = {
        "parfn_event": "task_timed_out",
        "parfn_reason": "timeout",
        "parfn_pid": None,
        "parfn_exitcode": None,
        "parfn_function": function,
    }
    _logger().warning(
        "%s() ran past its timeout of %g s; %s", function, timeout, detail, extra=extra
    )


def _logger() -> Any:
    """``logging.getLogger("parfn")``, given its ``NullHandler`` the first time."""
    import logging

    log = logging.getLogger("parfn")
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())
    return log
