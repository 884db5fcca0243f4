"""Transport, orchestrator side: owns every shared-memory segment of a model call, and re-uses them.

The orchestrator creates every segment, inputs and outputs alike (a model only writes into, and may grow, the
output segments it was given), so one process owns every unlink. Segments go back to a per-process pool after a
call and are re-used while their pages are still populated: page faults on fresh tmpfs pages, not copying,
dominate a naive transport (field notes). The pool is emptied when the process exits; segments of a process that
was killed (kill -9) are removed by `sweep_orphans`, which only touches ``mpx_<pid>_...`` names whose pid is dead.

An output read back is a zero-copy view of its segment. The segment returns to the pool only when the last Arrow
buffer referring to it is garbage: the view is an Arrow "foreign buffer" whose base object carries a finalizer.
"""

from __future__ import annotations

import atexit
import mmap
import os
import secrets
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from modelpex_runtime.protocol import SEGMENT_NAME, SEGMENT_PREFIX, FrameRef, TransportError
from modelpex_runtime.transport import (
    SHM_DIR,
    _open,
    allocate,
    forget_mapping,
    frame_ref,
    from_arrow,
    ipc_size,
    map_segment,
    read_table,
    to_arrow,
    write_table,
)

__all__ = ["FrameExchange", "SegmentPool", "default_pool", "private_pool", "sweep_orphans"]

try:
    import _posixshmem
except ImportError:  # pragma: no cover
    _posixshmem = None

PAGE = mmap.PAGESIZE
# N.B. Idle segments stay allocated between calls; at most this much, and at most a quarter of /dev/shm.
DEFAULT_POOL_BYTES = int(os.environ.get("MODELPEX_SHM_POOL_BYTES", 1 << 30))


def _new_name() -> str:
    return f"{SEGMENT_PREFIX}{os.getpid()}_{secrets.token_hex(8)}"


def _unlink(name: str) -> None:
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


@dataclass(eq=False)
class Segment:
    """A segment this process created; its writable mapping is cached by `map_segment` and re-used."""

    name: str
    capacity: int

    def mapping(self, size: int) -> mmap.mmap:
        """A writable mapping of at least ``size`` bytes (populated once per process, then re-used)."""
        mapping = map_segment(self.name, length=max(size, 1), writable=True, grow_to=size)
        self.capacity = max(self.capacity, len(mapping))
        return mapping

    def refresh(self) -> None:
        """Learn the size a model may have grown the segment to (its writes do not touch our mapping)."""
        fd = _open(self.name, os.O_RDONLY)
        try:
            self.capacity = os.fstat(fd).st_size
        finally:
            os.close(fd)


class SegmentPool:
    """Segments owned by this process: leased to one call at a time, idle between calls, unlinked on close."""

    def __init__(self, max_idle_bytes: int = DEFAULT_POOL_BYTES) -> None:
        self.max_idle_bytes = max_idle_bytes
        self.output_sizes: dict[str, int] = {}  # output name -> its last size: the next one is reserved that big
        self._idle: list[Segment] = []
        self._owned: dict[str, Segment] = {}
        self._lock = threading.Lock()

    def _budget(self) -> int:
        try:
            stat = os.statvfs(SHM_DIR)
            return min(self.max_idle_bytes, stat.f_blocks * stat.f_frsize // 4)
        except OSError:
            return self.max_idle_bytes

    def acquire(self, size: int, what: str) -> Segment:
        """An idle segment that already holds ``size`` bytes of pages, or a new one of exactly that size."""
        with self._lock:
            fits = [s for s in self._idle if s.capacity >= size]
            if fits:
                segment = min(fits, key=lambda s: s.capacity)
                self._idle.remove(segment)
                return segment
        name = _new_name()
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        segment = Segment(name, 0)
        with self._lock:
            self._owned[name] = segment
        try:
            allocate(fd, max(size, PAGE), what)
            segment.capacity = os.fstat(fd).st_size
        except BaseException:
            self.destroy(segment)
            raise
        finally:
            os.close(fd)
        return segment

    def release(self, segment: Segment) -> None:
        """Back to the pool; the least recently used idle segments are unlinked beyond the idle budget."""
        with self._lock:
            if segment.name not in self._owned or segment in self._idle:
                return
            try:
                segment.refresh()
            except TransportError:
                self._owned.pop(segment.name, None)
                return
            self._idle.append(segment)
            budget, evicted = self._budget(), []
            while self._idle and sum(s.capacity for s in self._idle) > budget:
                evicted.append(self._idle.pop(0))
        for old in evicted:
            self.destroy(old)

    def destroy(self, segment: Segment) -> None:
        with self._lock:
            self._owned.pop(segment.name, None)
            if segment in self._idle:
                self._idle.remove(segment)
        forget_mapping(segment.name)  # N.B. Dropped, never closed: a view may still use it; the kernel unmaps later.
        _unlink(segment.name)

    def close(self) -> None:
        """Unlink every segment this pool created, leased or idle."""
        with self._lock:
            owned = list(self._owned.values())
        for segment in owned:
            self.destroy(segment)

    def names(self) -> set[str]:
        with self._lock:
            return set(self._owned)


_default: SegmentPool | None = None
_default_lock = threading.Lock()


def default_pool() -> SegmentPool:
    """This process's pool; the first use sweeps segments left by dead orchestrators and arms the exit cleanup."""
    global _default
    with _default_lock:
        if _default is None:
            sweep_orphans()
            _default = SegmentPool()
            atexit.register(_default.close)
        return _default


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink segments named ``mpx_<pid>_...`` whose pid is dead; never anything else. Returns what it removed."""
    try:
        entries = os.listdir(shm_dir)
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = SEGMENT_NAME.fullmatch(entry)
        if match and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"])):
            _unlink(entry)
            removed.append(entry)
    return removed


class _Lease:
    """Base object of a zero-copy output view: when Arrow drops the last buffer, the segment goes back."""

    def __init__(self, mapping: mmap.mmap) -> None:
        self.buffer = pa.py_buffer(mapping)


class FrameExchange:
    """The segments of one model call: inputs written, outputs reserved, all released on ``close``.

    Use it as a context manager: whatever happens inside (the model raising, dying, timing out, or this process
    raising between steps), every segment goes back to the pool or is unlinked.
    """

    def __init__(self, pool: SegmentPool | None = None) -> None:
        self.pool = pool or default_pool()
        self._held: list[Segment] = []
        self._outputs: dict[str, tuple[str, Segment]] = {}  # segment name -> (output name, segment)
        self._input_sizes: list[int] = []

    def __enter__(self) -> FrameExchange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, name: str, frame: Any) -> FrameRef:
        """Write an input frame into a segment (sized exactly, or a re-used one already big enough)."""
        what = f"input frame {name!r}"
        table = to_arrow(frame, what)
        size = ipc_size(table)
        segment = self.pool.acquire(size, what)
        self._held.append(segment)
        write_table(segment.mapping(size), table, size)
        self._input_sizes.append(size)
        return frame_ref(segment.name, size, table)

    def reserve_output(self, name: str) -> str:
        """A segment name for an output the model will write (and grow to the size it needs).

        N.B. Reserved as big as this output was last time (or as the largest input): a re-used segment of that
        size already has its pages, where a small one would be grown into fresh pages by the model.
        """
        expected = self.pool.output_sizes.get(name, max(self._input_sizes, default=0))
        segment = self.pool.acquire(expected, f"output frame {name!r}")
        self._held.append(segment)
        self._outputs[segment.name] = (name, segment)
        return segment.name

    def get(self, ref: FrameRef, library: str) -> Any:
        """Read an output back without copying; only segments reserved by this exchange are accepted."""
        if ref["segment"] not in self._outputs:
            raise TransportError(f"the model announced segment {ref['segment']!r}, which this call did not reserve")
        name, segment = self._outputs[ref["segment"]]
        self.pool.output_sizes[name] = ref["size"]
        lease = _Lease(segment.mapping(ref["size"]))
        view = pa.foreign_buffer(lease.buffer.address, ref["size"], base=lease)
        table = read_table(view, ref)
        self._held.remove(segment)
        del self._outputs[segment.name]
        weakref.finalize(lease, self.pool.release, segment)
        del lease, view
        return from_arrow(table, library)

    def close(self) -> None:
        held, self._held, self._outputs = self._held, [], {}
        for segment in held:
            self.pool.release(segment)


@contextmanager
def private_pool() -> Iterator[SegmentPool]:
    """A pool that keeps nothing idle, closed on exit: for one-shot callers and tests of the unlink paths."""
    pool = SegmentPool(max_idle_bytes=0)
    try:
        yield pool
    finally:
        pool.close()
