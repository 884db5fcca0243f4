"""Limits: how much of the machine one model process may take, where each value comes from, and how it is enforced.

Every model process gets limits whether or not anyone asked: the defaults keep one model from taking the machine
(memory, processes, CPU time per call, the size of each file it writes, its private folder, /tmp and /dev/shm, and
the shared memory an output may grow to). A model raises or lowers them in its ``pyproject.toml``, a client in
``deployments.yaml``; the client's value wins:

    [tool.modelpex.limits]            # the model's own
    memory = "4GiB"

    clients: {acme: {models: {churn: {limits: {memory: "8GiB", cpu = "10m"}}}}}   # a client's

Sizes take units (``B``, ``KB``/``MB``/``GB``/``TB``, ``KiB``/``MiB``/``GiB``/``TiB``); times are seconds or take
``s``/``m``/``h``. What enforces each limit depends on the mode (`mechanisms`); the runner logs it at the first model
start, and README's isolation table lists it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from orchestrator.errors import SpecError

__all__ = [
    "LIMIT_NAMES",
    "ClientLimits",
    "Limits",
    "delegated_cgroup",
    "describe_value",
    "format_size",
    "limit_hit",
    "limit_line",
    "mechanisms",
    "parse_limits",
    "parse_size",
    "resolve",
]

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}  # fmt: skip
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - not Linux
        return 8 * 2**30


@dataclass(frozen=True)
class Limits:
    """One model process's limits, in bytes, processes and seconds."""

    memory: int  # bytes of private memory (RLIMIT_DATA; cgroup memory.max)
    processes: int  # processes and threads of its uid (RLIMIT_NPROC with a uid of its own; cgroup pids.max)
    cpu: float  # CPU seconds per call, of the process and everything it starts
    file_size: int  # bytes of any one file it writes (RLIMIT_FSIZE)
    folder: int  # bytes of its private folder (a sized tmpfs, with bubblewrap)
    tmp: int  # bytes of its private /tmp and /var/tmp (each a sized tmpfs, with bubblewrap)
    shm: int  # bytes of its private /dev/shm (a sized tmpfs, with bubblewrap)
    output: int  # bytes one output may be (announced before it is read)

    @classmethod
    def defaults(cls) -> Limits:
        """Enough for the example models many times over, and far from the whole machine: a quarter of the memory
        (at most 4 GiB), 256 processes, an hour of CPU per call, 1 GiB files and folders."""
        return cls(
            memory=min(4 * 2**30, _total_memory() // 4),
            processes=256,
            cpu=3600.0,
            file_size=2**30,
            folder=2**30,
            tmp=512 * 2**20,
            shm=512 * 2**20,
            output=2**30,
        )

    def for_runtime(self) -> dict[str, Any]:
        """What the model process applies to itself (`modelpex_runtime.containment.apply_limits`)."""
        return asdict(self)


LIMIT_NAMES = tuple(f.name for f in fields(Limits))
_TIMES = {"cpu"}
_COUNTS = {"processes"}


def parse_size(value: object, what: str) -> int:
    """Bytes from ``4GiB``, ``512 MB``, ``1000`` (bytes)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SpecError(f'{what} = {value!r} must be a size such as "4GiB" or "512MB"')
    if isinstance(value, int):
        size = value
    else:
        match = _NUMBER.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise SpecError(f"{what} = {value!r} must be a size such as \"4GiB\" or \"512MB\" (units: B, KB, MB, GB, "
                            "TB, KiB, MiB, GiB, TiB)")  # fmt: skip
        size = int(float(match.group(1)) * _UNITS[unit])
    if size < 4096:
        raise SpecError(f'{what} = {value!r} is below 4 KiB: give a size such as "4GiB"')
    return size


def _parse_seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SpecError(f'{what} = {value!r} must be CPU seconds such as 600 or "10m"')
    if isinstance(value, str):
        match = _NUMBER.match(value)
        if match is None or match.group(2).lower() not in _SECONDS:
            raise SpecError(f'{what} = {value!r} must be CPU seconds such as 600, "90s", "10m" or "2h"')
        value = float(match.group(1)) * _SECONDS[match.group(2).lower()]
    if value < 1:
        raise SpecError(f"{what} = {value!r} must be at least one second")
    return float(value)


def _parse_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 8:
        raise SpecError(f"{what} = {value!r} must be a whole number of processes, at least 8")
    return value


def parse_limits(table: object, where: str) -> dict[str, Any]:
    """A ``limits`` table, validated: each known name with its value in bytes, processes or seconds."""
    if table is None:
        return {}
    if not isinstance(table, Mapping):
        raise SpecError(f"{where} must be a table of limits ({', '.join(LIMIT_NAMES)})")
    unknown = sorted(set(table) - set(LIMIT_NAMES))
    if unknown:
        raise SpecError(f"{where}: unknown limits {unknown}; known are {', '.join(LIMIT_NAMES)}")
    parsed: dict[str, Any] = {}
    for name, value in table.items():
        what = f"{where}.{name}"
        if name in _TIMES:
            parsed[name] = _parse_seconds(value, what)
        elif name in _COUNTS:
            parsed[name] = _parse_count(value, what)
        else:
            parsed[name] = parse_size(value, what)
    return parsed


def resolve(model: Mapping[str, Any] | None, client: Mapping[str, Any] | None) -> Limits:
    """The defaults, then the model's values, then the client's (already parsed by `parse_limits`)."""
    return replace(Limits.defaults(), **{**(model or {}), **(client or {})})


def format_size(size: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size:g} B"


def describe_value(name: str, value: float) -> str:
    if name in _TIMES:
        return f"{value:g} s"
    if name in _COUNTS:
        return f"{int(value)}"
    return format_size(value)


@dataclass(frozen=True)
class ClientLimits:
    """A client's overrides from ``deployments.yaml`` (parsed) and where they are written."""

    values: Mapping[str, Any]
    where: str


def mechanisms(*, own_uid: bool, sized: bool) -> dict[str, str]:
    """What enforces each limit in this mode (the log at the first model start, README's isolation table);
    ``sized``: the private places are tmpfs of their sizes (bubblewrap's, or the fork server child's own)."""
    unsized = "not enforced without private places (RLIMIT_FSIZE bounds each file)"
    return {
        "memory": "RLIMIT_DATA",
        "processes": "RLIMIT_NPROC of its own uid" if own_uid else "not enforced: no uid of its own",
        "cpu": "RLIMIT_CPU, re-armed before each call",
        "file_size": "RLIMIT_FSIZE",
        "folder": "a sized tmpfs" if sized else unsized,
        "tmp": "a sized tmpfs" if sized else unsized,
        "shm": "a sized tmpfs" if sized else unsized,
        "output": "checked by the orchestrator when the model announces the output",
    }


_SIGXCPU = 24


def limit_hit(kind: str, message: str, signal: int | None = None) -> str | None:
    """Which limit a model's failure (exception type and message, or the signal that killed it) shows it hit."""
    if signal == _SIGXCPU:
        return "cpu"
    if kind == "MemoryError" or "[Errno 12]" in message:  # N.B. ENOMEM: what RLIMIT_DATA makes mmap and brk fail with
        return "memory"
    if "[Errno 27]" in message:  # EFBIG
        return "file_size"
    if kind == "BlockingIOError" and "[Errno 11]" in message:  # EAGAIN from fork
        return "processes"
    if "[Errno 28]" in message:  # ENOSPC
        if "'/tmp/" in message or "'/var/tmp/" in message:
            return "tmp"
        if "'/dev/shm/" in message:
            return "shm"
        return "folder"
    return None


def limit_line(label: str, name: str, limits: Limits, mechanism: str, where: str) -> str:
    """The one line a call that hit a limit fails with."""
    value = describe_value(name, getattr(limits, name))
    return f"model {label} hit its {name} limit of {value} ({mechanism}): raise {name} in {where}"


def delegated_cgroup() -> str | None:
    """Why no writable delegated cgroup v2 with the memory, pids and cpu controllers is in use here (detected, never
    assumed), as a phrase for the log.

    N.B. modelpex does not create cgroups yet: where one is delegated, the phrase says so, and the rlimits above
    remain what enforces each limit."""
    try:
        line = next(x for x in open("/proc/self/cgroup").read().splitlines() if x.startswith("0::"))
    except (OSError, StopIteration):
        return "none (no cgroup v2 hierarchy)"
    root = "/sys/fs/cgroup" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "/sys/fs/cgroup/unified"
    folder = os.path.join(root, line[3:].lstrip("/"))
    try:
        controllers = set(open(os.path.join(folder, "cgroup.controllers")).read().split())
    except OSError:
        return f"none ({folder} cannot be read)"
    missing = sorted({"memory", "pids", "cpu"} - controllers)
    if missing:
        return f"none ({folder} does not delegate {', '.join(missing)})"
    if not os.access(folder, os.W_OK):
        return f"none ({folder} is not writable)"
    return f"{folder} is delegated and writable, but not used yet"
