"""parfn: parallelism as easy as a decorator.

>>> from parfn import parallel
>>> @parallel
... def square(x):
...     return x * x
>>> square(3)
9

``square.apply(3)`` runs it in a worker process, ``square.spawn(3)`` returns a
:class:`Task` at once, ``square.map(range(10))`` runs it on every item in
parallel. ``with parfn.Pool(4): ...`` scopes a pool of four workers.

``import parfn`` loads only what decorating needs; the pool, the engines and
the errors load on first use (a name below is imported when it is first read).
"""

from ._decorator import Parallel as Parallel
from ._decorator import parallel as parallel
from ._runtime import in_worker as in_worker
from ._runtime import shutdown as shutdown
from ._typing import TYPE_CHECKING as _TYPE_CHECKING
from ._typing import Any as _Any

if _TYPE_CHECKING:
    from ._executor import ProcessPoolExecutor as ProcessPoolExecutor
    from ._local import WorkerLocal as WorkerLocal
    from ._pool import Pool as Pool
    from ._stats import FunctionStats as FunctionStats
    from ._stats import PoolStats as PoolStats
    from ._task import Task as Task
    from ._wire.errors import MemoryLimitExceeded as MemoryLimitExceeded
    from ._wire.errors import ParfnError as ParfnError
    from ._wire.errors import PoolClosed as PoolClosed
    from ._wire.errors import RemoteError as RemoteError
    from ._wire.errors import SerializationError as SerializationError
    from ._wire.errors import TaskTimeout as TaskTimeout
    from ._wire.errors import WorkerCrashed as WorkerCrashed

__all__ = (
    "FunctionStats",
    "MemoryLimitExceeded",
    "Parallel",
    "ParfnError",
    "Pool",
    "PoolClosed",
    "PoolStats",
    "ProcessPoolExecutor",
    "RemoteError",
    "SerializationError",
    "Task",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerLocal",
    "in_worker",
    "parallel",
    "shutdown",
)

__version__ = "0.1.0"

_LAZY = {
    "Pool": "_pool",
    "PoolStats": "_stats",
    "FunctionStats": "_stats",
    "ProcessPoolExecutor": "_executor",
    "Task": "_task",
    "WorkerLocal": "_local",
    "MemoryLimitExceeded": "_wire.errors",
    "ParfnError": "_wire.errors",
    "PoolClosed": "_wire.errors",
    "RemoteError": "_wire.errors",
    "SerializationError": "_wire.errors",
    "TaskTimeout": "_wire.errors",
    "WorkerCrashed": "_wire.errors",
}
"""Public names loaded on first use, and the module of each."""


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'parfn' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"parfn.{module}"), name)
    globals()[name] = value  # the next read is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
