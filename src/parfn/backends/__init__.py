"""Backends run Jobs: "process" (default), "thread", "serial" and "dask".

Each is loaded by name on first use, so an optional engine (Dask) is imported
only when asked for, and a worker process imports none of them.
"""

from __future__ import annotations

import importlib

from .._typing import Any
from ._base import Backend

__all__ = ("BACKENDS", "load")

BACKENDS = {
    "process": ("parfn.backends.process", "ProcessPool"),
    "thread": ("parfn.backends.thread", "ThreadBackend"),
    "serial": ("parfn.backends.serial", "SerialBackend"),
    "dask": ("parfn.backends.dask", "DaskBackend"),
}


def load(name: str, workers: int | None, **options: Any) -> Backend:
    """Start the backend called ``name`` with ``workers`` and its own options."""
    try:
        module_name, class_name = BACKENDS[name]
    except (KeyError, TypeError):
        allowed = ", ".join(repr(b) for b in BACKENDS)
        raise ValueError(f"unknown backend {name!r}; choose one of {allowed}") from None
    cls = getattr(importlib.import_module(module_name), class_name)
    backend: Backend = cls(workers, **options)
    return backend
