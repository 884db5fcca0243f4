"""Containment: the limits a model process applies to itself before it imports the model.

The orchestrator decides the limits (``orchestrator.limits``) and sends them with the request that forks a client's
child; the child calls `apply_limits` after the fork and before it imports the model, so nothing the model starts
escapes them:

- memory: ``RLIMIT_DATA`` (private writable memory: the heap and anonymous maps; the shared-memory segments frames
  travel in are not counted, their own limits are ``output`` and the private /dev/shm);
- processes: ``RLIMIT_NPROC``, only with a uid of its own (it counts every process of the real uid);
- size of any file written: ``RLIMIT_FSIZE``;
- CPU time per call: ``RLIMIT_CPU``, re-armed before every call (`arm_call`) to what the process has used plus the
  limit; the kernel sends SIGXCPU when it is reached, which ends the process;
- ``oom_score_adj`` 1000: when the machine runs out of memory, the kernel picks a model process first, never the
  orchestrator.

Standard library only, like the rest of the runtime.
"""

from __future__ import annotations

import resource
from collections.abc import Mapping
from typing import Any

__all__ = ["apply_limits", "arm_call"]

_applied: dict[str, Any] = {}


def _set(kind: int, value: int) -> None:
    """Soft and hard limit ``value``, never above a hard limit already lower (which the process cannot raise)."""
    _, hard = resource.getrlimit(kind)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))


def _cpu_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def arm_call() -> None:
    """Before a call: this call may use ``cpu`` more seconds of CPU (SIGXCPU ends the process past them).

    N.B. The soft limit only, since an unprivileged process cannot raise a hard one again for the next call."""
    cpu = _applied.get("cpu")
    if cpu:
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = int(_cpu_used() + cpu) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def apply_limits(limits: Mapping[str, Any]) -> None:
    """Apply ``limits`` (``orchestrator.limits.Limits.for_runtime`` plus ``own_uid``) to this process and all it
    will start; an empty mapping changes nothing."""
    if not limits:
        return
    _applied.clear()
    _applied.update(limits)
    if limits.get("memory"):
        _set(resource.RLIMIT_DATA, int(limits["memory"]))
    if limits.get("processes") and limits.get("own_uid"):
        _set(resource.RLIMIT_NPROC, int(limits["processes"]))
    if limits.get("file_size"):
        _set(resource.RLIMIT_FSIZE, int(limits["file_size"]))
    arm_call()
    try:
        with open("/proc/self/oom_score_adj", "w") as adj:
            adj.write("1000")
    except OSError:  # pragma: no cover - /proc not mounted
        pass
