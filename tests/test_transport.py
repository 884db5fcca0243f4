"""Shared-memory transport: round trips for every column kind, zero-copy reads, and every segment unlinked on every
path (success, the model raising, killed mid-write, the orchestrator raising or dying)."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import polars.testing
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelpex_runtime.protocol import SEGMENT_NAME, ShmSpaceError, TransportError
from modelpex_runtime.transport import check_space, from_arrow, map_segment, read_frame, to_arrow, write_frame

from orchestrator.transport import FrameExchange, SegmentPool, private_pool, sweep_orphans

REPO = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")


def ours(pid: int | None = None) -> set[str]:
    return {
        p.name
        for p in SHM.iterdir()
        if SEGMENT_NAME.fullmatch(p.name) and (pid is None or p.name.split("_")[1] == str(pid))
    }


def round_trip(table: pa.Table, library: str, pool: SegmentPool):
    """Orchestrator -> model side -> orchestrator, in the library the model asked for."""
    with FrameExchange(pool) as exchange:
        ref = exchange.put("frame", from_arrow(table, library))
        out = exchange.reserve_output("frame")
        back_ref = write_frame(read_frame(ref, library), out)
        return exchange.get(back_ref, library)


def assert_same(expected: pa.Table, got, library: str) -> None:
    want = from_arrow(expected, library)
    if library == "pandas":
        pd.testing.assert_frame_equal(got, want)
    elif library == "polars":
        pl.testing.assert_frame_equal(got, want)
    else:
        assert got.schema.equals(want.schema, check_metadata=False), (got.schema, want.schema)
        assert got.equals(want)


# --- every column kind, for each library ---------------------------------------------------------------------

COLUMNS = {
    "int": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "float": (pa.float64(), st.floats(allow_nan=False)),
    "bool": (pa.bool_(), st.booleans()),
    "string": (pa.large_string(), st.text(max_size=8)),
    "timestamp_tz": (
        pa.timestamp("us", tz="Europe/Paris"),
        st.datetimes(dt.datetime(1970, 1, 2), dt.datetime(2200, 1, 1), timezones=st.just(dt.UTC)),
    ),
    "category": (pa.dictionary(pa.int32(), pa.large_string()), st.sampled_from(["low", "medium", "high"])),
    "decimal": (
        pa.decimal128(12, 3),
        st.decimals(min_value=-(10**8), max_value=10**8, places=3, allow_nan=False, allow_infinity=False),
    ),
    "list": (pa.large_list(pa.int64()), st.lists(st.integers(-1000, 1000), max_size=4)),
}


@st.composite
def tables(draw, library: str) -> pa.Table:
    rows = draw(st.integers(0, 40))
    names = draw(st.lists(st.sampled_from(sorted(COLUMNS)), unique=True, max_size=len(COLUMNS)))
    arrays = {}
    for name in names:
        arrow_type, values = COLUMNS[name]
        nullable = draw(st.booleans()) and name not in ("bool",)
        column = draw(st.lists(st.one_of(st.none(), values) if nullable else values, min_size=rows, max_size=rows))
        if name == "category":
            arrays[name] = pa.array(column, pa.large_string()).dictionary_encode().cast(arrow_type)
        elif name == "decimal":
            arrays[name] = pa.array([None if v is None else decimal.Decimal(v) for v in column], arrow_type)
        else:
            arrays[name] = pa.array(column, arrow_type)
    table = pa.table(arrays) if arrays else pa.table({})
    if rows > 1 and names and draw(st.booleans()):  # N.B. More than one record batch.
        table = pa.concat_tables([table.slice(0, rows // 2), table.slice(rows // 2)])
    return table


@pytest.mark.parametrize("library", ["pyarrow", "polars", "pandas"])
def test_round_trip_keeps_schema_and_values(library: str) -> None:
    before = ours(os.getpid())  # N.B. The process's default pool may hold idle segments from other tests.
    with private_pool() as pool:

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(table=tables(library))
        def check(table: pa.Table) -> None:
            assert_same(table, round_trip(table, library, pool), library)

        check()
    assert ours(os.getpid()) <= before


@pytest.mark.parametrize("library", ["pyarrow", "polars", "pandas"])
def test_empty_zero_column_and_multi_batch_frames(library: str) -> None:
    big = pa.table({"a": np.arange(300_000), "c": pa.array(["c"] * 300_000)})
    batches = pa.Table.from_batches(big.to_batches(max_chunksize=70_000))
    cases = [pa.table({"a": pa.array([], pa.int64())}), pa.table({}), batches]
    with private_pool() as pool:
        for table in cases:
            assert_same(table, round_trip(table, library, pool), library)
    assert len(batches.to_batches()) > 1


def test_seed_frame_at_a_million_rows() -> None:
    n = 1_000_000
    table = pa.table({"a": np.arange(n), "b": np.arange(n), "c": pa.array(["c"] * n)})
    with private_pool() as pool:
        for library in ("pandas", "polars", "pyarrow"):
            assert_same(table, round_trip(table, library, pool), library)


# --- zero copy -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("library", ["pyarrow", "polars", "pandas"])
def test_reads_are_views_of_the_segment(library: str) -> None:
    """Overwrite the segment after reading: a zero-copy frame sees the new bytes, a copy would not."""
    table = pa.table({"a": np.full(1000, 7, dtype="int64")})
    with private_pool() as pool, FrameExchange(pool) as exchange:
        ref = exchange.put("frame", table)
        frame = read_frame(ref, library)
        mapping = map_segment(ref["segment"], length=ref["size"], writable=True)
        payload = bytes(mapping)
        start = payload.find(np.full(1000, 7, dtype="<i8").tobytes())
        mapping[start : start + 8000] = np.full(1000, 9, dtype="<i8").tobytes()
        column = frame["a"].to_pylist() if library == "pyarrow" else list(frame["a"])
        assert set(column) == {9}
        del frame, mapping


def test_a_view_outlives_the_unlinked_segment() -> None:
    """Arrow buffers keep the mapping alive after its segment is unlinked: no BufferError, no dangling memory."""
    with private_pool() as pool:
        with FrameExchange(pool) as exchange:
            out = exchange.reserve_output("frame")
            ref = write_frame(pa.table({"a": np.arange(10)}), out)
            table = exchange.get(ref, "pyarrow")
        pool.close()
        assert out not in ours()
        assert table["a"].to_pylist() == list(range(10))


# --- names, modes and bad payloads ---------------------------------------------------------------------------


def test_segments_are_private_and_unguessable() -> None:
    with private_pool() as pool, FrameExchange(pool) as exchange:
        first = exchange.put("a", pa.table({"x": [1]}))["segment"]
        second = exchange.reserve_output("b")
        for name in (first, second):
            assert SEGMENT_NAME.fullmatch(name) and len(name) <= 31
            assert os.stat(SHM / name).st_mode & 0o777 == 0o600
        assert first.split("_")[2] != second.split("_")[2]


@pytest.mark.parametrize("name", ["../etc/passwd", "psm_deadbeef", "mpx_1_../../x", "mpx_12_nothex0000000000", ""])
def test_only_our_names_are_opened(name: str) -> None:
    with pytest.raises(TransportError, match="is not a modelpex shared-memory segment name"):
        read_frame({"protocol": 1, "segment": name, "size": 10, "num_rows": 0, "columns": []}, "pyarrow")


def test_garbage_and_truncated_payloads_are_refused() -> None:
    with private_pool() as pool, FrameExchange(pool) as exchange:
        ref = exchange.put("frame", pa.table({"a": np.arange(100)}))
        with pytest.raises(TransportError, match="announced: the payload is truncated"):
            read_frame({**ref, "size": ref["size"] + 10**6}, "pyarrow")
        with pytest.raises(TransportError, match="holds 100 rows but 5 were announced"):
            read_frame({**ref, "num_rows": 5}, "pyarrow")
        with pytest.raises(TransportError, match="does not hold a valid Arrow IPC stream"):
            read_frame({**ref, "size": ref["size"] // 2}, "pyarrow")
        mapping = map_segment(ref["segment"], length=ref["size"], writable=True)
        mapping[:64] = os.urandom(64)
        with pytest.raises(TransportError, match="does not hold a valid Arrow IPC stream"):
            read_frame(ref, "pyarrow")
        with pytest.raises(TransportError, match="which this call did not reserve"):
            exchange.get(ref, "pyarrow")


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
def test_frames_arrow_cannot_hold_are_named(frame: object, message: str) -> None:
    before = ours(os.getpid())
    with private_pool() as pool, FrameExchange(pool) as exchange:
        with pytest.raises(TransportError, match=message):
            exchange.put("frame", frame)
    assert ours(os.getpid()) <= before


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
def test_pandas_needs_its_metadata_only_where_arrow_types_fall_short(frame: pd.DataFrame, plain: bool) -> None:
    """Plain frames skip from_pandas (the small-frame fast path); the others keep their index, names and dtypes."""
    with private_pool() as pool:
        back = round_trip(to_arrow(frame), "pandas", pool)
    pd.testing.assert_frame_equal(back, frame)
    assert (to_arrow(frame).schema.metadata is None) is plain


# --- lifetimes with real processes ---------------------------------------------------------------------------

MODEL_SIDE = """
import json, os, signal, sys, time
sys.path.insert(0, {src!r})
from modelpex_runtime.transport import map_segment, read_frame, write_frame
call = json.loads(sys.argv[1])
frame = read_frame(call["ref"], "pandas")
mode = call["mode"]
if mode == "raise":
    raise ValueError("model failed after reading its input")
if mode == "hang-mid-write":
    map_segment(call["out"], writable=True, grow_to=50_000_000)  # grown, half written: then it stops
    print("writing", flush=True)
    time.sleep(600)
print(json.dumps(write_frame(frame, call["out"])), flush=True)
"""


def model_process(call: dict) -> subprocess.Popen:
    code = MODEL_SIDE.format(src=str(REPO / "base_env" / "src"))
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(call)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def call_model(mode: str, pool: SegmentPool) -> set[str]:
    """One call on one path; returns the names of the segments it used."""
    with FrameExchange(pool) as exchange:
        ref = exchange.put("frame", pa.table({"a": np.arange(1000)}))
        call = {"ref": ref, "out": exchange.reserve_output("out"), "mode": mode}
        names = set(pool.names())
        assert names <= ours(), "the segments exist while the call runs"
        try:
            if mode == "orchestrator-raises":
                raise RuntimeError("the orchestrator failed between two steps")
            process = model_process(call)
            if mode == "hang-mid-write":
                assert process.stdout.readline().strip() == "writing"
                process.send_signal(signal.SIGKILL)  # N.B. Killed mid-write, as a timeout would.
            out, err = process.communicate(timeout=60)
            assert "leaked" not in err and "resource_tracker" not in err, err
            if mode == "raise":
                assert "ValueError: model failed after reading its input" in err
            if mode == "ok":
                assert exchange.get(json.loads(out), "pandas")["a"].sum() == 499500
        except RuntimeError:
            pass
    return names


@pytest.mark.parametrize("mode", ["ok", "raise", "hang-mid-write", "orchestrator-raises"])
def test_every_path_unlinks(mode: str) -> None:
    """Each path of a call, with a pool that keeps nothing idle: afterwards none of its segments exist."""
    with private_pool() as pool:
        names = call_model(mode, pool)
        assert len(names) == 2 and not (names & ours())


def test_attaching_process_neither_unlinks_nor_warns() -> None:
    """Python 3.11's resource tracker would unlink a segment a child merely read, and warn about a leak."""
    with private_pool() as pool, FrameExchange(pool) as exchange:
        ref = exchange.put("frame", pa.table({"a": np.arange(10)}))
        code = (
            f"import sys, json; sys.path.insert(0, {str(REPO / 'base_env' / 'src')!r}); "
            "from modelpex_runtime.transport import read_frame; "
            "print(read_frame(json.loads(sys.argv[1]), 'pandas')['a'].sum())"
        )
        done = subprocess.run([sys.executable, "-c", code, json.dumps(ref)], capture_output=True, text=True, timeout=60)
        assert done.stdout.strip() == "45" and done.stderr == ""
        assert ref["segment"] in ours()
        assert read_frame(ref, "pyarrow").num_rows == 10


ORCHESTRATOR = """
import sys, time
sys.path[:0] = [{repo!r}, {src!r}]
import pyarrow as pa
from orchestrator.transport import FrameExchange
exchange = FrameExchange()
exchange.put("frame", pa.table({{"a": list(range(1000))}}))
exchange.reserve_output("out")
print("ready", flush=True)
time.sleep(600)
"""


def test_sweeper_removes_a_dead_orchestrators_segments_only() -> None:
    code = ORCHESTRATOR.format(repo=str(REPO), src=str(REPO / "base_env" / "src"))
    dead = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    alive = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        for process in (dead, alive):
            assert process.stdout.readline().strip() == "ready"
        dead.kill()
        dead.wait()
        left = ours(dead.pid)
        assert len(left) == 2, "kill -9 leaves the dead orchestrator's segments behind"
        foreign = SHM / "psm_modelpex_test_foreign"
        foreign.write_bytes(b"someone else's")
        lookalike = SHM / f"mpx_{dead.pid}_notours"
        lookalike.write_bytes(b"not our name pattern")
        removed = sweep_orphans()
        assert set(removed) == left
        assert not ours(dead.pid) and len(ours(alive.pid)) == 2
        assert foreign.exists() and lookalike.exists()
    finally:
        alive.kill()
        alive.wait()
        for path in (SHM / "psm_modelpex_test_foreign", SHM / f"mpx_{dead.pid}_notours"):
            path.unlink(missing_ok=True)
        sweep_orphans()
    assert not ours(alive.pid)


def test_pool_reuses_segments_between_calls() -> None:
    pool = SegmentPool()
    try:
        table = pa.table({"a": np.arange(100_000)})
        with FrameExchange(pool) as exchange:
            first = exchange.put("frame", table)["segment"]
        with FrameExchange(pool) as exchange:
            assert exchange.put("frame", table)["segment"] == first
    finally:
        pool.close()
    assert first not in ours()
