"""Results: the one way every benchmark writes its JSON, stamped with what it measured and under which load.

A figure without its commit cannot be compared with the code that follows it, and one measured on a busy machine
(2 cores shared by everything else that runs here) can be several times off: every results file records the commit
(``git rev-parse HEAD``, and whether the work tree had uncommitted changes) and the machine's load average when the
benchmark started (this module's import) and when it wrote its results. tests/test_benchmarks.py checks both.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["provenance", "write"]

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


# N.B. Taken at import, which every benchmark does before its first measurement: the code it runs (a commit made or
# an edit saved while it runs changes nothing it measures) and the load it started under.
_COMMIT_AT_START = {
    "id": _git("rev-parse", "HEAD"),
    "dirty": _git("status", "--porcelain", "--untracked-files=no") != "",
}
_LOAD_AT_START = os.getloadavg()


def _load(averages: tuple[float, float, float]) -> dict[str, float]:
    return dict(zip(("1min", "5min", "15min"), (round(value, 2) for value in averages), strict=True))


def provenance() -> dict[str, Any]:
    """The ``commit`` measured (its id, and ``dirty`` when the work tree differed from it as the benchmark started) and
    the machine's ``load`` (load averages at the benchmark's start and end, and the cores they share)."""
    return {
        "commit": _COMMIT_AT_START,
        "load": {"start": _load(_LOAD_AT_START), "end": _load(os.getloadavg()), "cores": os.cpu_count()},
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write(path: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Write ``payload`` with its `provenance` to ``path`` as JSON, whole or not at all; return what was written."""
    from orchestrator.files import write_atomic

    figures = {**payload, **provenance()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(figures, indent=2) + "\n", 0o644, durable=False)
    return figures
