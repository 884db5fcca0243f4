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
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from modelpex_runtime.containment import output_limit
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
_INT64_IDS = (pa.int64().id, pa.uint64().id)
_SHM_FIX = (
    "raise it: Docker `--shm-size=2g` (compose: `shm_size`), Kubernetes an emptyDir with `medium: Memory` and a "
    "`sizeLimit` mounted at /dev/shm"
)


def check_space(needed: int, what: str, fd: int | None = None) -> None:
    """Fail before writing when the file system of segment ``fd`` (or /dev/shm) cannot hold ``needed`` more bytes.

    N.B. Measured on the segment's own file system: a sandboxed model process sees a private /dev/shm, not the one
    its segments live on. A memfd's file system reports no size at all (f_blocks 0): there is no limit to check.
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
    limit = output_limit()
    if limit and size > limit:
        raise ShmSpaceError(
            f"{what} needs {size / 2**20:.1f} MiB of shared memory, over its output limit of {limit / 2**20:.1f} "
            "MiB: raise output in [tool.modelpex.limits] of the model's pyproject.toml, or in the client's limits "
            "in deployments.yaml"
        )
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
    return _name_arrow_dtypes(pa.Table.from_pandas(frame, nthreads=1 if len(frame) < _THREADED_ROWS else None), frame)


def _name_arrow_dtypes(table: pa.Table, frame: Any) -> pa.Table:
    """Record every ``ArrowDtype`` column as one in the pandas metadata, which `_to_pandas` reads to give it back.

    N.B. pyarrow records some of them as plain objects (decimals): they would come back as Python objects.
    """
    import json

    import pandas as pd

    arrow = [(i, str(dtype)) for i, dtype in enumerate(frame.dtypes) if isinstance(dtype, pd.ArrowDtype)]
    if not arrow:
        return table
    metadata = dict(table.schema.metadata)
    pandas = json.loads(metadata[b"pandas"])
    for position, dtype in arrow:  # N.B. The metadata lists the data columns first, in the frame's order.
        pandas["columns"][position]["numpy_type"] = dtype
    metadata[b"pandas"] = json.dumps(pandas).encode()
    return table.replace_schema_metadata(metadata)


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


def from_arrow(table: pa.Table, library: str, what: str = "the frame") -> Any:
    """The table in the library a model asked for: zero-copy to polars, and for numeric columns to pandas.

    A column the library cannot hold exactly is a TransportError that names it, never a silent change of values.
    """
    if library == "pyarrow":
        return table
    if library not in FRAME_LIBRARIES:
        raise TransportError(f"unknown frame library {library!r}: use one of {', '.join(FRAME_LIBRARIES)}")
    convert = _to_polars if library == "polars" else _to_pandas
    for field in table.schema:
        if library == "polars" and _has_decimal256(field.type):  # N.B. polars panics on these, killing the process.
            raise _cannot_hold(what, library, field, "polars' decimals have at most 38 digits")
    try:
        frame = convert(table)
    except Exception as exc:  # noqa: BLE001 - whatever the library raises, the column it refused is what helps
        raise _refused_column(table, library, what, convert) or TransportError(
            f'{what}: {library} cannot hold this table ({_first_line(exc)}): declare frames = "pyarrow"'
        ) from None
    if library == "pandas":
        _check_exact_integers(table, frame, what)
    return frame


def _to_polars(table: pa.Table) -> Any:
    import polars as pl

    return pl.from_arrow(table, rechunk=False)


def _to_pandas(table: pa.Table) -> Any:
    """pandas' conversion, except that columns sent as pandas ``ArrowDtype`` come back as exactly that.

    N.B. pyarrow rebuilds an ``ArrowDtype`` from the pandas metadata by parsing its name, which fails for nested and
    dictionary types ("list<item: int64>[pyarrow]"), reads "string[pyarrow]" as pandas' own string dtype, and drops
    decimals to objects: such columns are converted as placeholders, then replaced by the Arrow data itself.
    """
    wrapped = _arrow_dtype_columns(table.schema)
    converted = table
    for index in wrapped:
        converted = converted.set_column(index, table.field(index).with_type(pa.null()), pa.nulls(table.num_rows))
    if wrapped:
        converted = converted.replace_schema_metadata(_as_objects(table.schema, wrapped))
    frame = converted.to_pandas(split_blocks=True, use_threads=table.num_rows >= _THREADED_ROWS)
    if wrapped:
        import pandas as pd

        for index, position in wrapped.items():
            frame.isetitem(position, pd.arrays.ArrowExtensionArray(table.column(index)))
    return frame


def _frame_positions(schema: pa.Schema, metadata: dict[str, Any] | None) -> dict[int, int]:
    """Field index -> position among the pandas frame's columns (the fields that hold its index are not columns)."""
    index = {name for name in (metadata or {}).get("index_columns", []) if isinstance(name, str)}
    data = [i for i, name in enumerate(schema.names) if name not in index]
    return {field: position for position, field in enumerate(data)}


def _arrow_dtype_columns(schema: pa.Schema) -> dict[int, int]:
    """Field index -> frame position of the columns that pandas held as ``ArrowDtype`` when they were sent."""
    metadata = schema.pandas_metadata
    if not metadata:
        return {}
    arrow_dtype = {
        column.get("field_name", column.get("name"))
        for column in metadata.get("columns", [])
        if str(column.get("numpy_type", "")).endswith("[pyarrow]")
    }
    positions = _frame_positions(schema, metadata)
    return {i: position for i, position in positions.items() if schema.names[i] in arrow_dtype}


def _as_objects(schema: pa.Schema, positions: Iterable[int]) -> dict[bytes, bytes]:
    """The schema's metadata with the columns at ``positions`` described as plain object columns."""
    import json

    names = {schema.field(i).name for i in positions}
    metadata = dict(schema.metadata)
    pandas = json.loads(metadata[b"pandas"])
    for column in pandas["columns"]:
        if column.get("field_name", column.get("name")) in names:
            column.update(pandas_type="object", numpy_type="object", metadata=None)
    metadata[b"pandas"] = json.dumps(pandas).encode()
    return metadata


def _check_exact_integers(table: pa.Table, frame: Any, what: str) -> None:
    """pandas gives 64-bit integer columns with nulls as float64, which rounds values beyond 2**53: refuse those."""
    nullable = [i for i, column in enumerate(table.columns) if column.type.id in _INT64_IDS and column.null_count]
    if not nullable:
        return
    import numpy as np
    import pyarrow.compute as pc

    positions = _frame_positions(table.schema, table.schema.pandas_metadata)
    for index in nullable:
        low, high = (bound.as_py() for bound in pc.min_max(table.column(index)).values())
        if low is not None and max(-low, high) > 2**53 and frame.dtypes.iloc[positions[index]] == np.float64:
            raise _cannot_hold(
                what, "pandas", table.field(index), "with nulls it becomes float64, which rounds beyond 2**53"
            )


def _has_decimal256(arrow_type: pa.DataType) -> bool:
    if pa.types.is_decimal256(arrow_type):
        return True
    if pa.types.is_dictionary(arrow_type):
        return _has_decimal256(arrow_type.value_type)
    return any(_has_decimal256(arrow_type.field(i).type) for i in range(arrow_type.num_fields))


def _cannot_hold(what: str, library: str, field: pa.Field, why: str) -> TransportError:
    return TransportError(
        f"{what}: {library} cannot hold column {field.name!r} ({field.type}): {why}; cast the column to a type "
        f'{library} holds, or declare frames = "pyarrow"'
    )


def _refused_column(table: pa.Table, library: str, what: str, convert: Any) -> TransportError | None:
    """The first column the library refuses on its own, as an error naming it."""
    for index, field in enumerate(table.schema):
        try:
            convert(pa.table([table.column(index)], schema=pa.schema([field])))
        except Exception as exc:  # noqa: BLE001 - see from_arrow
            return _cannot_hold(what, library, field, _first_line(exc))
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


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
    return from_arrow(read_table(pa.py_buffer(mapping).slice(0, ref["size"]), ref, what), library, what)


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
