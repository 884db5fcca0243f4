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

import ctypes
import errno
import fcntl
import functools
import mmap
import os
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa

from modelpex_runtime.protocol import FRAME_LIBRARIES, PROTOCOL_VERSION, FrameRef, ShmSpaceError, TransportError

__all__ = [
    "SHM_DIR",
    "allocate",
    "check_space",
    "frame_ref",
    "fits_in_pipe",
    "from_arrow",
    "ipc_size",
    "map_fd",
    "prepare_frame",
    "read_bytes",
    "read_frame",
    "read_table",
    "to_arrow",
    "validate_full",
    "write_bytes",
    "write_frame",
    "write_table",
]

SHM_DIR = "/dev/shm"
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
# N.B. Below this, a buffer is copied into the pipe with write(): a vmsplice of a few bytes costs more than a copy.
_SPLICE_MIN = 1 << 16
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
    except BaseException as exc:  # noqa: BLE001 - whatever the library raises, the column it refused is what helps
        if not isinstance(exc, Exception) and not _is_panic(exc):
            raise  # N.B. KeyboardInterrupt and the like; a Rust panic in polars (a BaseException) is the data's.
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
        except BaseException as exc:  # noqa: BLE001 - see from_arrow
            if not isinstance(exc, Exception) and not _is_panic(exc):
                raise
            return _cannot_hold(what, library, field, _first_line(exc))
    return None


def _is_panic(exc: BaseException) -> bool:
    """A Rust panic that pyo3 raised (polars), which derives from BaseException."""
    return type(exc).__name__ == "PanicException"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


# N.B. Given explicitly: without them pyarrow reads two environment variables and builds the default options on
# every stream it opens, a tenth of a small frame's round trip (four streams per round trip).
_WRITE_OPTIONS = pa.ipc.IpcWriteOptions()
_READ_OPTIONS = pa.ipc.IpcReadOptions()


def _stream(sink: Any, table: pa.Table) -> None:
    with pa.ipc.new_stream(sink, table.schema, options=_WRITE_OPTIONS) as writer:
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


def read_table(buffer: pa.Buffer, ref: FrameRef, what: str = "the frame", *, full: bool = False) -> pa.Table:
    """Decode a segment's payload; anything but a well-formed stream of the announced rows is a TransportError.

    ``full`` checks every value that memory safety depends on (`validate_full`): what a model sent is read with it,
    before anything else looks at the table. A model reads what the orchestrator wrote, which needs only the shallow
    check.
    """
    try:
        with pa.ipc.open_stream(buffer, options=_READ_OPTIONS) as reader:
            table = reader.read_all()
        validate_full(table) if full else table.validate()
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise TransportError(f"{what} is not a valid Arrow IPC stream: {_first_line(exc)}") from None
    if table.num_rows != ref["num_rows"]:
        raise TransportError(f"{what} holds {table.num_rows} rows but {ref['num_rows']} were announced")
    return table


# N.B. Variable-length types whose full validation Arrow does value by value (UTF-8 one string at a time): checked
# here in bulk instead, with the same result. Offsets dtype, and whether the bytes must be UTF-8.
_BULK = {
    pa.string().id: ("<i4", True),
    pa.large_string().id: ("<i8", True),
    pa.binary().id: ("<i4", False),
    pa.large_binary().id: ("<i8", False),
}


_VIEWS = {pa.string_view().id: True, pa.binary_view().id: False}
_BULK_ROWS = 4096  # N.B. Below this many values Arrow's own full validation is quicker than numpy's set-up.


def validate_full(table: pa.Table) -> None:
    """What ``table.validate(full=True)`` checks, in bulk where Arrow goes value by value; ArrowInvalid if broken.

    Shallow validation first (every buffer is as long as the lengths say), then per array: offsets that start at or
    after 0, never go backwards and end within the data; strings whose bytes are all ASCII (else Arrow checks
    their UTF-8 itself); null counts that match the validity bitmap. Every other type is Arrow's own full
    validation, which for fixed-width columns costs nothing per value.
    """
    table.validate()
    _validate_names(table.schema)
    for column in table.columns:
        for chunk in column.chunks:
            bulk = _BULK.get(chunk.type.id)
            if bulk is not None and len(chunk) >= _BULK_ROWS:
                _validate_offsets(chunk, *bulk)
            elif chunk.type.id in _VIEWS and len(chunk) >= _BULK_ROWS:
                _validate_views(chunk, utf8=_VIEWS[chunk.type.id])
            else:
                chunk.validate(full=True)


def _validate_names(schema: pa.Schema) -> None:
    """Field names and metadata are UTF-8 (polars panics on anything else, Arrow does not check them)."""
    fields = list(schema)
    metadata = [schema.metadata]
    while fields:
        field = fields.pop()
        metadata.append(field.metadata)
        try:
            _ = field.name  # N.B. pyarrow decodes it strictly.
        except UnicodeDecodeError:
            raise pa.ArrowInvalid("a field name is not UTF-8") from None
        kind = field.type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        fields += [kind.field(i) for i in range(kind.num_fields)]
    for pairs in filter(None, metadata):
        try:
            for key, value in pairs.items():
                key.decode(), value.decode()
        except UnicodeDecodeError:
            raise pa.ArrowInvalid("schema metadata is not UTF-8") from None


def _check_null_count(array: pa.Array, validity: pa.Buffer | None) -> None:
    if validity is not None and array.null_count != len(array) - _set_bits(validity, array.offset, len(array)):
        raise pa.ArrowInvalid(f"{array.type} column declares {array.null_count} nulls but its bitmap says otherwise")


def _validate_views(array: pa.Array, utf8: bool) -> None:
    """Views (polars' strings): when every value is inline (12 bytes or fewer, as short strings are), the views
    alone hold the values, and one pass over them checks lengths and ASCII; anything else is Arrow's own check."""
    import numpy as np

    validity, views = array.buffers()[:2]
    _check_null_count(array, validity)
    raw = np.frombuffer(views, np.uint8, count=16 * len(array), offset=16 * array.offset)
    longest = int(raw.view("<u4")[::4].max())  # N.B. Unsigned: a negative length is huge. One reduction, not two.
    if longest > 12 or (utf8 and int(raw.max()) >= 0x80):
        array.validate(full=True)  # N.B. Values in data buffers, or not all ASCII: Arrow checks every view.


def _validate_offsets(array: pa.Array, dtype: str, utf8: bool) -> None:
    import numpy as np

    validity, offsets, data = array.buffers()
    _check_null_count(array, validity)
    width = np.dtype(dtype).itemsize
    ends = np.frombuffer(offsets, dtype=dtype, count=len(array) + 1, offset=array.offset * width)
    first, last = int(ends[0]), int(ends[-1])
    size = 0 if data is None else data.size
    if first < 0 or last > size or first > last:
        raise pa.ArrowInvalid(f"{array.type} offsets run from {first} to {last}, outside its {size} data bytes")
    if len(array) > 1 and bool((ends[1:] < ends[:-1]).any()):
        raise pa.ArrowInvalid(f"{array.type} offsets go backwards")
    if utf8 and last > first and int(np.frombuffer(data, np.uint8, last - first, first).max()) >= 0x80:
        array.validate(full=True)  # N.B. Not all ASCII: Arrow checks the UTF-8 of every value itself.


def _set_bits(bitmap: pa.Buffer, offset: int, length: int) -> int:
    bits = pa.Array.from_buffers(pa.bool_(), length, [None, bitmap], offset=offset)
    return int(bits.true_count)


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


def prepare_frame(frame: Any, slot: int, what: str = "the frame") -> tuple[FrameRef, Callable[[int], None]]:
    """A frame's reference (its exact size) and the function that streams it into its output pipe.

    N.B. Two steps because a frame bigger than its pipe is written after the answer: the orchestrator reads an output
    pipe once it knows the output's size, and such a frame can only be written while it reads (`fits_in_pipe`).
    """
    table = to_arrow(frame, what)
    size = ipc_size(table)

    def send(fd: int) -> None:
        with _PipeSink(fd, size) as sink:
            _stream(sink, table)
        if sink.written != size:
            raise TransportError(f"wrote {sink.written} bytes of {what} where {size} were measured")

    return frame_ref(slot, size, table), send


def fits_in_pipe(fd: int, size: int) -> bool:
    """Whether ``size`` bytes go into the empty pipe ``fd`` without waiting for a reader (a file takes any size).

    N.B. Such an output is written before the call is answered: the orchestrator then finds it in the pipe, and
    the round trip saves a wake-up of each side (a third of a small frame's round trip, measured). One page is left
    spare so that the write can never wait on a reader that waits for the answer.
    """
    try:
        capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except OSError:
        return True
    return size + mmap.PAGESIZE <= capacity


def write_frame(frame: Any, fd: int, slot: int, what: str = "the frame") -> FrameRef:
    """Write a frame into its output pipe at once (a reader must be reading it, beyond the pipe's capacity)."""
    ref, send = prepare_frame(frame, slot, what)
    send(fd)
    return ref


def read_bytes(fd: int, size: int, what: str = "the state") -> bytes:
    """A copy of the first ``size`` bytes of a segment (states are small; their bytes are decoded, not viewed)."""
    return bytes(map_fd(fd, size, what=what)[:size]) if size else b""


def write_bytes(fd: int, payload: bytes, what: str = "the state") -> None:
    """Write ``payload`` into its output pipe."""
    with _PipeSink(fd, len(payload)) as sink:
        sink.write(payload)


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


@functools.cache
def _vmsplice() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    function = libc.vmsplice
    function.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_size_t, ctypes.c_uint]
    function.restype = ctypes.c_ssize_t
    return function


class _PipeSink:
    """A file for Arrow's IPC writer that moves a stream of known ``size`` into a pipe, copying as little as it can.

    Big buffers (the column data) are handed to the pipe with ``vmsplice``: the pipe refers to our pages and the
    reader's ``read`` is the only copy. The small pieces (headers, padding) are copied with ``write``, and so are the
    stream's last bytes, as many as the pipe holds: once that ``write`` returns, the reader has taken every page we
    handed over, so nothing of ours is still referred to when the caller frees or reuses its frames.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.written = fd, 0
        try:
            capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
        except OSError:
            capacity = size  # N.B. Not a pipe (a file, in tests): plain writes.
        self.copy_from = max(0, size - capacity)
        self._small = bytearray()
        # N.B. Every buffer handed over, kept until the end: the IPC writer also passes buffers it made for the call
        # (zero-based offsets of a slice), which would otherwise be freed, and their memory reused, unread.
        self._held: list[pa.Buffer] = []

    def __enter__(self) -> _PipeSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self._flush()
        self._held.clear()

    def write(self, data: Any) -> int:
        buffer = pa.py_buffer(data)
        size, start = buffer.size, self.written
        spliced = min(size, max(0, self.copy_from - start)) if size >= _SPLICE_MIN else 0
        if spliced:
            self._flush()
            self._held.append(buffer)
            self._splice(buffer.address, spliced)
        if spliced < size:
            self._small += memoryview(buffer)[spliced:]
            if len(self._small) >= _SPLICE_MIN:
                self._flush()
        self.written = start + size
        return size

    def _flush(self) -> None:
        view, self._small = memoryview(self._small), bytearray()
        while view:
            view = view[os.write(self.fd, view) :]

    def _splice(self, address: int, size: int) -> None:
        vmsplice = _vmsplice()
        while size:
            chunk = _IOVec(address, size)
            done = vmsplice(self.fd, ctypes.byref(chunk), 1, 0)
            if done < 0:
                number = ctypes.get_errno()
                if number == errno.EINTR:
                    continue
                if number in (errno.EINVAL, errno.ENOSYS, errno.EBADF):  # N.B. Not a pipe: copy instead.
                    self._small += (ctypes.c_char * size).from_address(address).raw
                    return self._flush()
                raise OSError(number, os.strerror(number))
            address, size = address + done, size - done
        return None

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self.written

    def close(self) -> None:
        self._flush()

    @property
    def closed(self) -> bool:
        return False
