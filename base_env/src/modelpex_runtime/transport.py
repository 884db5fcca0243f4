"""Transport: frames as Arrow IPC streams in shared-memory segments, handed over as file descriptors.

This is the half both processes share (the orchestrator adds segment ownership and pooling on top). A segment is an
unnamed file on /dev/shm's tmpfs (``O_TMPFILE``): it has no name another process could open, it counts against
/dev/shm's size like any segment, and the kernel frees it when the last descriptor and mapping are gone, so no path,
crash included, can leak it. A model process receives each segment as a descriptor: inputs read-only, outputs
writable. It maps inputs without copying; a mapping is never closed explicitly, Arrow buffers hold the ``mmap``
object and the kernel unmaps it when the last of them is gone. N.B. Nothing keeps a mapping beyond the frames that
view it: a model process that kept one between calls would hold the space of a segment the orchestrator has closed,
and its next call could fail for room it does not need (re-mapping costs ~2 ms per 20 MiB here).

Writers size a segment exactly (``posix_fallocate``, which also fails cleanly with ENOSPC where a plain
``ftruncate`` would let the writer die of SIGBUS on a full /dev/shm) and map it with ``MAP_POPULATE``, so pages are
allocated in one kernel call rather than one fault at a time.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
from typing import Any

import pyarrow as pa

from modelpex_runtime.protocol import FRAME_LIBRARIES, PROTOCOL_VERSION, FrameRef, ShmSpaceError, TransportError

__all__ = [
    "SHM_DIR",
    "allocate",
    "check_space",
    "frame_ref",
    "from_arrow",
    "ipc_size",
    "map_fd",
    "read_bytes",
    "read_frame",
    "read_table",
    "to_arrow",
    "write_bytes",
    "write_frame",
    "write_table",
]

SHM_DIR = "/dev/shm"
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
# N.B. Below this many rows, pandas conversions on one thread: starting a thread pool cost more than the work.
_THREADED_ROWS = 1_000_000
_SHM_FIX = (
    "raise it: Docker `--shm-size=2g` (compose: `shm_size`), Kubernetes an emptyDir with `medium: Memory` and a "
    "`sizeLimit` mounted at /dev/shm"
)


def check_space(needed: int, what: str, fd: int | None = None) -> None:
    """Fail before writing when the file system of segment ``fd`` (or /dev/shm) cannot hold ``needed`` more bytes.

    N.B. Measured on the segment's own file system: a sandboxed model process sees a private /dev/shm, not the one
    its segments live on. A memfd's reports no size at all (f_blocks 0): it has no limit of its own to check.
    """
    try:
        stat = os.statvfs(SHM_DIR) if fd is None else os.fstatvfs(fd)
    except OSError:
        return  # N.B. Nothing to measure: the allocation itself reports ENOSPC.
    free = stat.f_bavail * stat.f_frsize
    if stat.f_blocks and needed > free:
        raise ShmSpaceError(
            f"{what} needs {needed / 1e6:.1f} MB of shared memory but {SHM_DIR} has {free / 1e6:.1f} MB free "
            f"(of {stat.f_blocks * stat.f_frsize / 1e6:.1f} MB): {_SHM_FIX}"
        )


def allocate(fd: int, size: int, what: str) -> None:
    """Grow the segment behind ``fd`` to at least ``size`` bytes, with real pages, or fail with ShmSpaceError."""
    current = os.fstat(fd).st_size
    if size <= current:
        return
    check_space(size - current, what, fd)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):
            raise ShmSpaceError(
                f"{what} needs {size / 1e6:.1f} MB of shared memory and {SHM_DIR} is full: {_SHM_FIX}"
            ) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)  # N.B. File systems without fallocate: sparse growth.


def map_fd(fd: int, length: int, *, writable: bool = False, what: str = "segment") -> mmap.mmap:
    """Map the first ``length`` bytes of a segment; announcing more than it holds is a TransportError."""
    actual = os.fstat(fd).st_size
    if length > actual or length <= 0:
        raise TransportError(
            f"{what} holds {actual} bytes but {length} were announced: the payload is truncated "
            "(the writer died mid-write, or the segment was altered)"
        )
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    return mmap.mmap(fd, length, flags=mmap.MAP_SHARED | _POPULATE, prot=prot)


def to_arrow(frame: Any, what: str = "the frame") -> pa.Table:
    """A pandas, polars or pyarrow frame as an Arrow table, without copying column data where Arrow allows."""
    if isinstance(frame, pa.Table):
        return frame
    if isinstance(frame, pa.RecordBatch):
        return pa.Table.from_batches([frame])
    module, kind = type(frame).__module__.partition(".")[0], type(frame).__name__
    if kind != "DataFrame" or module not in ("pandas", "polars"):
        raise TransportError(
            f"cannot write {what}, a {type(frame).__module__}.{type(frame).__qualname__}: return a pandas or polars "
            "DataFrame or a pyarrow Table"
        )
    try:
        return _from_pandas(frame) if module == "pandas" else _from_polars(frame)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise TransportError(
            f"cannot write {what}: Arrow refused the {module} DataFrame ({exc}); give every column a unique name "
            "and values of one type"
        ) from None


def _from_pandas(frame: Any) -> pa.Table:
    if (plain := _from_plain_pandas(frame)) is not None:
        return plain
    return pa.Table.from_pandas(frame, nthreads=1 if len(frame) < _THREADED_ROWS else None)


def _from_polars(frame: Any) -> pa.Table:
    import polars as pl

    # N.B. The newest compat level keeps string_view; the default converts every string column (field notes).
    return frame.to_arrow(compat_level=pl.CompatLevel.newest())


def _from_plain_pandas(frame: Any) -> pa.Table | None:
    """The frame as a table when Arrow's own types describe it fully, else None (``from_pandas`` must).

    Plain means a default index and string-named numeric, bool and default-str columns: such a frame needs no
    pandas metadata to come back as it left. Skipping ``from_pandas``'s metadata machinery, in one pass over the
    columns (``frame.dtypes`` alone builds a Series), takes more than half off a small frame's conversion.
    """
    import pandas as pd

    index = frame.index
    if type(index) is not pd.RangeIndex or index.start != 0 or index.step != 1 or index.name is not None:
        return None
    names, arrays = [], []
    for name, series in frame.items():
        if type(name) is not str or not _plain_dtype(series.dtype):
            return None
        names.append(name)
        arrays.append(_plain_column(series))
    if len(set(names)) != len(names):
        return None
    return pa.Table.from_arrays(arrays, names=names)


def _plain_column(series: Any) -> pa.Array | pa.ChunkedArray:
    values = series.array
    if hasattr(values, "__arrow_array__"):  # N.B. The default str dtype is Arrow already: no copy.
        return pa.array(values)
    return pa.array(values.to_numpy(), from_pandas=True)


@functools.cache
def _plain_dtype(dtype: Any) -> bool:
    import numpy as np
    import pandas as pd

    if isinstance(dtype, np.dtype):
        return dtype.kind in "iufb"
    return dtype == pd.StringDtype(storage="pyarrow", na_value=np.nan)


def from_arrow(table: pa.Table, library: str) -> Any:
    """The table in the library a model asked for: zero-copy to polars, and for numeric columns to pandas."""
    if library == "pyarrow":
        return table
    if library == "polars":
        import polars as pl

        return pl.from_arrow(table, rechunk=False)
    if library == "pandas":
        return table.to_pandas(split_blocks=True, use_threads=table.num_rows >= _THREADED_ROWS)
    raise TransportError(f"unknown frame library {library!r}: use one of {', '.join(FRAME_LIBRARIES)}")


def _stream(sink: Any, table: pa.Table) -> None:
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def ipc_size(table: pa.Table) -> int:
    """Exact bytes of ``table`` as an IPC stream, measured without writing any data."""
    sink = pa.MockOutputStream()
    _stream(sink, table)
    return sink.size()


def write_table(mapping: mmap.mmap, table: pa.Table, size: int) -> None:
    """Write ``table`` as an IPC stream at the start of a writable mapping of at least ``size`` bytes."""
    sink = pa.FixedSizeBufferWriter(pa.py_buffer(mapping))
    _stream(sink, table)
    if sink.tell() != size:
        raise TransportError(f"wrote {sink.tell()} bytes where {size} were measured: the table changed while written")


def read_table(buffer: pa.Buffer, ref: FrameRef, what: str = "the frame") -> pa.Table:
    """Decode a segment's payload; anything but a well-formed stream of the announced rows is a TransportError."""
    try:
        with pa.ipc.open_stream(buffer) as reader:
            table = reader.read_all()
        table.validate()
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise TransportError(
            f"{what} is not a valid Arrow IPC stream ({exc}): the writer died mid-write or the segment was altered"
        ) from None
    if table.num_rows != ref["num_rows"]:
        raise TransportError(f"{what} holds {table.num_rows} rows but {ref['num_rows']} were announced")
    return table


def frame_ref(slot: int, size: int, table: pa.Table) -> FrameRef:
    return FrameRef(
        protocol=PROTOCOL_VERSION,
        slot=slot,
        size=size,
        num_rows=table.num_rows,
        columns=[f"{field.name}: {field.type}" for field in table.schema],
    )


def read_frame(ref: FrameRef, fd: int, library: str, what: str = "the frame") -> Any:
    """Map a frame's segment read-only and return it in ``library``; its buffers are views of the mapping."""
    if ref.get("protocol") != PROTOCOL_VERSION:
        raise TransportError(f"{what}: frame reference speaks protocol {ref.get('protocol')!r}, not {PROTOCOL_VERSION}")
    mapping = map_fd(fd, ref["size"], what=what)
    return from_arrow(read_table(pa.py_buffer(mapping).slice(0, ref["size"]), ref, what), library)


def write_frame(frame: Any, fd: int, slot: int, what: str = "the frame") -> FrameRef:
    """Write a frame into a writable segment, growing it to the exact size needed."""
    table = to_arrow(frame, what)
    size = ipc_size(table)
    allocate(fd, size, what)
    write_table(map_fd(fd, size, writable=True, what=what), table, size)
    return frame_ref(slot, size, table)


def read_bytes(fd: int, size: int, what: str = "the state") -> bytes:
    """A copy of the first ``size`` bytes of a segment (states are small; their bytes are decoded, not viewed)."""
    return bytes(map_fd(fd, size, what=what)[:size]) if size else b""


def write_bytes(fd: int, payload: bytes, what: str = "the state") -> None:
    """Write ``payload`` at the start of a writable segment, growing it as needed."""
    if payload:
        allocate(fd, len(payload), what)
        map_fd(fd, len(payload), writable=True, what=what)[: len(payload)] = payload
