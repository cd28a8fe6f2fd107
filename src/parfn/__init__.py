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
"""

from ._decorator import Parallel as Parallel
from ._decorator import parallel as parallel
from ._executor import ProcessPoolExecutor as ProcessPoolExecutor
from ._pool import Pool as Pool
from ._runtime import in_worker as in_worker
from ._runtime import shutdown as shutdown
from ._task import Task as Task
from ._wire.errors import ParfnError as ParfnError
from ._wire.errors import PoolClosed as PoolClosed
from ._wire.errors import RemoteError as RemoteError
from ._wire.errors import SerializationError as SerializationError
from ._wire.errors import TaskTimeout as TaskTimeout
from ._wire.errors import WorkerCrashed as WorkerCrashed

__all__ = (
    "Parallel",
    "ParfnError",
    "Pool",
    "PoolClosed",
    "ProcessPoolExecutor",
    "RemoteError",
    "SerializationError",
    "Task",
    "TaskTimeout",
    "WorkerCrashed",
    "in_worker",
    "parallel",
    "shutdown",
)

__version__ = "0.1.0"
