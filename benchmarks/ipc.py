"""IPC benchmark: the seed's round-trip table, reproduced and beaten, in one run.

    python benchmarks/ipc.py --json benchmarks/results/ipc.json [--quick]

Rows, each a round trip (orchestrator -> model process -> orchestrator) of the seed's frame (``a`` and ``b`` =
range(n), ``c`` = 'c' repeated), median of several runs:

- the seed's method: multiprocessing pickle through a pipe, for pandas, polars, dict and pydantic;
- ours: the frame written as Arrow IPC into a sealed memfd, handed over as a descriptor on the real channel
  (``modelpex_runtime.channel``), read (zero-copy) and converted to the library by the real model-side runtime
  (``modelpex_runtime.transport``) in a separate, long-lived process, streamed back through the output's pipe, read
  into a private landing buffer, validated in full and converted by the orchestrator side
  (``orchestrator.transport``); for pandas, polars and pyarrow;
- the physical floor: two warm memcpys of the table's bytes (there and back, written once, read zero-copy).

Process start-up is not in the round trips: the worker's start-up is reported on its own line. Then where the time
goes: each step of a round trip timed on its own (same functions, same processes), with page faults, read/write
system calls and context switches per round trip of each process (``/proc/<pid>/stat``, ``io``, ``status``); and
the targets of issue 17 as a table. The JSON records the commit measured and the machine's load.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "base_env" / "src")]

SIZES = [10**k for k in range(8)]
QUICK_SIZES = [10**k for k in range(5)]
SLOW_LIMIT = 10**6  # dict and pydantic above this take minutes per run with pickle: skipped, as the table says
OURS = ("pandas", "polars", "pyarrow")
SEED = ("pandas", "polars", "dict", "pydantic")


def timed_runs(n: int, repeats: int, big: int) -> int:
    """How many timed round trips at ``n`` rows: small frames take a millisecond, so five times as many steady their
    median for free; frames of a million rows and more take seconds, so ``big``."""
    if n >= 10**6:
        return big
    return repeats * 5 if n <= 10**4 else repeats


def seed_data(n: int) -> dict[str, list]:
    return {"a": list(range(n)), "b": list(range(n)), "c": ["c"] * n}


def arrow_table(n: int):
    import numpy as np
    import pyarrow as pa

    return pa.table({"a": np.arange(n, dtype="int64"), "b": np.arange(n, dtype="int64"), "c": pa.array(["c"] * n)})


def seed_object(kind: str, n: int):
    if kind == "dict":
        return seed_data(n)
    if kind == "pydantic":
        from pydantic import BaseModel

        class Data(BaseModel):
            a: list[int]
            b: list[int]
            c: list[str]

        return Data(**seed_data(n)).model_dump()  # N.B. A dict of its fields: a local class does not pickle.
    table = arrow_table(n)
    if kind == "pandas":
        return table.to_pandas()
    import polars as pl

    return pl.from_arrow(table)


def _echo(connection) -> None:
    while (item := connection.recv()) is not None:
        connection.send(item)


def seed_round_trips(kind: str, sizes: list[int], repeats: int) -> dict[int, float]:
    """The seed's method: send the object to another process through a multiprocessing pipe and back."""
    parent, child = mp.Pipe()
    process = mp.get_context("fork").Process(target=_echo, args=(child,), daemon=True)
    process.start()
    results = {}
    try:
        for n in sizes:
            if kind in ("dict", "pydantic") and n > SLOW_LIMIT:
                continue
            obj = seed_object(kind, n)
            runs = []
            for _ in range(timed_runs(n, repeats, big=3)):
                started = time.perf_counter()
                parent.send(obj)
                parent.recv()
                runs.append(time.perf_counter() - started)
            results[n] = statistics.median(runs)
    finally:
        parent.send(None)
        process.join(10)
    return results


def worker(fd: int) -> None:
    """The model side, kept alive: read each frame as its library asks, write it back, over the real channel."""
    from modelpex_runtime.channel import Channel, ChannelClosed
    from modelpex_runtime.transport import fits_in_pipe, prepare_frame, read_frame

    channel = Channel.from_fd(fd)
    channel.send({"ready": True})
    while True:
        try:
            call, fds = channel.receive()
        except ChannelClosed:
            return
        started = time.perf_counter()
        frame = read_frame(call["ref"], fds[call["ref"]["slot"]], call["library"])
        read = time.perf_counter()
        ref, send = prepare_frame(frame, call["out"])
        prepared = time.perf_counter()
        seconds = {"model: map + read + convert": read - started, "model: to Arrow + measure": prepared - read}
        # N.B. As the runtime does: an output that fits in its pipe before the answer, a bigger one after it.
        early = fits_in_pipe(fds[call["out"]], ref["size"])
        if early:
            send(fds[call["out"]])
        channel.send({"ref": ref, "seconds": seconds})
        if not early:
            send(fds[call["out"]])
        del frame, send
        for descriptor in fds:
            os.close(descriptor)


class Worker:
    def __init__(self) -> None:
        import socket

        from modelpex_runtime.channel import Channel

        started = time.perf_counter()
        parent, child = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(child.fileno())], pass_fds=(child.fileno(),)
        )
        child.close()
        self.channel = Channel(parent)
        assert self.channel.receive()[0]["ready"]
        self.startup_seconds = time.perf_counter() - started

    def round_trip(self, exchange, frame, library: str):
        ref = exchange.put("frame", frame)
        out = exchange.reserve("frame")
        self.channel.send({"ref": ref, "library": library, "out": out}, exchange.fds)
        answer = self.channel.receive()[0]
        return exchange.get("frame", answer["ref"], library, "frame")

    def close(self) -> None:
        self.channel.close()
        self.process.wait(10)


def our_round_trips(library: str, sizes: list[int], repeats: int, worker_: Worker) -> dict[int, float]:
    from modelpex_runtime.transport import from_arrow

    from orchestrator.transport import FrameExchange, SegmentPool

    results, pool = {}, SegmentPool()
    for n in sizes:
        frame = from_arrow(arrow_table(n), library)
        for _ in range(3):  # N.B. Warm-up: the pool's segments get their pages, as in a long-lived orchestrator.
            with FrameExchange(pool) as exchange:
                back = worker_.round_trip(exchange, frame, library)
            del back
        runs = []
        for _ in range(timed_runs(n, repeats, big=5)):
            with FrameExchange(pool) as exchange:
                started = time.perf_counter()
                back = worker_.round_trip(exchange, frame, library)
                runs.append(time.perf_counter() - started)
            assert len(back) == n
            del back
        results[n] = statistics.median(runs)
    pool.close()
    return results


def memcpy_floor(sizes: list[int], repeats: int) -> tuple[dict[int, float], dict[int, int]]:
    """Two warm memcpys of the table's IPC bytes: the floor of write once, read zero-copy, there and back."""
    import numpy as np
    from modelpex_runtime.transport import ipc_size

    results, nbytes = {}, {}
    for n in sizes:
        size = ipc_size(arrow_table(n))
        nbytes[n] = size
        src, mid, dst = (np.ones(size, dtype="uint8") for _ in range(3))
        runs = []
        for _ in range(repeats + 2):
            started = time.perf_counter()
            np.copyto(mid, src)
            np.copyto(dst, mid)
            runs.append(time.perf_counter() - started)
        results[n] = statistics.median(runs[2:])
    return results, nbytes


def _counters(pid: int) -> dict[str, int]:
    """Page faults, read/write system calls and context switches of a process so far."""
    stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    io = dict(line.split(": ") for line in open(f"/proc/{pid}/io").read().splitlines())
    status = dict(line.split(":\t") for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
    return {
        "minor faults": int(stat[7]),
        "major faults": int(stat[9]),
        "read/write calls": int(io["syscr"]) + int(io["syscw"]),
        "context switches": int(status["voluntary_ctxt_switches"]) + int(status["nonvoluntary_ctxt_switches"]),
    }


class _Laps:
    """Each call records the time since the previous one under a step's name (when ``keep``)."""

    def __init__(self, into: dict[str, list[float]], *, keep: bool) -> None:
        self.into, self.keep, self.last = into, keep, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        if self.keep:
            self.into.setdefault(name, []).append(now - self.last)
        self.last = now


def breakdown(library: str, n: int, runs: int, worker_: Worker) -> dict:
    """Where a round trip's time goes: each step timed on its own, the same functions the public path calls, and
    each process's faults, system calls and context switches per round trip."""
    import pyarrow as pa
    from modelpex_runtime.transport import from_arrow, read_table

    from orchestrator.transport import FrameExchange, SegmentPool

    pool, frame = SegmentPool(), from_arrow(arrow_table(n), library)
    steps: dict[str, list[float]] = {}
    counts: dict[str, list[dict[str, int]]] = {"orchestrator": [], "model": []}
    for run in range(runs + 2):  # N.B. Two warm-up runs: the pool's segments and landing buffers get their pages.
        before = {"orchestrator": _counters(os.getpid()), "model": _counters(worker_.process.pid)}
        with FrameExchange(pool) as exchange:
            lap = _Laps(steps, keep=run >= 2)
            ref = exchange.put("frame", frame)
            lap("orchestrator: to Arrow + write sealed input")
            out = exchange.reserve("frame")
            worker_.channel.send({"ref": ref, "library": library, "out": out}, exchange.fds)
            answer = worker_.channel.receive()[0]
            lap("channel + model side (below)")
            view = exchange._receive(answer["ref"]["slot"], answer["ref"]["size"], "frame", "frame")
            lap("output pipe -> landing buffer")
            table = read_table(pa.py_buffer(view), answer["ref"], "frame", full=True)
            lap("orchestrator: read + validate in full")
            back = from_arrow(table, library, "frame")
            lap("orchestrator: convert to the library")
            del back, table, view
        if run >= 2:
            for name, seconds in answer["seconds"].items():
                steps.setdefault(name, []).append(seconds)
            for side, pid in (("orchestrator", os.getpid()), ("model", worker_.process.pid)):
                after = _counters(pid)
                counts[side].append({k: after[k] - before[side][k] for k in after})
    pool.close()
    return {
        "seconds": {name: statistics.median(values) for name, values in steps.items()},
        "per_round_trip": {
            side: {k: statistics.median(c[k] for c in runs_) for k in runs_[0]} for side, runs_ in counts.items()
        },
    }


def breakdown_text(parts: dict[str, dict[int, dict]]) -> str:
    lines = ["where the time goes (median of each step alone; the model's 'channel + ...' includes its own steps):"]
    for library, by_size in parts.items():
        for n, part in by_size.items():
            lines.append(f"  {library} at {n:,} rows:")
            lines += [f"    {name:45} {seconds * 1000:9.3f} ms" for name, seconds in part["seconds"].items()]
            for side, counted in part["per_round_trip"].items():
                lines.append(f"    per round trip, {side:13} " + ", ".join(f"{k} {v:g}" for k, v in counted.items()))
    return "\n".join(lines)


def targets(rows: dict[str, dict[int, float]], sizes: list[int]) -> list[dict]:
    """Issue 17's targets, each with the measured figure and whether it holds."""
    big, small, found = max(sizes), 1000, []
    floor = rows["memcpy x2 (floor)"][big]
    for library, limit in (("pyarrow", 1.5), ("pandas", 2.0), ("polars", 2.0)):
        ratio = rows[f"modelpex shm {library}"][big] / floor
        found.append({"target": f"{big:,} rows {library}: within {limit}x of two memcpys", "value": f"{ratio:.2f}x",
                      "met": ratio <= limit})  # fmt: skip
    for library in ("pandas", "polars"):
        ratio = rows[f"seed pickle {library}"][big] / rows[f"modelpex shm {library}"][big]
        found.append({"target": f"{big:,} rows {library}: at least 30x faster than pickle", "value": f"{ratio:.1f}x",
                      "met": ratio >= 30})  # fmt: skip
    if small in sizes:
        for library in OURS:
            ours = rows[f"modelpex shm {library}"][small]
            seed = rows.get(f"seed pickle {library}", rows["seed pickle pandas"])[small]
            found.append({"target": f"1,000 rows {library}: under 0.5 ms", "value": f"{ours * 1000:.3f} ms",
                          "met": ours < 0.0005})  # fmt: skip
            found.append({"target": f"1,000 rows {library}: faster than pickle", "value": f"{seed / ours:.2f}x",
                          "met": ours < seed})  # fmt: skip
    return found


def targets_text(found: list[dict]) -> str:
    lines = [f"{'target':60} {'measured':>12}  met"]
    lines += [f"{t['target']:60} {t['value']:>12}  {'yes' if t['met'] else 'NO'}" for t in found]
    return "\n".join(lines)


def table_text(rows: dict[str, dict[int, float]], sizes: list[int]) -> str:
    head = f"{'':24}" + "".join(f"{n:>13,}" for n in sizes)
    lines = [head]
    for name, values in rows.items():
        lines.append(f"{name:24}" + "".join(f"{values[n]:13.6f}" if n in values else f"{'skipped':>13}" for n in sizes))
    return "\n".join(lines)


def plot(rows: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for name, values in rows.items():
        sizes = sorted(values)
        style = "--" if name.startswith("seed") else (":" if name.startswith("memcpy") else "-")
        ax.plot(sizes, [values[n] for n in sizes], style, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows")
    ax.set_ylabel("round trip (s)")
    ax.set_title("Round trip orchestrator -> model process -> orchestrator")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "ipc.json")
    parser.add_argument("--quick", action="store_true", help="sizes up to 10^4, fewer repeats (seconds)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker)
    # N.B. Here, not at the top: the worker (this file too) must not pay for git in its measured start-up.
    from benchmarks.results import write

    sizes = QUICK_SIZES if args.quick else SIZES
    repeats = 3 if args.quick else 9
    rows: dict[str, dict[int, float]] = {}
    for kind in SEED:
        print(f"seed method (pickle through a pipe): {kind}", file=sys.stderr)
        rows[f"seed pickle {kind}"] = seed_round_trips(kind, sizes, repeats)
    worker_ = Worker()
    parts: dict[str, dict[int, dict]] = {}
    try:
        for library in OURS:
            print(f"modelpex shared memory: {library}", file=sys.stderr)
            rows[f"modelpex shm {library}"] = our_round_trips(library, sizes, repeats, worker_)
        for library in OURS:
            print(f"where the time goes: {library}", file=sys.stderr)
            parts[library] = {n: breakdown(library, n, repeats, worker_) for n in (1000, max(sizes))}
    finally:
        worker_.close()
    rows["memcpy x2 (floor)"], nbytes = memcpy_floor(sizes, repeats)
    print(table_text(rows, sizes))
    skipped = [n for n in sizes if n > SLOW_LIMIT]
    if skipped:
        print(f"(dict and pydantic skipped above {SLOW_LIMIT:,} rows: minutes per run with pickle)")
    print(f"worker start-up (not in the round trips): {worker_.startup_seconds:.3f} s")
    big = max(sizes)
    ratios = {
        f"{lib} vs seed": rows[f"seed pickle {lib}"][big] / rows[f"modelpex shm {lib}"][big]
        for lib in ("pandas", "polars")
    }
    ratios |= {f"{lib} vs memcpy": rows[f"modelpex shm {lib}"][big] / rows["memcpy x2 (floor)"][big] for lib in OURS}
    small = [n for n in sizes if n <= 1000]
    worst_small = {lib: max(rows[f"modelpex shm {lib}"][n] for n in small) for lib in OURS}
    print(f"at {big:,} rows ({nbytes[big] / 1e6:.0f} MB): " + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items()))
    print("worst round trip at <= 1,000 rows: " + ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in worst_small.items()))
    print(breakdown_text(parts))
    found = targets(rows, sizes)
    print(targets_text(found))
    figures = {
        "sizes": sizes,
        "bytes": nbytes,
        "rows": rows,
        "ratios_at_largest": ratios,
        "worst_at_1000_rows_s": worst_small,
        "breakdown": {lib: {str(n): part for n, part in by_size.items()} for lib, by_size in parts.items()},
        "targets": found,
        "worker_startup_s": worker_.startup_seconds,
        "skipped_above": SLOW_LIMIT,
        "quick": args.quick,
    }
    written = write(args.json, figures)
    commit, load = written["commit"], written["load"]
    print(f"commit {commit['id'][:12]}{' (with changes)' if commit['dirty'] else ''}, {load['cores']} cores, "
          f"load average {load['start']['1min']:.2f} at the start, {load['end']['1min']:.2f} at the end")  # fmt: skip
    plot(rows, args.json.with_suffix(".png"))
    print(f"wrote {args.json} and {args.json.with_suffix('.png')}")


if __name__ == "__main__":
    main()
