"""Out-of-memory kills: was a worker that died of SIGKILL ended by the kernel's OOM killer?

A SIGKILL that parfn did not send is most often the kernel's out-of-memory
killer, but not always (``kill -9``, a supervisor). The kernel counts the
processes its OOM killer ends, per cgroup, and the workers live in this
process's cgroup:

* cgroup v2: ``oom_kill`` in ``memory.events``: "the number of processes
  belonging to this cgroup killed by any kind of OOM killer" (the whole
  machine running out of memory included);
* cgroup v1 (Linux 4.13+): ``oom_kill`` in ``memory.oom_control``, the same count.

The count is read when a pool starts and again when a worker dies of a
SIGKILL nobody in parfn sent: each kill it went up by explains one such death
(so two workers killed at once are both told apart), and the message says
so. A count that did not go up says it was not the OOM killer. Where neither
file can be read (no cgroup memory controller mounted, not Linux), nothing can
be told, and the message says "maybe". The count is the cgroup's: an OOM kill
of another process of the same cgroup in the same moment can be taken for
the worker's.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ("counter_file", "oom_killed", "read_oom_kills", "start_counting")

_lock = threading.Lock()
_file: str | None = None
_found = False  # _file was looked for
_seen: int | None = None  # the count at the last look
_unexplained = 0  # kills counted and not yet matched to a dead worker


def counter_file() -> str | None:
    """The file that holds this process's cgroup's ``oom_kill`` count, or None."""
    try:
        with open("/proc/self/cgroup") as f:
            cgroups = [line.rstrip("\n").split(":", 2) for line in f]
        with open("/proc/self/mountinfo") as f:
            mounts = f.read().splitlines()
    except OSError:
        return None
    v2 = v1 = None
    for line in mounts:
        before, _, after = line.partition(" - ")
        fields, post = before.split(), after.split()
        if len(fields) < 5 or len(post) < 3:
            continue
        if post[0] == "cgroup2" and v2 is None:
            v2 = (fields[3], fields[4])
        elif post[0] == "cgroup" and "memory" in post[2].split(",") and v1 is None:
            v1 = (fields[3], fields[4])
    candidates = []
    for entry in cgroups:
        if len(entry) != 3:
            continue
        _, controllers, path = entry
        if controllers == "" and v2 is not None:
            candidates.append(_join(v2, path, "memory.events"))
        elif "memory" in controllers.split(",") and v1 is not None:
            candidates.append(_join(v1, path, "memory.oom_control"))
    candidates.sort(key=lambda c: not c.endswith("memory.events"))  # v2 first
    for candidate in candidates:
        if _read(candidate) is not None:
            return candidate
    return None


def _join(mount: tuple[str, str], path: str, name: str) -> str:
    root, point = mount
    if root != "/" and path.startswith(root):
        path = path[len(root) :]
    return os.path.join(point, path.lstrip("/"), name)


def _read(path: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


def read_oom_kills() -> int | None:
    """This process's cgroup's count of OOM kills, or None where it cannot be read."""
    global _file, _found
    if not _found:
        _file, _found = counter_file(), True
    return None if _file is None else _read(_file)


def start_counting() -> None:
    """Read the count as a pool starts: kills before now are not its workers'."""
    global _seen, _unexplained
    count = read_oom_kills()
    with _lock:
        _seen, _unexplained = count, 0


def oom_killed(exitcode: int | None) -> bool | None:
    """For a worker that died with ``exitcode`` of a signal parfn did not send:
    True if the OOM killer ended it, False if it did not, None if nobody can tell."""
    global _seen, _unexplained
    if exitcode != -signal.SIGKILL:
        return False
    count = read_oom_kills()
    with _lock:
        if count is None or _seen is None:
            _seen = count
            return None
        _unexplained += max(0, count - _seen)
        _seen = count
        if _unexplained:
            _unexplained -= 1
            return True
        return False
