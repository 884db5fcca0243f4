"""Benchmarks stay alive: each runs in ``--quick`` mode, its results keep the shape of the committed ones, and every
committed results file says which commit it measured and under which load (`benchmarks/results.py`).

N.B. Keys, never timings: a timed assertion on a shared 2-core machine fails on its neighbours' load, not on our
code. The figures themselves are what README quotes, from the committed files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# Each benchmark, with the committed results file a full run of it writes.
BENCHMARKS = {
    "build": "build.json",
    "calls": "calls.json",
    "definitions": "definitions.json",
    "ipc": "ipc.json",
    "redeploy": "redeploy.json",
    "scale": "scale.json",
}
# Results files re-run in full since every benchmark records its commit and load. N.B. The others still hold figures
# measured before `benchmarks/results.py`: add each here once it is re-run in full, until this is every file.
RE_RUN: set[str] = set()
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


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_a_quick_run_writes_the_committed_results_keys(name: str, tmp_path: Path) -> None:
    """Runs the benchmark for real, in --quick mode, into a folder of the test's own."""
    out = tmp_path / f"{name}.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, f"benchmarks/{name}.py --quick failed:\n{done.stderr[-3000:]}"
    written = json.loads(out.read_text())
    committed = json.loads((RESULTS / BENCHMARKS[name]).read_text())
    assert shape(written) == shape(committed), (
        f"benchmarks/{name}.py --quick and the committed results/{BENCHMARKS[name]} differ in keys: only in the "
        f"quick run {sorted(shape(written) - shape(committed))}, only in the committed file "
        f"{sorted(shape(committed) - shape(written))}: re-run it in full and commit its results"
    )
    assert out.with_suffix(".png").stat().st_size > 0, "each benchmark draws its figures beside its JSON"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert written["commit"]["id"] == commit.strip()
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
