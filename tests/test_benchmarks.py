"""Benchmarks stay alive: each runs in ``--quick`` mode, its results keep the shape of the committed ones, and every
committed results file says which commit it measured and under which load (`benchmarks/results.py`).

N.B. Keys, never timings: a timed assertion on a shared 2-core machine fails on its neighbours' load, not on our
code. The figures themselves are what README quotes, from the committed files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .servers import log_tail, spawn, terminate

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# Each benchmark, with the committed results file a full run of it writes.
BENCHMARKS = {
    "build": "build.json",
    "calls": "calls.json",
    "coldstart": "coldstart.json",
    "definitions": "definitions.json",
    "ipc": "ipc.json",
    "redeploy": "redeploy.json",
    "scale": "scale.json",
}
# A benchmark that is a mode of another's script: its script and the flag that selects it.
MODES = {"coldstart": ("scale", "--coldstart")}
# Results files re-run in full since every benchmark records its commit and load. N.B. The others still hold figures
# measured before `benchmarks/results.py`: add each here once it is re-run in full, until this is every file.
RE_RUN = {"coldstart.json", "definitions.json"}
# What `benchmarks/results.py` adds to every file; the quick run's own, not compared with the committed file's.
PROVENANCE = {"commit", "load", "measured_at"}

pytestmark = pytest.mark.benchmarks


def key_paths(value: object, prefix: str = "") -> set[str]:
    """Every key path in a results document (``per_call.cold_process_s``). A mapping keyed by numbers (row counts,
    sizes) is data, not shape: it counts as one leaf, since a quick run measures fewer sizes than a full one."""
    if not isinstance(value, dict) or not value or all(str(key).isdigit() for key in value):
        return set()
    paths: set[str] = set()
    for key, item in value.items():
        path = f"{prefix}{key}"
        paths |= {path, *key_paths(item, f"{path}.")}
    return paths


def shape(document: dict) -> set[str]:
    return {path for path in key_paths(document) if path.split(".")[0] not in PROVENANCE}


@dataclass
class QuickRun:
    """One benchmark's ``--quick`` run, started with the others (`quick_runs`)."""

    name: str
    out: Path
    log: Path
    commit: str
    process: subprocess.Popen

    @classmethod
    def start(cls, name: str, folder: Path) -> QuickRun:
        out, log = folder / f"{name}.json", folder / f"{name}.log"
        script, *mode = MODES.get(name, (name,))
        command = [sys.executable, str(REPO / "benchmarks" / f"{script}.py"), *mode, "--quick", "--json", str(out)]
        # N.B. The commit checked out as it starts: what it must record, whatever is committed while it runs.
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        with open(log, "wb") as output:
            return cls(name, out, log, commit.strip(), spawn(command, stdout=output, cwd=folder))

    def wait(self) -> dict:
        """Its results, once it has finished (this test's timeout bounds the wait)."""
        returncode = self.process.wait()
        assert returncode == 0, f"benchmarks/{self.name}.py --quick exited with {returncode}:\n{log_tail(self.log, 40)}"
        return json.loads(self.out.read_text())


@pytest.fixture(scope="module")
def quick_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, QuickRun]]:
    """Every benchmark's quick run, all started at once: much of each is waiting (for a sensor tick, a server, a
    process start), which the others' work fills, so together they take little more than the longest alone. Their
    timings suffer from it, and nothing here reads a timing. Whatever still runs at the end is stopped with its
    servers (`tests.servers.terminate`, the whole process group)."""
    folder = tmp_path_factory.mktemp("benchmarks")
    # N.B. Only those whose test was selected (``-k ipc`` runs one).
    selected = {
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_a_quick_run_writes_the_committed_results_keys"
    }
    runs = {name: QuickRun.start(name, folder) for name in sorted(selected)}
    try:
        yield runs
    finally:
        for run in runs.values():
            terminate(run.process, 30, group=True)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_a_quick_run_writes_the_committed_results_keys(name: str, quick_runs: dict[str, QuickRun]) -> None:
    """Runs the benchmark for real, in --quick mode, into a folder of the test's own."""
    run = quick_runs[name]
    written = run.wait()
    out = run.out
    committed = json.loads((RESULTS / BENCHMARKS[name]).read_text())
    assert shape(written) == shape(committed), (
        f"benchmarks/{name}.py --quick and the committed results/{BENCHMARKS[name]} differ in keys: only in the "
        f"quick run {sorted(shape(written) - shape(committed))}, only in the committed file "
        f"{sorted(shape(committed) - shape(written))}: re-run it in full and commit its results"
    )
    assert out.with_suffix(".png").stat().st_size > 0, "each benchmark draws its figures beside its JSON"
    assert written["commit"]["id"] == run.commit
    assert set(written["load"]) == {"start", "end", "cores"}


def test_results_record_their_commit_and_load() -> None:
    """Each re-run results file names the commit it measured (one of this repository's) and the load it ran under."""
    for filename in sorted(RE_RUN):
        assert_provenance(filename)


def assert_provenance(filename: str) -> None:
    results = json.loads((RESULTS / filename).read_text())
    assert {"commit", "load"} <= set(results), f"results/{filename} does not record its commit and load: re-run it"
    known = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{results['commit']['id']}^{{commit}}"], capture_output=True
    )
    assert known.returncode == 0, f"results/{filename} measured {results['commit']['id']}, not a commit of ours"
    assert isinstance(results["commit"]["dirty"], bool)
    assert all(0 <= results["load"][when]["1min"] for when in ("start", "end"))


def test_every_committed_results_file_is_listed() -> None:
    """A new results file is either a benchmark's or a variant of one, and joins RE_RUN when it records its commit."""
    committed = {path.name for path in RESULTS.glob("*.json")}
    assert set(BENCHMARKS.values()) <= committed
    assert RE_RUN <= committed
    assert committed - set(BENCHMARKS.values()) <= {"definitions-10-per-client.json"}
