"""The code base stays as ruff's configuration in pyproject.toml says (lint rules and formatting)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATHS = ["orchestrator", "base_env", "tests", "benchmarks", "model_packages"]


def test_ruff_check_and_format() -> None:
    ruff = Path(sys.executable).with_name("ruff")
    for command in (["check"], ["format", "--check"]):
        done = subprocess.run([str(ruff), *command, *PATHS], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
