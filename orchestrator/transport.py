"""Transport, orchestrator side: every shared-memory segment of a model call, created, reused and released by us.

Segments are unnamed files on /dev/shm (``O_TMPFILE``, or ``memfd_create`` where /dev/shm cannot make them): no
other process can open one by name, and the kernel frees it when its last descriptor and mapping are gone, so a
crash or a kill -9 of either side leaks nothing and there is nothing for a sweeper to get wrong. A model process
receives each as a descriptor: an input through a read-only one (reopened from ``/proc/self/fd``), an output or a
state through the writable one it may grow.

Each model process has a pool of its own (`SegmentPool`): a segment it was handed is only ever handed to it again,
so a mapping a model kept from an earlier call never shows it another model's data. Idle segments stay allocated
between calls, because writing into already-populated pages is several times faster than into fresh tmpfs pages
(field notes); a process-wide budget (`MODELPEX_SHM_POOL_BYTES`) caps what all pools keep idle together.

Outputs are copied out of their segment before they are parsed: a model process that lives on may still write
into a segment after it answered, and the orchestrator never decodes memory someone else can change.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import queue
import threading
from collections import OrderedDict
from typing import Any

import pyarrow as pa
from modelpex_runtime.protocol import FrameRef, TransportError
from modelpex_runtime.transport import (
    SHM_DIR,
    allocate,
    frame_ref,
    from_arrow,
    ipc_size,
    map_fd,
    read_table,
    to_arrow,
    write_table,
)

__all__ = ["FrameExchange", "Segment", "SegmentPool", "decode_output", "idle_budget"]

PAGE = mmap.PAGESIZE
DEFAULT_POOL_BYTES = 1 << 30
# N.B. Linux 5.1+; Python 3.11's fcntl does not name it. Writes through write() and new writable mappings are
# refused, while the writable mapping this process made before sealing stays usable: only we can change the bytes.
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE


def _create_fd() -> int:
    try:
        return os.open(SHM_DIR, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.EACCES):
            raise
        return os.memfd_create("modelpex", os.MFD_CLOEXEC)  # N.B. Not counted against /dev/shm's size.


def _create_sealed(size: int, what: str) -> tuple[int, mmap.mmap]:
    """A memfd of ``size`` bytes (rounded to pages), our writable mapping of it, then sealed against everyone else.

    N.B. Sealed before any other process sees it: its size is fixed and nothing but the mapping made here (which
    never leaves this process) can write it, through any descriptor or mapping anyone keeps, for its whole life.
    """
    fd = os.memfd_create("modelpex-input", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.fchmod(fd, 0o600)
        allocate(fd, -(-max(size, 1) // PAGE) * PAGE, what)
        mapping = map_fd(fd, os.fstat(fd).st_size, writable=True, what=what)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd, mapping


class Segment:
    """One segment this process created: its descriptor, and our writable mapping, re-used across calls.

    Two kinds that never mix: *sealed* segments (inputs and fitted states) are memfds only this process can write,
    handed to a model read-only; *output* segments are handed to a model writable and are only ever handed to that
    process again as outputs, never as anything it reads back, nor to anyone else.
    """

    def __init__(self, size: int, what: str, *, sealed: bool = False) -> None:
        self.sealed = sealed
        self._mapping: mmap.mmap | None = None
        if sealed:
            self.fd, self._mapping = _create_sealed(size, what)
            self.capacity = len(self._mapping)
            return
        self.fd = _create_fd()
        try:
            allocate(self.fd, max(size, PAGE), what)
        except BaseException:
            os.close(self.fd)
            raise
        self.capacity = os.fstat(self.fd).st_size

    def read_only(self) -> int:
        """A new read-only descriptor of this segment, for a model's input."""
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)

    def mapping(self, size: int) -> mmap.mmap:
        """A writable mapping of at least ``size`` bytes, populated once and kept while it is big enough."""
        if self.sealed:
            assert self._mapping is not None and size <= len(self._mapping), "a sealed segment cannot grow"
            return self._mapping
        if self._mapping is None or len(self._mapping) < size:
            allocate(self.fd, size, "a segment")
            self.capacity = max(self.capacity, os.fstat(self.fd).st_size)
            self._mapping = map_fd(self.fd, self.capacity, writable=True)
        return self._mapping

    def refresh(self) -> None:
        """Learn the size a model may have grown the segment to."""
        self.capacity = os.fstat(self.fd).st_size

    def close(self) -> None:
        """Drop our mapping and descriptor; the kernel frees the segment once the model's are gone too."""
        self._mapping = None  # N.B. Dropped, not closed: the kernel unmaps it when nothing refers to it.
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class _IdleBudget:
    """What every pool of this process keeps idle, least recently used first; beyond the budget, segments close."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._idle: OrderedDict[Segment, SegmentPool] = OrderedDict()
        self._lock = threading.Lock()

    def _limit(self) -> int:
        try:
            stat = os.statvfs(SHM_DIR)
            return min(self.max_bytes, stat.f_blocks * stat.f_frsize // 4)
        except OSError:
            return self.max_bytes

    def add(self, segment: Segment, pool: SegmentPool) -> None:
        with self._lock:
            self._idle[segment] = pool
            limit, evicted = self._limit(), []
            while self._idle and sum(s.capacity for s in self._idle) > limit:
                evicted.append(self._idle.popitem(last=False))
        for old, owner in evicted:
            owner.evict(old)

    def remove(self, segment: Segment) -> None:
        with self._lock:
            self._idle.pop(segment, None)


def _pool_bytes() -> int:
    from orchestrator.settings import parse_size

    return parse_size(os.environ.get("MODELPEX_SHM_POOL_BYTES"), "MODELPEX_SHM_POOL_BYTES", DEFAULT_POOL_BYTES)


_budget: _IdleBudget | None = None


def idle_budget() -> _IdleBudget:
    global _budget
    if _budget is None:
        _budget = _IdleBudget(_pool_bytes())
    return _budget


class SegmentPool:
    """The segments of one model process: leased to one call at a time, idle between calls, closed with it."""

    def __init__(self) -> None:
        self.output_sizes: dict[str, int] = {}  # output name -> its last size: the idle segment that fits it is taken
        self._idle: list[Segment] = []
        self._owned: set[Segment] = set()
        self._returned: queue.SimpleQueue[Segment] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def acquire(self, size: int, what: str) -> Segment:
        """An idle sealed segment that already holds ``size`` bytes of pages, or a new one of that size (in pages)."""
        segment = self._take(size, any_size=False, sealed=True)
        if segment is None:
            segment = Segment(size, what, sealed=True)
            with self._lock:
                self._owned.add(segment)
        return segment

    def output(self, size: int, what: str) -> Segment:
        """An output segment: the idle one that fits ``size`` best, else the largest idle one (the model grows it),
        else a new one of one page. Never a sealed one: what a model could write, it never reads back."""
        segment = self._take(size, any_size=True, sealed=False)
        if segment is None:
            segment = Segment(0, what)
            with self._lock:
                self._owned.add(segment)
        return segment

    def _take(self, size: int, *, any_size: bool, sealed: bool) -> Segment | None:
        self.settle()
        with self._lock:
            kind = [s for s in self._idle if s.sealed == sealed]
            fits = [s for s in kind if s.capacity >= size]
            if fits:
                segment = min(fits, key=lambda s: s.capacity)
            elif any_size and kind:
                segment = max(kind, key=lambda s: s.capacity)
            else:
                return None
            self._idle.remove(segment)
        idle_budget().remove(segment)
        return segment

    def release(self, segment: Segment) -> None:
        """Give a leased segment back; it turns idle at this pool's next step (`settle`).

        N.B. Nothing but a `queue.SimpleQueue.put`, which is reentrant and takes no lock of ours: a finalizer, a
        signal handler or a garbage collection that runs while this pool's lock is held can release safely.
        """
        self._returned.put(segment)

    def settle(self) -> None:
        """Turn released segments idle, then let the process-wide budget close what it cannot keep."""
        settled = []
        with self._lock:
            while not self._returned.empty():
                segment = self._returned.get_nowait()
                if segment in self._owned and segment not in self._idle:
                    segment.refresh()
                    self._idle.append(segment)
                    settled.append(segment)
        for segment in settled:  # N.B. Outside our lock: the budget may evict from any pool, this one included.
            idle_budget().add(segment, self)

    def evict(self, segment: Segment) -> None:
        """Close a segment the budget cannot keep, if it is still idle: one leased again meanwhile is in use."""
        with self._lock:
            if segment not in self._idle:
                return
            self._idle.remove(segment)
            self._owned.discard(segment)
        segment.close()

    def close(self) -> None:
        """Close every segment, leased ones included: the model process they were handed to has ended."""
        with self._lock:
            owned, self._owned, self._idle = list(self._owned), set(), []
        for segment in owned:
            idle_budget().remove(segment)
            segment.close()

    def held_bytes(self) -> int:
        self.settle()
        with self._lock:
            return sum(s.capacity for s in self._owned)

    def leased_bytes(self) -> int:
        """What calls hold and have not given back: zero between calls, or a call leaked its segments."""
        self.settle()
        with self._lock:
            return sum(s.capacity for s in self._owned if s not in self._idle)


def decode_output(payload: pa.Buffer, ref: FrameRef, library: str, what: str) -> Any:
    """An output's bytes as a frame in ``library``, validated in full before anything else reads them.

    N.B. The one way a model's Arrow stream becomes a frame here: an output whose offsets go backwards or whose
    lengths run past its buffers would make conversions and metadata read out of bounds (a SIGSEGV of the
    orchestrator, issue 20). A malformed one is a TransportError naming the model, the output and the problem.
    """
    return from_arrow(read_table(payload, ref, what, full=True), library, what)


class FrameExchange:
    """The segments of one call, in slot order: inputs written, outputs reserved, all released on ``close``.

    Use it as a context manager: whatever happens inside (the model raising, dying, timing out, or this process
    raising between steps), every segment goes back to the pool and every descriptor opened for the call closes.
    """

    def __init__(self, pool: SegmentPool) -> None:
        self.pool = pool
        self.fds: list[int] = []  # the call's descriptors; slot i is fds[i]
        self._segments: list[Segment] = []
        self._opened: list[int] = []  # read-only descriptors we opened for this call
        self._reserved: dict[int, str] = {}  # slot -> output name

    def __enter__(self) -> FrameExchange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _slot(self, segment: Segment, fd: int) -> int:
        self._segments.append(segment)
        self.fds.append(fd)
        return len(self.fds) - 1

    def _write(self, table: pa.Table, what: str) -> tuple[int, int]:
        size = ipc_size(table)
        segment = self.pool.acquire(size, what)
        try:
            write_table(segment.mapping(size), table, size)
            fd = segment.read_only()
        except BaseException:
            self.pool.release(segment)
            raise
        self._opened.append(fd)
        return self._slot(segment, fd), size

    def put(self, name: str, frame: Any) -> FrameRef:
        """Write an input frame into a segment the model will get read-only."""
        what = f"input frame {name!r}"
        table = to_arrow(frame, what)
        slot, size = self._write(table, what)
        return frame_ref(slot, size, table)

    def put_bytes(self, payload: bytes, what: str) -> int:
        """Write raw bytes (a fitted state) into a sealed segment the model will get read-only; returns its slot.

        The bytes are hashed again where the model reads them, in the sealed segment: what was verified is what the
        model gets, and nothing can change it after this check.
        """
        segment = self.pool.acquire(len(payload), what)
        try:
            if payload:
                mapping = segment.mapping(len(payload))
                mapping[: len(payload)] = payload
                with memoryview(mapping) as view:
                    sealed = hashlib.sha256(view[: len(payload)]).digest()
                if sealed != hashlib.sha256(payload).digest():
                    raise TransportError(f"{what} changed in its segment after it was verified: not handed over")
            fd = segment.read_only()
        except BaseException:
            self.pool.release(segment)
            raise
        self._opened.append(fd)
        return self._slot(segment, fd)

    def reserve(self, name: str) -> int:
        """A writable segment for an output (or the state), which the model grows to what it writes; its slot.

        N.B. Never new beyond one page: the model grows the segment to the exact size of what it writes, so a call
        needs no room for an output bigger than the real one. An idle segment comes first (the best fit for this
        output's last size), because writing into pages already there is several times faster than into fresh ones.
        """
        segment = self.pool.output(self.pool.output_sizes.get(name, 0), f"output {name!r}")
        slot = self._slot(segment, segment.fd)
        self._reserved[slot] = name
        return slot

    def _payload(self, slot: object, size: object, name: str, what: str) -> pa.Buffer:
        """A private copy of what the model wrote into the segment reserved for ``name``."""
        if not isinstance(slot, int) or self._reserved.get(slot) != name:
            raise TransportError(f"{what}: the model announced slot {slot!r}, which this call did not reserve for it")
        segment = self._segments[slot]
        segment.refresh()
        if not isinstance(size, int) or not 0 <= size <= segment.capacity:
            raise TransportError(f"{what}: the model announced {size!r} bytes but its segment holds {segment.capacity}")
        self.pool.output_sizes[name] = size
        copy = pa.allocate_buffer(size)
        if size:
            view = memoryview(segment.mapping(size))[:size]
            try:
                memoryview(copy).cast("B")[:] = view
            finally:
                view.release()
        return copy

    def get(self, name: str, ref: FrameRef, library: str, what: str) -> Any:
        """Read an output back: copied out of its segment, then validated and decoded."""
        if not isinstance(ref, dict):
            raise TransportError(f"{what}: the model answered {ref!r} instead of a frame reference")
        payload = self._payload(ref.get("slot"), ref.get("size"), name, what)
        return decode_output(payload, ref, library, what)

    def get_bytes(self, name: str, slot: object, size: object, what: str) -> bytes:
        return self._payload(slot, size, name, what).to_pybytes()

    def close(self) -> None:
        opened, self._opened = self._opened, []
        for fd in opened:
            os.close(fd)
        segments, self._segments, self.fds, self._reserved = self._segments, [], [], {}
        for segment in segments:
            self.pool.release(segment)
        self.pool.settle()
