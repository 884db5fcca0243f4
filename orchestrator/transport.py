"""Transport, orchestrator side: every segment and pipe of a model call, created, reused and released by us.

Inputs and fitted states go in *sealed* memfds: this process writes them through a mapping it made before sealing
(``F_SEAL_FUTURE_WRITE``, ``F_SEAL_SHRINK``, ``F_SEAL_GROW``, ``F_SEAL_SEAL``), and from then on no descriptor or
mapping anyone holds or keeps can change them; a model gets a read-only descriptor and maps it without copying. A
memfd has no name another process could open, and the kernel frees it with its last descriptor and mapping, so a
crash or a kill -9 of either side leaks nothing and there is nothing to sweep.

Outputs come back through pipes, one per output and call: the model streams its Arrow IPC bytes into the write end
(``vmsplice`` of its column buffers, so our ``read`` is the only copy; an output that fits in the pipe is written
before the answer, a bigger one after it, while we read) and we read them into a *landing* buffer, a
private mapping of ours that no other process can reach: what a model does afterwards, with any descriptor it
kept, cannot change what we read, and a pipe is never handed to anyone again. Every output is then validated in
full before anything reads it (`decode_output`).

Each model process has a pool of its own (`SegmentPool`): a segment it was handed is only ever handed to it again,
so a mapping it kept from an earlier call never shows it another process's data. Sealed segments and landing
buffers stay allocated and resident between calls, because writing into pages already there is several times faster
than into fresh ones (field notes); a process-wide budget (`MODELPEX_SHM_POOL_BYTES`) caps what all pools keep idle.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import queue
import select
import threading
import weakref
from collections import OrderedDict
from typing import Any

import pyarrow as pa
from modelpex_runtime.protocol import FrameRef, TransportError
from modelpex_runtime.transport import (
    allocate,
    frame_ref,
    from_arrow,
    ipc_size,
    map_fd,
    read_table,
    to_arrow,
    write_table,
)

__all__ = ["FrameExchange", "Landing", "Segment", "SegmentPool", "decode_output", "idle_budget"]

PAGE = mmap.PAGESIZE
DEFAULT_POOL_BYTES = 1 << 30
# N.B. Linux 5.1+; Python 3.11's fcntl does not name it. Writes through write() and new writable mappings are
# refused, while the writable mapping this process made before sealing stays usable: only we can change the bytes.
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE
# N.B. An output's pipe: the first size the kernel grants. 1 MiB is what an unprivileged process may ask for
# (fs.pipe-max-size); a bigger pipe wakes the reader less often, but the model copies the last pipe-full of each
# output (see `modelpex_runtime.transport._PipeSink`), so bigger is not simply better.
PIPE_BYTES = (4 << 20, 1 << 20)
# N.B. A model that answered and then writes nothing for this long has stopped: its output is refused.
STALL_SECONDS = 60.0
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # N.B. Linux 5.14+; Python 3.11 does not name it.


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
    """A sealed segment (an input or a fitted state): its descriptor and our writable mapping, kept across calls."""

    def __init__(self, size: int, what: str) -> None:
        self.fd, self._mapping = _create_sealed(size, what)
        self.capacity = len(self._mapping)
        self._read_only = -1

    def read_only(self) -> int:
        """Our read-only descriptor of this segment, for a model (which receives a duplicate); opened once."""
        if self._read_only < 0:
            self._read_only = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        return self._read_only

    def mapping(self, size: int) -> mmap.mmap:
        """Our writable mapping, populated once; a sealed segment never grows, the pool picks one big enough."""
        if self._mapping is None or size > len(self._mapping):
            raise TransportError(f"a segment of {self.capacity} bytes cannot hold {size}")
        return self._mapping

    def close(self) -> None:
        """Drop our mapping and descriptor; the kernel frees the segment once the model's are gone too."""
        self._mapping = None  # N.B. Dropped, not closed: the kernel unmaps it when nothing refers to it.
        for fd in (self.fd, self._read_only):
            if fd >= 0:
                os.close(fd)
        self.fd = self._read_only = -1


class Landing:
    """A private, resident buffer of ours that outputs are read into; in use while a frame still views it."""

    def __init__(self, size: int) -> None:
        self.capacity = max(PAGE, -(-size // PAGE) * PAGE)
        self._map = mmap.mmap(-1, self.capacity, flags=mmap.MAP_PRIVATE)
        try:
            self._map.madvise(mmap.MADV_HUGEPAGE)  # N.B. Fewer faults and TLB misses where THP is "madvise".
        except (OSError, AttributeError):
            pass
        try:
            self._map.madvise(_MADV_POPULATE_WRITE)  # N.B. Every page now, in one call, not one fault at a time.
        except OSError:
            self._map[::PAGE] = bytes(len(range(0, self.capacity, PAGE)))
        self._lease: weakref.ref[memoryview] | None = None

    @property
    def free(self) -> bool:
        return self._lease is None or self._lease() is None

    def lease(self, size: int) -> memoryview:
        """The first ``size`` bytes, as a view whose life (and that of every Arrow buffer made of it) is the lease."""
        view = memoryview(self._map)[:size]
        self._lease = weakref.ref(view)
        return view

    def close(self) -> None:
        """Forget the buffer: its memory goes when the last frame viewing it does."""
        self._map = None  # type: ignore[assignment]


class _IdleBudget:
    """What every pool of this process keeps idle, least recently used first; beyond the budget, segments close."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._idle: OrderedDict[Segment, SegmentPool] = OrderedDict()
        self._lock = threading.Lock()

    def _limit(self) -> int:
        """The budget, and at most a quarter of the machine's memory (segments are memory, not /dev/shm)."""
        try:
            return min(self.max_bytes, os.sysconf("SC_PHYS_PAGES") * PAGE // 4)
        except (OSError, ValueError):
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
    """The segments and landing buffers of one model process: leased to one call at a time, idle between calls."""

    def __init__(self) -> None:
        self._idle: list[Segment] = []
        self._owned: set[Segment] = set()
        self._returned: queue.SimpleQueue[Segment] = queue.SimpleQueue()
        self._landings: list[Landing] = []
        self._lock = threading.Lock()

    def acquire(self, size: int, what: str) -> Segment:
        """The idle segment that fits ``size`` best (its pages already there), or a new one of that size."""
        self.settle()
        with self._lock:
            fits = [s for s in self._idle if s.capacity >= size]
            segment = min(fits, key=lambda s: s.capacity) if fits else None
            if segment is not None:
                self._idle.remove(segment)
        if segment is not None:
            idle_budget().remove(segment)
            return segment
        segment = Segment(size, what)
        with self._lock:
            self._owned.add(segment)
        return segment

    def landing(self, size: int) -> Landing:
        """A free landing buffer of at least ``size`` bytes. Free ones too small to be used are dropped, and so are
        the largest free ones beyond the idle budget (landing buffers are private memory, kept like segments)."""
        with self._lock:
            free = [landing for landing in self._landings if landing.free]
            fits = [landing for landing in free if landing.capacity >= size]
            chosen = min(fits, key=lambda landing: landing.capacity) if fits else None
            dropped = [landing for landing in free if landing is not chosen and landing.capacity < size]
            kept = sorted((x for x in free if x is not chosen and x not in dropped), key=lambda x: x.capacity)
            limit = idle_budget()._limit()
            while kept and sum(x.capacity for x in kept) > limit:
                dropped.append(kept.pop())
            for landing in dropped:
                self._landings.remove(landing)
                landing.close()
        if chosen is not None:
            return chosen
        landing = Landing(size)
        with self._lock:
            self._landings.append(landing)
        return landing

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
            landings, self._landings = self._landings, []
        for segment in owned:
            idle_budget().remove(segment)
            segment.close()
        for landing in landings:
            landing.close()

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


_pipe_sizes = list(PIPE_BYTES)  # N.B. What the kernel may grant: a size it refused once is not asked for again.


def _output_pipe() -> tuple[int, int]:
    """A new pipe for one output: our read end (non-blocking, so that a silent model cannot hang us), its write end."""
    read, write = os.pipe2(os.O_CLOEXEC)
    for size in list(_pipe_sizes):
        try:
            fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, size)
            break
        except OSError:
            if size != PIPE_BYTES[-1]:  # N.B. The smallest stays: it may fail only for a while (the pipe quota).
                with contextlib.suppress(ValueError):
                    _pipe_sizes.remove(size)  # N.B. Two failed fcntl calls per output and call, otherwise.
            # N.B. The default 64 KiB still works, with more wake-ups.
    os.set_blocking(read, False)
    return read, write


def _memory_available() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


def _read_exactly(fd: int, view: memoryview, what: str) -> None:
    """Fill ``view`` from the pipe ``fd``; a model that stops writing or closes its end early is a TransportError."""
    size, got = len(view), 0
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while got < size:
        try:
            count = os.readv(fd, [view[got:]])
        except BlockingIOError:
            if not poller.poll(STALL_SECONDS * 1000):
                raise TransportError(
                    f"{what}: the model stopped writing after {got} of the {size} bytes it announced"
                ) from None
            continue
        if count == 0:
            raise TransportError(f"{what}: the model ended its output after {got} of the {size} bytes it announced")
        got += count


class FrameExchange:
    """The descriptors of one call, in slot order: inputs written and sealed, output pipes made, all released on
    ``close``.

    Use it as a context manager: whatever happens inside (the model raising, dying, timing out, or this process
    raising between steps), every segment goes back to the pool and every descriptor opened for the call closes.
    """

    def __init__(self, pool: SegmentPool) -> None:
        self.pool = pool
        self.fds: list[int] = []  # the call's descriptors; slot i is fds[i]
        self._segments: list[Segment | None] = []  # slot -> its segment (None for a pipe)
        self._opened: list[int] = []  # descriptors we opened for this call
        self._pipes: dict[int, tuple[str, int]] = {}  # slot -> (output name, our read end)
        self._writers: list[int] = []  # the pipes' write ends, ours closed once the model has its own

    def __enter__(self) -> FrameExchange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _slot(self, segment: Segment | None, fd: int) -> int:
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
        return self._slot(segment, fd), size

    def put(self, name: str, frame: Any) -> FrameRef:
        """Write an input frame into a sealed segment the model will get read-only."""
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
        return self._slot(segment, fd)

    def reserve(self, name: str) -> int:
        """A new pipe for an output (or the state); the model gets its write end, at the slot returned."""
        read, write = _output_pipe()
        self._opened.append(read)
        self._writers.append(write)
        slot = self._slot(None, write)
        self._pipes[slot] = (name, read)
        return slot

    def _receive(self, slot: object, size: object, name: str, what: str) -> memoryview:
        """What the model wrote into the pipe reserved for ``name``, read into a landing buffer of ours."""
        if not isinstance(slot, int) or self._pipes.get(slot, ("",))[0] != name:
            raise TransportError(f"{what}: the model announced slot {slot!r}, which this call did not reserve for it")
        if not isinstance(size, int) or size < 0:
            raise TransportError(f"{what}: the model announced {size!r} bytes")
        if size > 64 << 20 and size > (available := _memory_available()):
            raise TransportError(
                f"{what}: the model announced {size / 1e6:.0f} MB, more than the {available / 1e6:.0f} MB of memory "
                "available"
            )
        writers, self._writers = self._writers, []
        for fd in writers:  # N.B. The model holds its own: a model that dies now ends its pipes.
            os.close(fd)
        _, read = self._pipes.pop(slot)
        view = self.pool.landing(size).lease(size)
        _read_exactly(read, view, what)
        return view

    def get(self, name: str, ref: FrameRef, library: str, what: str) -> Any:
        """Read an output back: into a private buffer of ours, then validated in full and decoded."""
        if not isinstance(ref, dict):
            raise TransportError(f"{what}: the model answered {ref!r} instead of a frame reference")
        view = self._receive(ref.get("slot"), ref.get("size"), name, what)
        return decode_output(pa.py_buffer(view), ref, library, what)

    def get_bytes(self, name: str, slot: object, size: object, what: str) -> bytes:
        return bytes(self._receive(slot, size, name, what))

    def close(self) -> None:
        opened, self._opened = self._opened + self._writers, []
        self._writers, self._pipes = [], {}
        for fd in opened:
            os.close(fd)
        segments, self._segments, self.fds = self._segments, [], []
        for segment in segments:
            if segment is not None:
                self.pool.release(segment)
        self.pool.settle()
