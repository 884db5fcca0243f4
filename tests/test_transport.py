"""Shared-memory transport: round trips for every column kind, zero-copy reads on the model side, copies on ours,
descriptors only (no names), and no shared memory left behind on any path (success, the model raising, killed
mid-write, the orchestrator raising or dying)."""

from __future__ import annotations

import decimal
import fcntl
import gc
import json
import math
import mmap
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import polars.testing
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelpex_runtime.protocol import ShmSpaceError, TransportError
from modelpex_runtime.transport import (
    check_space,
    prepare_frame,
    read_frame,
    to_arrow,
    write_frame,
)

from orchestrator.transport import SEALS, FrameExchange, SegmentPool, idle_budget

from .conftest import assert_pool_holds_only_idle, cache_env, shm_held

REPO = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")
MiB = 1 << 20
needs_mounts = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="a private tmpfs needs root and unshare (CI has both)"
)


def answer(send: object, fd: int) -> threading.Thread:
    """The model side's writing of an output, while the orchestrator side reads it (as after a model's answer)."""
    writer = threading.Thread(target=send, args=(os.dup(fd),), daemon=True)
    writer.start()
    return writer


def round_trip(frame: object, library: str, pool: SegmentPool) -> tuple[object, object]:
    """Orchestrator -> model side -> orchestrator, the model reading and writing ``library``: what the model saw,
    and what came back."""
    with FrameExchange(pool) as exchange:
        ref = exchange.put("frame", frame)
        out = exchange.reserve("frame")
        seen = read_frame(ref, exchange.fds[ref["slot"]], library)
        back, send = prepare_frame(seen, out)
        writer = answer(lambda fd: (send(fd), os.close(fd)), exchange.fds[out])
        got = exchange.get("frame", back, library, "frame")
        writer.join(60)
        return seen, got


@pytest.fixture
def pool():
    """A pool of the test's own: between calls it holds only idle segments, and closed, nothing."""
    before = shm_held()
    pool = SegmentPool()
    yield pool
    assert_pool_holds_only_idle(pool, before)
    pool.close()
    assert shm_held() <= before + (1 << 20), "the pool's segments are freed when it closes"


# --- every column kind users send, for each library ---------------------------------------------------------


def _integers(arrow_type: pa.DataType) -> st.SearchStrategy[int]:
    bits = arrow_type.bit_width
    if pa.types.is_signed_integer(arrow_type):
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return st.integers(0, 2**bits - 1)


def _ticks(unit: str) -> st.SearchStrategy[int]:
    """Counts of ``unit`` within about 146 years of 1970, which every library holds at every unit."""
    limit = 2**62 // {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}[unit]
    return st.integers(-limit, limit)


SPECIAL_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0])  # N.B. Else NaN is rare.
UNITS = ("s", "ms", "us", "ns")
ZONES = (None, "UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata")
INTEGERS = (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64())
COLUMNS: dict[str, tuple[pa.DataType | None, st.SearchStrategy]] = {
    **{str(t): (t, _integers(t)) for t in INTEGERS},
    "float32": (pa.float32(), SPECIAL_FLOATS | st.floats(width=32)),
    "float64": (pa.float64(), SPECIAL_FLOATS | st.floats()),
    "bool": (pa.bool_(), st.booleans()),
    "date32": (pa.date32(), st.dates()),
    **{f"timestamp_{unit}": (None, _ticks(unit)) for unit in UNITS},  # N.B. Naive or zoned, drawn per table.
    **{f"duration_{unit}": (pa.duration(unit), _ticks(unit)) for unit in UNITS},
    "decimal128": (pa.decimal128(12, 3), st.decimals(-(10**9) + 1, 10**9 - 1, places=3)),
    "decimal256": (pa.decimal256(40, 5), st.decimals(-(10**35) + 1, 10**35 - 1, places=5)),
    "string": (pa.string(), st.text(max_size=8)),
    "large_string": (pa.large_string(), st.text(max_size=8)),
    "string_view": (pa.string_view(), st.text(max_size=8)),
    "binary": (pa.binary(), st.binary(max_size=8)),
    "dictionary": (pa.dictionary(pa.int32(), pa.string()), st.sampled_from(["low", "medium", "high"])),
    "list": (pa.list_(pa.int64()), st.lists(st.one_of(st.none(), st.integers(-1000, 1000)), max_size=4)),
    "struct": (
        pa.struct([("a", pa.int64()), ("b", pa.string())]),
        st.fixed_dictionaries({"a": st.none() | st.integers(-1000, 1000), "b": st.none() | st.text(max_size=4)}),
    ),
}
POLARS_CANNOT_HOLD = {"decimal256"}  # N.B. Its refusal is tested on its own, below.


@st.composite
def tables(draw: st.DrawFn, kinds: list[str]) -> pa.Table:
    """A table of some of ``kinds``, each column with nulls or without, in one record batch or two."""
    rows = draw(st.integers(0, 30))
    arrays = {}
    for name in draw(st.lists(st.sampled_from(kinds), unique=True, max_size=10)):
        arrow_type, values = COLUMNS[name]
        if arrow_type is None:
            arrow_type = pa.timestamp(name.removeprefix("timestamp_"), draw(st.sampled_from(ZONES)))
        column = draw(st.lists(st.none() | values if draw(st.booleans()) else values, min_size=rows, max_size=rows))
        arrays[name] = pa.array(column, arrow_type)
    table = pa.table(arrays) if arrays else pa.table({})
    if rows > 1 and arrays and draw(st.booleans()):
        table = pa.concat_tables([table.slice(0, rows // 2), table.slice(rows // 2)])
    return table


# N.B. pandas' masked dtypes: how pandas users hold integers (and others) with nulls.
NULLABLE = {
    **{t: pd.api.types.pandas_dtype(str(t).replace("int", "Int").replace("uInt", "UInt")) for t in INTEGERS},
    pa.float32(): pd.Float32Dtype(),
    pa.float64(): pd.Float64Dtype(),
    pa.bool_(): pd.BooleanDtype(),
    pa.string(): pd.StringDtype(),
    pa.large_string(): pd.StringDtype(),
}
PANDAS_STYLES = {"numpy": None, "nullable": NULLABLE.get, "arrow": pd.ArrowDtype}


def sent_frame(table: pa.Table, library: str, style: str = "numpy") -> object:
    """The frame a user of ``library`` sends, built by that library (never by the transport under test)."""
    if library == "pyarrow":
        return table
    if library == "polars":
        return pl.from_arrow(table)
    return table.to_pandas(types_mapper=PANDAS_STYLES[style])


def assert_same(got: object, sent: object, library: str) -> None:
    """Equal to the frame that was sent, types included; NaN equals NaN (and stays apart from null)."""
    if library == "pandas":
        # N.B. pandas cannot compare some ArrowDtype columns (string_view): those are compared as the Arrow data.
        arrow = [name for name, dtype in sent.dtypes.items() if isinstance(dtype, pd.ArrowDtype)]
        assert list(got.dtypes.items()) == list(sent.dtypes.items())
        pd.testing.assert_frame_equal(got.drop(columns=arrow), sent.drop(columns=arrow))
        for name in arrow:
            assert_arrays_equal(_arrow_data(got[name]), _arrow_data(sent[name]), name)
    elif library == "polars":
        pl.testing.assert_frame_equal(got, sent)
    else:
        assert got.schema.equals(sent.schema, check_metadata=False), (got.schema, sent.schema)
        for name in sent.column_names:
            assert_arrays_equal(got[name], sent[name], name)


def _arrow_data(series: pd.Series) -> pa.ChunkedArray:
    data = pa.array(series.array)  # N.B. An Array, or a ChunkedArray when the column has no chunk at all.
    return data if isinstance(data, pa.ChunkedArray) else pa.chunked_array([data])


def assert_arrays_equal(got: pa.ChunkedArray, sent: pa.ChunkedArray, name: str) -> None:
    if pa.types.is_floating(sent.type):
        assert pc.is_nan(got).equals(pc.is_nan(sent)), name
        got, sent = (pc.if_else(pc.is_nan(x), 0, x) for x in (got, sent))
    assert got.equals(sent), name


@pytest.mark.parametrize("library", ["pyarrow", "polars", "pandas"])
def test_round_trip_gives_back_the_frame_that_was_sent(library: str, pool: SegmentPool) -> None:
    """Issue 9: what the model sees and what comes back equal the sent frame, compared in its own library."""
    kinds = [kind for kind in COLUMNS if library != "polars" or kind not in POLARS_CANNOT_HOLD]

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(table=tables(kinds), style=st.sampled_from(sorted(PANDAS_STYLES)))
    def check(table: pa.Table, style: str) -> None:
        sent = sent_frame(table, library, style)
        seen, back = round_trip(sent, library, pool)
        assert_same(seen, sent, library)
        assert_same(back, sent, library)

    check()


@pytest.mark.parametrize(
    ("library", "column", "problem"),
    [
        ("polars", pa.array([decimal.Decimal("1.5")], pa.decimal256(40, 5)), "polars' decimals have at most 38 digits"),
        ("polars", pa.array([0], pa.timestamp("us", "+05:30")), "unable to parse time zone: '\\+05:30'"),
        (
            "pandas",
            pa.array([2**53 + 1, None], pa.int64()),
            "with nulls it becomes float64, which rounds beyond 2\\*\\*53",
        ),
        ("pandas", pa.array([None, 2**64 - 1], pa.uint64()), "with nulls it becomes float64"),
    ],
)
def test_a_column_the_library_cannot_hold_is_named(
    library: str, column: pa.Array, problem: str, pool: SegmentPool
) -> None:
    """Issue 9: one line naming the frame, the column and its type, the problem, and the fix; never changed values."""
    table = pa.table({"fine": pa.array([1] * len(column)), "odd": column})
    expected = (
        f"^input 'frame' of m: {library} cannot hold column 'odd' \\({re.escape(str(column.type))}\\): {problem}.*; "
        f'cast the column to a type {library} holds, or declare frames = "pyarrow"$'
    )
    with FrameExchange(pool) as exchange:
        ref = exchange.put("frame", table)
        with pytest.raises(TransportError, match=expected):
            read_frame(ref, exchange.fds[ref["slot"]], library, "input 'frame' of m")


def test_integers_with_nulls_reach_pandas_as_float64_where_it_is_exact(pool: SegmentPool) -> None:
    """pandas' own way with integer nulls (NaN in float64) is kept wherever float64 holds every value."""
    table = pa.table({"small": pa.array([2**53, None]), "none": pa.nulls(2, pa.int64()), "full": pa.array([2**62, 1])})
    with FrameExchange(pool) as exchange:
        ref = exchange.put("frame", table)
        frame = read_frame(ref, exchange.fds[ref["slot"]], "pandas")
    assert [str(dtype) for dtype in frame.dtypes] == ["float64", "float64", "int64"]
    assert frame["small"][0] == 2**53 and frame["full"][0] == 2**62


@pytest.mark.parametrize("library", ["pyarrow", "polars", "pandas"])
def test_empty_zero_column_and_multi_batch_frames(library: str, pool: SegmentPool) -> None:
    sizes = [70_000, 70_000, 70_000, 70_000, 20_000]
    batches = pa.Table.from_batches(
        [pa.record_batch({"a": np.arange(n), "c": pa.array(["c"] * n)}) for n in sizes]
    )  # N.B. Five record batches, by construction.
    cases = [pa.table({"a": pa.array([], pa.int64())}), pa.table({}), batches]
    for table in cases:
        sent = sent_frame(table, library)
        for got in round_trip(sent, library, pool):
            assert_same(got, sent, library)
    if library == "pyarrow":
        seen, _ = round_trip(batches, library, pool)
        assert [b.num_rows for b in seen.to_batches()] == sizes, "the model reads the batches sent, none combined"


def test_seed_frame_at_a_million_rows(pool: SegmentPool) -> None:
    n = 1_000_000
    table = pa.table({"a": np.arange(n), "b": np.arange(n), "c": pa.array(["c"] * n)})
    for library in ("pandas", "polars", "pyarrow"):
        sent = sent_frame(table, library)
        for got in round_trip(sent, library, pool):
            assert_same(got, sent, library)


# --- zero copy on the model side, copies on ours ---------------------------------------------------------------


@pytest.mark.parametrize("library", ["pyarrow", "polars", "pandas"])
def test_model_side_reads_are_views_of_the_segment(library: str, pool: SegmentPool) -> None:
    """Overwrite the segment after the model read it: a zero-copy frame sees the new bytes, a copy would not."""
    table = pa.table({"a": np.full(1000, 7, dtype="int64")})
    with FrameExchange(pool) as exchange:
        ref = exchange.put("frame", table)
        frame = read_frame(ref, exchange.fds[ref["slot"]], library)
        mapping = exchange._segments[ref["slot"]].mapping(ref["size"])
        start = bytes(mapping[: ref["size"]]).find(np.full(1000, 7, dtype="<i8").tobytes())
        mapping[start : start + 8000] = np.full(1000, 9, dtype="<i8").tobytes()
        column = frame["a"].to_pylist() if library == "pyarrow" else list(frame["a"])
        assert set(column) == {9}
        del frame


def test_an_output_cannot_be_changed_once_it_is_read(pool: SegmentPool) -> None:
    """A model process lives on after it answers: what it writes later, through a descriptor it kept, must not reach
    us. Control: the kept descriptor still takes writes."""
    with FrameExchange(pool) as exchange:
        out = exchange.reserve("frame")
        kept = os.dup(exchange.fds[out])
        try:
            ref = write_frame(pa.table({"a": np.full(1000, 7, dtype="int64")}), kept, out)
            table = exchange.get("frame", ref, "pyarrow", "frame")
            assert os.write(kept, b"\xff" * ref["size"]) == ref["size"], "control: the model still writes its pipe"
            assert set(table["a"].to_pylist()) == {7}
            table.validate(full=True)
        finally:
            os.close(kept)


class _Echo:
    """Just enough of `modelpex_runtime.entry.Model` for `execute`: predict returns the frames it was built with."""

    entry = {"frames": "pyarrow"}
    label = "echo 1.0"

    def __init__(self, outputs: dict[str, pa.Table]) -> None:
        self.outputs = outputs

    def predict(self, inputs: object, state: object, params: object) -> dict[str, pa.Table]:
        return self.outputs

    def decode(self, fmt: str, payload: bytes) -> None:
        return None


def test_an_output_that_fits_its_pipe_is_there_before_the_answer_and_a_bigger_one_after() -> None:
    """A small output waits in its pipe when the model answers: the orchestrator reads it without waiting for the
    model to be scheduled again (a wake-up of each side saved per call). A bigger one cannot be written before
    anyone reads it, so it still follows the answer."""
    import logging
    import termios

    from modelpex_runtime.entry import execute
    from modelpex_runtime.protocol import PROTOCOL_VERSION

    small, big = pa.table({"a": np.arange(1000)}), pa.table({"a": np.arange(1 << 20)})
    pipes = [os.pipe() for _ in range(2)]
    state = os.open(os.devnull, os.O_RDONLY)
    try:
        for _, write in pipes:
            fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, MiB)
        fds = [state, pipes[0][1], pipes[1][1]]
        call = {"protocol": PROTOCOL_VERSION, "action": "predict", "inputs": {}, "outputs": {"small": 1, "big": 2},
                "params": {}, "state_in": {"slot": 0, "format": "json", "size": 0}, "state_out": None}  # fmt: skip
        outgoing: list = []
        result = execute(_Echo({"small": small, "big": big}), call, fds, logging.getLogger("test"), outgoing)
        waiting = [int.from_bytes(fcntl.ioctl(read, termios.FIONREAD, b"\0" * 4), "little") for read, _ in pipes]
        assert waiting == [result["outputs"]["small"]["size"], 0], "the small output is in its pipe, the big not yet"
        assert len(outgoing) == 1 and result["outputs"]["big"]["size"] > MiB, "the big one follows the answer"
    finally:
        for fd in (state, *(end for pipe in pipes for end in pipe)):
            os.close(fd)


# --- descriptors, not names; modes and bad payloads ----------------------------------------------------------


def test_segments_have_no_name_and_inputs_are_read_only(pool: SegmentPool) -> None:
    before = set(os.listdir(SHM))
    with FrameExchange(pool) as exchange:
        ref = exchange.put("a", pa.table({"x": [1]}))
        out = exchange.reserve("b")
        assert set(os.listdir(SHM)) == before, "no segment can be opened by name"
        read_only, output = exchange.fds[ref["slot"]], exchange.fds[out]
        assert fcntl.fcntl(read_only, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert fcntl.fcntl(read_only, fcntl.F_GET_SEALS) == SEALS, "sealed against writes, shrinking and growing"
        with pytest.raises(OSError):
            os.write(read_only, b"x")
        with pytest.raises(PermissionError):
            mmap.mmap(read_only, ref["size"], prot=mmap.PROT_READ | mmap.PROT_WRITE)
        again = os.open(f"/proc/self/fd/{read_only}", os.O_RDWR)  # N.B. Same user: the mode allows it, seals do not.
        try:
            with pytest.raises(PermissionError):
                os.pwrite(again, b"x", 0)
            with pytest.raises(PermissionError):
                mmap.mmap(again, ref["size"], prot=mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(PermissionError):
                os.ftruncate(again, 0)
        finally:
            os.close(again)
        assert os.fstat(read_only).st_mode & 0o777 == 0o600
        assert stat.S_ISFIFO(os.fstat(output).st_mode), "an output is a pipe of its own"


def test_garbage_and_truncated_payloads_are_refused(pool: SegmentPool) -> None:
    with FrameExchange(pool) as exchange:
        ref = exchange.put("frame", pa.table({"a": np.arange(100)}))
        fd = exchange.fds[ref["slot"]]
        with pytest.raises(TransportError, match="announced: the payload is truncated"):
            read_frame({**ref, "size": ref["size"] + 10**6}, fd, "pyarrow")
        with pytest.raises(TransportError, match="holds 100 rows but 5 were announced"):
            read_frame({**ref, "num_rows": 5}, fd, "pyarrow")
        with pytest.raises(TransportError, match="is not a valid Arrow IPC stream"):
            read_frame({**ref, "size": ref["size"] // 2}, fd, "pyarrow")
        exchange._segments[ref["slot"]].mapping(64)[:64] = os.urandom(64)
        with pytest.raises(TransportError, match="is not a valid Arrow IPC stream"):
            read_frame(ref, fd, "pyarrow")
        with pytest.raises(TransportError, match="which this call did not reserve"):
            exchange.get("frame", ref, "pyarrow", "frame")
        out = exchange.reserve("frame")
        with pytest.raises(TransportError, match="ended its output after 0 of the 99999999 bytes it announced"):
            exchange.get("frame", {**ref, "slot": out, "size": 99999999}, "pyarrow", "frame")


def test_no_room_in_shm_says_how_much_and_how_to_raise_it() -> None:
    with pytest.raises(ShmSpaceError) as caught:
        check_space(10**15, "input frame 'customers'")
    message = str(caught.value)
    assert "input frame 'customers' needs 1000000000.0 MB" in message and "MB free" in message
    assert "--shm-size" in message and "medium: Memory" in message


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({"a": [1]}, "cannot write input frame 'frame', a builtins.dict: return a pandas or polars DataFrame"),
        (pd.DataFrame([[1, 2]], columns=["a", "a"]), "Duplicate column names found.*give every column a unique name"),
        (pd.DataFrame({"a": [1, "x"]}), "Arrow refused the pandas DataFrame.*values of one type"),
    ],
)
def test_frames_arrow_cannot_hold_are_named(frame: object, message: str, pool: SegmentPool) -> None:
    with FrameExchange(pool) as exchange:
        with pytest.raises(TransportError, match=message):
            exchange.put("frame", frame)


@pytest.mark.parametrize(
    ("frame", "plain"),
    [
        (pd.DataFrame({"a": [1, 2], "b": [0.5, None], "c": ["x", None], "d": [True, False]}), True),
        (pd.DataFrame({"a": [1, 2]}, index=pd.RangeIndex(2, name="id")), False),
        (pd.DataFrame({"a": [1, 2]}, index=pd.RangeIndex(5, 7)), False),
        (pd.DataFrame({0: [1, 2], 1: [3, 4]}), False),
        (pd.DataFrame({"a": pd.array([1, None], dtype="Int64")}), False),
    ],
)
def test_pandas_needs_its_metadata_only_where_arrow_types_fall_short(
    frame: pd.DataFrame, plain: bool, pool: SegmentPool
) -> None:
    """Plain frames skip from_pandas (the small-frame fast path); the others keep their index, names and dtypes."""
    for got in round_trip(frame, "pandas", pool):
        pd.testing.assert_frame_equal(got, frame)
    assert (to_arrow(frame).schema.metadata is None) is plain


# --- lifetimes with real processes ---------------------------------------------------------------------------

MODEL_SIDE = """
import json, os, sys, time
sys.path.insert(0, {src!r})
from modelpex_runtime.transport import read_frame, write_frame
call = json.loads(sys.argv[1])
frame = read_frame(call["ref"], 3, "pandas")
mode = call["mode"]
if mode == "raise":
    raise ValueError("model failed after reading its input")
if mode == "hang-mid-write":
    os.write(4, bytes(1000))  # part written: then it stops
    print("writing", flush=True)
    time.sleep(600)
print(json.dumps(write_frame(frame, 4, call["out"])), flush=True)
"""


def call_model(mode: str, pool: SegmentPool) -> None:
    """One call on one path, with the descriptors handed to a real process as fds 3 (input) and 4 (output)."""
    with FrameExchange(pool) as exchange:
        ref = exchange.put("frame", pa.table({"a": np.arange(1000)}))
        out = exchange.reserve("out")
        if mode == "orchestrator-raises":
            raise RuntimeError("the orchestrator failed between two steps")
        code = MODEL_SIDE.format(src=str(REPO / "base_env" / "src"))
        process = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps({"ref": ref, "out": out, "mode": mode})],
            pass_fds=(3, 4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: [os.dup2(exchange.fds[ref["slot"]], 3), os.dup2(exchange.fds[out], 4)],
        )
        if mode == "hang-mid-write":
            assert process.stdout.readline().strip() == b"writing"
            process.send_signal(signal.SIGKILL)  # N.B. Killed mid-write, as a timeout would.
        stdout, stderr = process.communicate(timeout=60)
        if mode == "ok":
            assert process.returncode == 0, stderr.decode()[-2000:]
            assert exchange.get("out", json.loads(stdout), "pandas", "out")["a"].sum() == 499500
            return
        if mode == "raise":
            assert b"ValueError: model failed after reading its input" in stderr
        announced = {**ref, "slot": out, "size": 50_000_000 if mode == "hang-mid-write" else mmap.PAGESIZE}
        left = 1000 if mode == "hang-mid-write" else 0
        with pytest.raises(TransportError, match=f"'out': the model ended its output after {left} of the"):
            exchange.get("out", announced, "pandas", "'out'")  # N.B. What a model that died or raised left there.


@pytest.mark.parametrize("mode", ["ok", "raise", "hang-mid-write", "orchestrator-raises"])
def test_every_path_frees_the_shared_memory(mode: str) -> None:
    """Each path of a call gives every segment back to the pool, and /dev/shm holds what it held once it closes."""
    before = shm_held()
    pool = SegmentPool()
    if mode == "orchestrator-raises":
        with pytest.raises(RuntimeError, match="the orchestrator failed between two steps"):
            call_model(mode, pool)
    else:
        call_model(mode, pool)
    assert_pool_holds_only_idle(pool, before)
    pool.close()
    assert shm_held() <= before + (1 << 20)


ORCHESTRATOR = """
import sys, time
sys.path[:0] = [{repo!r}, {src!r}]
import numpy as np, pyarrow as pa
from orchestrator.transport import FrameExchange, SegmentPool
exchange = FrameExchange(SegmentPool())
exchange.put("frame", pa.table({{"a": np.arange(8_000_000)}}))
print("ready", flush=True)
time.sleep(600)
"""

# N.B. Segments are memfds, on no file system one could measure: what is left is what any process still holds or maps.
KILLED_DRIVER = """
import os, subprocess, sys

def segments(pid):
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:modelpex"):
            info = os.stat(f"/proc/{pid}/fd/{fd}")
            found[(info.st_dev, info.st_ino)] = info.st_size
    return found

def still_referred(inodes):
    left = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                info = os.stat(f"/proc/{pid}/fd/{fd}")
                left |= {(info.st_dev, info.st_ino)} & inodes
            with open(f"/proc/{pid}/maps") as maps:
                mapped = {int(line.split()[4]) for line in maps if "memfd:modelpex" in line}
            left |= {key for key in inodes if key[1] in mapped}
        except OSError:
            continue
    return left

process = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
try:
    ready = process.stdout.readline().strip() == "ready"
    held = segments(process.pid)
finally:
    process.kill()
    process.wait()
print(ready, sum(held.values()), len(still_referred(set(held))))
"""


def test_a_killed_orchestrator_leaves_no_shared_memory() -> None:
    """kill -9: nothing to sweep, the kernel frees unnamed segments with their last descriptor and mapping."""
    code = ORCHESTRATOR.format(repo=str(REPO), src=str(REPO / "base_env" / "src"))
    done = subprocess.run(
        [sys.executable, "-c", KILLED_DRIVER, code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ready, held, left = done.stdout.split()
    assert ready == "True", done.stderr[-3000:]
    assert int(held) >= 60_000_000, "the 64 MB frame sat in a segment of the orchestrator's"
    assert int(left) == 0, f"{left} segments are still held or mapped after the orchestrator was killed"


def test_pool_reuses_segments_between_calls(pool: SegmentPool) -> None:
    table = pa.table({"a": np.arange(100_000)})
    with FrameExchange(pool) as exchange:
        exchange.put("frame", table)
        first = exchange._segments[0]
    with FrameExchange(pool) as exchange:
        exchange.put("frame", table)
        assert exchange._segments[0] is first


def _output(pool: SegmentPool, value: int) -> pa.Table:
    """One call's output of 100,000 times ``value``, through its pipe."""
    with FrameExchange(pool) as exchange:
        out = exchange.reserve("frame")
        ref, send = prepare_frame(pa.table({"a": np.full(100_000, value)}), out)
        writer = answer(lambda fd: (send(fd), os.close(fd)), exchange.fds[out])
        table = exchange.get("frame", ref, "pyarrow", "frame")
        writer.join(60)
    return table


def test_a_landing_buffer_is_read_into_again_only_once_no_frame_views_it(pool: SegmentPool) -> None:
    """Outputs are views of our landing buffers (no copy): a frame the caller still holds keeps its buffer, and the
    next output lands elsewhere; once dropped, its buffer is the next one used."""
    first = _output(pool, 1)
    address = first["a"].chunks[0].buffers()[1].address
    second = _output(pool, 2)
    assert set(first["a"].to_pylist()) == {1}, "an output still held is never written over"
    assert second["a"].chunks[0].buffers()[1].address != address
    del first
    third = _output(pool, 3)
    assert third["a"].chunks[0].buffers()[1].address == address, "a landing buffer nobody views is used again"
    assert set(second["a"].to_pylist()) == {2} and set(third["a"].to_pylist()) == {3}


def test_a_model_process_holds_a_segment_only_while_a_frame_views_it(pool: SegmentPool) -> None:
    """A mapping kept after the call would hold the space of a segment the orchestrator has closed."""
    before = shm_held()
    with FrameExchange(pool) as exchange:
        ref = exchange.put("frame", pa.table({"a": np.arange(4_000_000)}))
        frame = read_frame(ref, exchange.fds[ref["slot"]], "pyarrow")
    pool.close()
    assert shm_held() > before + 30_000_000, "a frame the model still holds keeps its segment"
    del frame
    assert shm_held() <= before + (1 << 20)


def test_release_is_safe_from_a_finalizer_run_while_the_pool_is_busy() -> None:
    """Issue 9: a release from a finalizer took the pool's own lock, so a garbage collection that ran while the
    thread held it (any allocation inside the pool can start one) deadlocked that thread."""
    pool = SegmentPool()
    segment = pool.acquire(mmap.PAGESIZE, "a lease")

    class Lease:
        pass

    gc.disable()  # N.B. Until the collection below: one that ran earlier would release with no lock held.
    try:
        lease = Lease()
        lease.cycle = lease  # N.B. Only a collection frees it.
        weakref.finalize(lease, pool.release, segment)
        del lease

        def collect_while_busy() -> None:
            with pool._lock:
                gc.collect()

        worker = threading.Thread(target=collect_while_busy, daemon=True)
        worker.start()
        worker.join(10)
    finally:
        gc.enable()
    assert not worker.is_alive(), "release deadlocked on the pool's own lock"
    assert pool.acquire(mmap.PAGESIZE, "the next call") is segment, "the released segment is idle again"
    pool.close()


def test_idle_budget_is_shared_by_every_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two model processes' pools keep at most the budget idle together; the least recently used goes first."""
    monkeypatch.setattr(idle_budget(), "max_bytes", 3 << 20)
    pools = [SegmentPool(), SegmentPool()]
    try:
        for pool in pools:
            with FrameExchange(pool) as exchange:
                exchange.put("frame", pa.table({"a": np.zeros(250_000)}))  # N.B. About 2 MB each.
        assert pools[0].held_bytes() == 0 and pools[1].held_bytes() > 0
    finally:
        for pool in pools:
            pool.close()


# --- a small /dev/shm of our own, through the real model-process call path -----------------------------------

SIZED_MODEL = """
import time

import numpy as np
import pyarrow as pa


def train(inputs, params):
    return {}


def predict(inputs, state, params):
    if params.get("hang"):
        time.sleep(600)
    return pa.table({"y": np.zeros(params["out_mib"] << 17)})  # N.B. 1 MiB per 131,072 float64 values.
"""

# N.B. Runs as root in a mount namespace of its own, whose /dev/shm is a fresh tmpfs: what it measures there is
# this driver's alone, whatever else runs on the machine.
SMALL_SHM_DRIVER = """
import json, os, sys

import numpy as np
import pyarrow as pa

from orchestrator.build import Interpreter
from orchestrator.pipes import console_link
from orchestrator.runner import Runner
from orchestrator.settings import Settings
from orchestrator.store import LocalPexStore


def used():
    # /dev/shm's use, plus the memfds this process and its children hold or map (they are on no file system).
    import psutil

    me = psutil.Process()
    held = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            for fd in os.listdir(f"/proc/{process.pid}/fd"):
                path = f"/proc/{process.pid}/fd/{fd}"
                if os.readlink(path).startswith("/memfd:modelpex"):
                    info = os.stat(path)
                    held[info.st_ino] = info.st_size
            with open(f"/proc/{process.pid}/maps") as maps:
                for line in maps:
                    if "memfd:modelpex" in line:
                        start, end = (int(x, 16) for x in line.split()[0].split("-"))
                        held.setdefault(int(line.split()[4]), end - start)
        except OSError:
            continue
    stat = os.statvfs("/dev/shm")
    return sum(held.values()) + (stat.f_blocks - stat.f_bfree) * stat.f_frsize


args = json.loads(sys.argv[1])
env = {"MODELPEX_SIGNING_KEY_FILE": args["key_file"], **args["cache"]}
settings = Settings.from_env(env=env, project=args["project"], store_url=args["store"])
record = LocalPexStore(args["store"]).record("model", "sized", args["key"])
results = []
with Runner(settings, Interpreter.detect(), timeout=300) as runner:
    for call in args["calls"]:
        runner.timeout = call.get("timeout", 300)
        data = pa.table({"x": np.zeros(call["in_mib"] << 17)})
        try:
            outcome = runner.call(record, console_link, action="train_predict", inputs={"data": data}, params=call)
            result = {"rows": outcome.rows_out["predictions"]}
        except Exception as exc:
            result = {"error": type(exc).__name__, "message": str(exc)}
        del data
        results.append({**result, "used": used()})
results.append({"used": used()})
with open(args["results"], "w") as handle:
    json.dump(results, handle)
"""


@pytest.fixture
def sized_model(project, store, tmp_path: Path) -> dict:
    """A built model whose output is as many MiB as the call asks for, and the driver's fixed arguments."""
    from orchestrator.build import Builder
    from orchestrator.specs import load_base_env, load_model_spec
    from orchestrator.versions import ModelSource

    from .conftest import write_model

    folder = write_model(project.models, "sized", code=SIZED_MODEL)
    builder = Builder(store, load_base_env(project.root / "base_env"))
    record = builder.model(ModelSource(load_model_spec(folder), None)).record
    return {
        "project": str(project.root),
        "store": str(store.root),
        "key": record.key,
        "key_file": str(tmp_path / "keys" / "signing.key"),
        "results": str(tmp_path / "results.json"),
        "cache": cache_env(),
    }


def in_small_shm(size: str, args: dict, calls: list[dict]) -> list[dict]:
    """Run ``calls`` through a Runner in a mount namespace whose /dev/shm is a tmpfs of ``size``; what each left."""
    mount = f'mount -t tmpfs -o size={size} modelpex-test /dev/shm && exec "{sys.executable}" -c "$0" "$1"'
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, SMALL_SHM_DRIVER,
         json.dumps({**args, "calls": calls})],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(Path(args["results"]).read_text())


@needs_mounts
def test_a_call_needs_no_room_in_dev_shm(sized_model: dict) -> None:
    """Issue 9 asked that a call need only the shared memory its frames take; now it needs none of /dev/shm at all
    (inputs are memfds, outputs pipes): a 1 MiB /dev/shm runs a call of 48 MiB in and 40 MiB out, warm too, and
    nothing is held once the runner closes."""
    call = {"in_mib": 48, "out_mib": 40}
    first, warm, closed = in_small_shm("1m", sized_model, [call, call])
    assert first.get("error") is None and first["rows"] == 40 << 17, first
    assert warm.get("error") is None and warm["rows"] == 40 << 17, warm
    assert closed["used"] == 0, "nothing is left once the runner closes"


@needs_mounts
def test_a_call_that_times_out_leaves_no_segment_behind(sized_model: dict) -> None:
    """The timeout path frees its segments at once, not when the runner closes: what the driver and its children
    hold."""
    warm_up, hang = {"in_mib": 1, "out_mib": 1}, {"in_mib": 48, "out_mib": 1, "hang": True, "timeout": 3}
    _, timed_out, _ = in_small_shm("256m", sized_model, [warm_up, hang])
    assert timed_out["error"] == "ModelTimeoutError", timed_out
    assert timed_out["used"] < MiB, f"{timed_out['used'] / MiB:.1f} MiB of segments outlived the timed-out call"


# --- a model that keeps descriptors: sealed inputs and states (issue 20) ---------------------------------------

KEEPER_MODEL = '''
import fcntl
import json
import mmap
import os

import pyarrow as pa

KEPT = []  # N.B. What a hostile model keeps from one call to the next: duplicates of every descriptor it had.


def _descriptors():
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith(("/dev/shm/", "/memfd:", "pipe:")):
            found.append(int(name))
    return found


def _attempts(fd, ways=("write", "pwrite", "mmap", "reopen", "truncate")):
    """Every way to write through ``fd``; the names of those that worked."""
    worked = []
    for way in ways:
        try:
            if way == "write":
                os.write(fd, b"EVILEVIL}")
            elif way == "pwrite":
                os.pwrite(fd, b"EVILEVIL}", 0)
            elif way == "mmap":
                with mmap.mmap(fd, 9, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
                    m[:9] = b"EVILEVIL}"
            elif way == "reopen":
                again = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
                try:
                    os.pwrite(again, b"EVILEVIL}", 0)
                finally:
                    os.close(again)
            else:
                os.ftruncate(fd, 0)
            worked.append(way)
        except (OSError, ValueError):
            pass
    return worked


def _is_pipe(fd):
    return os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")


def train(inputs, params):
    return {"ok": 1}


def predict(inputs, state, params):
    current = _descriptors()
    if params.get("scribble"):  # N.B. The control: its own output takes what it writes.
        for fd in current:
            if _is_pipe(fd):
                _attempts(fd, ways=("write",))
        return pa.table({"what": ["scribbled"], "seen": [""]})
    if params.get("keep"):
        KEPT.extend(os.dup(fd) for fd in current)
        return pa.table({"what": ["kept"], "seen": [json.dumps(state)]})
    wrote = {f"kept {fd} {'pipe' if _is_pipe(fd) else 'segment'}": _attempts(fd) for fd in KEPT}
    # N.B. Not this call's own output pipe: writing it is the control above, and would only spoil this answer.
    wrote |= {f"current {fd}": _attempts(fd) for fd in current if fd not in KEPT and not _is_pipe(fd)}
    seen = []
    for fd in current:
        try:
            seen.append(os.pread(fd, 64, 0).decode(errors="replace"))
        except OSError:
            pass
    return pa.table({"what": [json.dumps(wrote)], "seen": [json.dumps([state, seen])]})
'''


@pytest.fixture
def keeper(project, store) -> object:
    from orchestrator.build import Builder
    from orchestrator.specs import load_base_env, load_model_spec
    from orchestrator.versions import ModelSource

    from .conftest import write_model

    folder = write_model(project.models, "keeper", code=KEEPER_MODEL)
    builder = Builder(store, load_base_env(project.root / "base_env"))
    return builder.model(ModelSource(load_model_spec(folder), None)).record


def test_a_kept_writable_descriptor_cannot_change_a_later_verified_state(
    project, store, keeper, tmp_path: Path
) -> None:
    """Issue 20, attack 2: the model kept a duplicate of every descriptor of one call (its writable output among
    them) and, in later calls of the same process, writes through each of them, and through every descriptor it was
    handed, into the state it was given. Control: what a model writes into its own output is what the orchestrator
    reads (and refuses, being garbage). Target: the sealed state segment, read back after the attack, still holds the
    verified bytes."""
    from orchestrator.build import Interpreter
    from orchestrator.errors import ModelpexError
    from orchestrator.pipes import console_link
    from orchestrator.runner import Runner
    from orchestrator.settings import Settings

    env = {"MODELPEX_SIGNING_KEY_FILE": str(tmp_path / "keys" / "signing.key"), **cache_env()}
    settings = Settings.from_env(env=env, project=project.root, store_url=str(store.root))
    data = {"data": pa.table({"x": np.arange(1000)})}
    with Runner(settings, Interpreter.detect(), timeout=120) as runner:
        with pytest.raises(ModelpexError, match="output 'predictions' of keeper@1.0.0 is not a valid Arrow IPC stream"):
            runner.call(keeper, console_link, action="train_predict", inputs=data, params={"scribble": True})
        first = runner.call(
            keeper, console_link, action="train_predict", inputs=data, params={"keep": True}, keep_state=True
        )
        state = first.state
        assert state is not None and json.loads(state.payload) == {"ok": 1}
        for _ in range(3):  # N.B. Every later call's segments come from the same pool the first call's went back to.
            later = runner.call(keeper, console_link, action="predict", inputs=data, params={}, state_in=state)
            outcome = later.outputs["predictions"]
            wrote = json.loads(outcome["what"][0].as_py())
            decoded, seen = json.loads(outcome["seen"][0].as_py())
            assert decoded == {"ok": 1}, "the model decoded the verified state"
            assert len(wrote) > 3, f"the model tried every descriptor it kept and was handed: {wrote}"
            # N.B. Into a kept pipe a write may go (nobody reads it any more); into no segment, by no means at all.
            assert not any(ways for name, ways in wrote.items() if ways != ["write"] or "pipe" not in name), wrote
            assert any(text.startswith('{"ok"') for text in seen), f"the state's segment was among those read: {seen}"
            assert not any("EVILEVIL" in text for text in seen), f"a segment the model reads was changed: {wrote}"


# --- outputs validated in full before anything reads them (issue 20, attack 3) ----------------------------------

ROWS = 37  # N.B. A row count no header field holds by chance: the lengths to corrupt are found by value.
LETTERS = [chr(ord("a") + i % 26) for i in range(ROWS)]  # N.B. One byte each: offsets 0, 1, 2, ... findable.


def _outputs() -> dict[str, pa.Table]:
    """Real outputs of the kinds models return, each as the model side would write it."""
    ints = pa.array([None if i % 5 == 0 else i for i in range(ROWS)], pa.int64())
    return {
        "numbers": pa.table(
            {"id": np.arange(ROWS), "p": np.linspace(0, 1, ROWS), "ok": [i % 2 == 0 for i in range(ROWS)]}
        ),
        "strings": pa.table({"s": LETTERS, "n": ints}),
        "large": pa.table({"s": pa.array(LETTERS, pa.large_string()), "b": pa.array([x.encode() for x in LETTERS])}),
        "unicode": pa.table({"s": ["é" * (i % 3) for i in range(ROWS)]}),
        "nested": pa.table(
            {
                "l": pa.array([[i] * (i % 3) for i in range(ROWS)], pa.list_(pa.int64())),
                "st": pa.array([{"a": i, "b": LETTERS[i]} for i in range(ROWS)]),
                "d": pa.array(LETTERS).dictionary_encode(),
            }
        ),
        "views": pa.table({"v": pa.array([x * (i % 20) for i, x in enumerate(LETTERS)], pa.string_view())}),
        "inline": pa.table({"v": pa.array(LETTERS, pa.string_view()), "w": pa.array(LETTERS, pa.binary_view())}),
        "pandas": pa.Table.from_pandas(pd.DataFrame({"when": pd.date_range("2026-01-01", periods=ROWS), "x": ints})),
    }


def _stream_bytes(table: pa.Table) -> bytes:
    from modelpex_runtime.transport import ipc_size, write_table

    size = ipc_size(table)
    target = bytearray(size)
    write_table(target, table, size)  # N.B. The model side's own writer.
    return bytes(target)


def _schema_part(schema: pa.Schema) -> bytes:
    sink = pa.BufferOutputStream()
    pa.ipc.new_stream(sink, schema).close()
    return sink.getvalue().to_pybytes()[:-8]  # N.B. Without the end-of-stream marker.


OUTPUTS = {name: _stream_bytes(table) for name, table in _outputs().items()}
# N.B. The record batches of one table under the schema of another with as many columns: buffer counts that do not
# match their types (2 for int64 against 3 for a string, a list's child missing, ...).
SWAPS = [
    ("numbers", "strings"),
    ("strings", "nested"),
    ("nested", "numbers"),
    ("views", "unicode"),
    ("strings", "large"),
]


def _body_start(payload: bytes) -> int:
    """Where the record batch message starts: after the schema message (continuation marker, length, metadata)."""
    return 8 + int.from_bytes(payload[4:8], "little")


def _patch(payload: bytes, at: int, value: int, width: int) -> bytes:
    at = max(0, min(at, len(payload) - width))
    return payload[:at] + (value % (1 << (8 * width))).to_bytes(width, "little") + payload[at + width :]


@st.composite
def corrupted(draw: st.DrawFn) -> tuple[str, bytes]:
    """A real output, broken one way: flipped bytes, cut short, a length or an offset out of range, offsets that go
    backwards, an integer anywhere after the schema, or buffers that do not match their types."""
    name = draw(st.sampled_from(sorted(OUTPUTS)))
    payload = OUTPUTS[name]
    how = draw(st.sampled_from(["flip", "truncate", "length", "offsets", "integer", "swap"]))
    values = st.sampled_from([-1, -(2**31), 2**31 - 1, 2**32 + 5, 2**62, ROWS + 1, ROWS * 1000, 0, 1])
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(payload) - 1))
            payload = payload[:at] + bytes([payload[at] ^ draw(st.integers(1, 255))]) + payload[at + 1 :]
    elif how == "truncate":
        payload = payload[: draw(st.integers(0, len(payload) - 1))]
    elif how == "length":  # N.B. The batch's row count or a column's length or null count: every int64 ROWS.
        marker = ROWS.to_bytes(8, "little")
        places = [i for i in range(_body_start(payload), len(payload) - 7) if payload[i : i + 8] == marker]
        if places:
            payload = _patch(payload, draw(st.sampled_from(places)), draw(values), 8)
    elif how == "offsets":  # N.B. The offsets 0, 1, 2, 3 of a one-letter-per-row string column.
        start = payload.find(b"".join(i.to_bytes(4, "little") for i in range(4)))
        if start >= 0:
            index = draw(st.integers(1, ROWS))
            bad = draw(st.sampled_from([index - 2, -1, 0, ROWS * 4, 2**31 - 1, index // 2]))
            payload = _patch(payload, start + 4 * index, bad, 4)
    elif how == "integer":
        at = draw(st.integers(_body_start(payload), len(payload) - 1))
        payload = _patch(payload, at, draw(values), draw(st.sampled_from([4, 8])))
    else:
        batches, schema_of = draw(st.sampled_from(SWAPS))
        tables = _outputs()
        own = _schema_part(tables[batches].schema)
        payload = _schema_part(tables[schema_of].schema) + OUTPUTS[batches][len(own) :]
    return name, payload


# N.B. The orchestrator's own parsing, in a child: a payload that crashed it would end the child, not the test.
PARSER = """
import struct, sys, traceback
sys.path[:0] = [{repo!r}, {src!r}]
from modelpex_runtime.protocol import TransportError
from orchestrator.metadata import frame_metadata
from orchestrator.transport import decode_output
import modelpex_runtime.transport
import pyarrow as pa

modelpex_runtime.transport._BULK_ROWS = 0  # N.B. The bulk checks, which real outputs take from 4,096 rows, here too.

out = sys.stdout
while header := sys.stdin.buffer.read(8):
    size, rows = struct.unpack("<II", header)
    payload = pa.py_buffer(sys.stdin.buffer.read(size))
    ref = {{"protocol": 0, "slot": 0, "size": size, "num_rows": rows, "columns": []}}
    outcome = []
    for library in ("pyarrow", "pandas", "polars"):
        try:
            frame = decode_output(payload, ref, library, "output 'predictions' of hostile 1.0")
            if library == "pyarrow":
                frame_metadata(frame)
            outcome.append("ok")
        except TransportError as exc:
            outcome.append("refused: " + str(exc).replace(chr(10), " "))
        except Exception as exc:
            outcome.append("OTHER: " + "".join(traceback.format_exception_only(exc)).replace(chr(10), " "))
    out.write(chr(9).join(outcome) + chr(10))
    out.flush()
"""


class Parser:
    """The parsing child; started again after a payload ended it, so that hypothesis can shrink that payload."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def parse(self, payload: bytes) -> tuple[int | None, list[str]]:
        if self.process is None or self.process.poll() is not None:
            code = PARSER.format(repo=str(REPO), src=str(REPO / "base_env" / "src"))
            self.process = subprocess.Popen(
                [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )  # fmt: skip
        try:
            self.process.stdin.write(len(payload).to_bytes(4, "little") + ROWS.to_bytes(4, "little") + payload)
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = b""
        if not line:
            return self.process.wait(30), []
        return None, line.decode().rstrip("\n").split("\t")

    def close(self) -> int | None:
        if self.process is None:
            return 0
        self.process.stdin.close()
        return self.process.wait(30)


def test_every_real_output_is_read_back_whole_by_the_parsing_child() -> None:
    """Control: unbroken outputs decode in every library through the child (so a refusal below is the check's)."""
    parser = Parser()
    for name, payload in OUTPUTS.items():
        died, outcome = parser.parse(payload)
        assert died is None, f"{name}: the parser died ({died})"
        assert outcome == ["ok", "ok", "ok"], f"{name}: {outcome}"
    assert parser.close() == 0


def test_a_corrupted_output_is_one_refusal_and_never_a_crash() -> None:
    """Issue 20, attack 3: outputs broken every way hypothesis finds are refused with one line naming the model, the
    output and the problem, or read as the valid table they still are; the parsing process never dies."""
    parser = Parser()

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=corrupted())
    def check(case: tuple[str, bytes]) -> None:
        name, payload = case
        died, outcome = parser.parse(payload)
        assert died is None, f"{name}: the orchestrator's parsing died with {died} on this output"
        for result in outcome:
            assert not result.startswith("OTHER"), f"{name}: not one clear refusal: {result}"
            if result.startswith("refused"):
                assert "output 'predictions' of hostile 1.0" in result, result

    try:
        check()
    finally:
        assert parser.close() == 0, "the parsing child exits normally"


@pytest.mark.parametrize("kind", [pa.timestamp("us"), pa.date64(), pa.time64("us")])
def test_metadata_of_dates_python_cannot_hold_is_their_raw_number(kind: pa.DataType) -> None:
    """Found by the property test: an output's timestamp of year 300,000 is valid Arrow, and Python's datetime
    raised OverflowError from the metadata's min/max and preview (an orchestrator traceback, not a refusal)."""
    from orchestrator.metadata import frame_metadata

    table = pa.table({"when": pa.array([2**62, 0], pa.int64()).cast(kind, safe=False), "x": [1.0, 2.0]})
    with pytest.raises((OverflowError, ValueError)):
        table.to_pylist()  # N.B. The control: Python cannot hold this value.
    metadata = frame_metadata(table)
    assert str(2**62) in metadata["preview"].value
