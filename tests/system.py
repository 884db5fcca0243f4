"""The machine's own programs the tests start (bubblewrap, PostgreSQL, redis-server, chromium...): found, or each
test that needs one is skipped, naming its Debian package and the command that installs it.

N.B. The list is `.ci/setup`'s ``system_packages``, read from there: one place says what the tests need, and set-up
installs exactly that. Under ``CI=true`` a skipped test fails the run instead (`tests/conftest.py`), so CI cannot
pass without them.
"""

from __future__ import annotations

import functools
import glob
import re
import shutil
from pathlib import Path

import pytest

__all__ = ["find", "require", "requires"]

SETUP = Path(__file__).resolve().parents[1] / ".ci" / "setup"


@functools.cache
def packages() -> dict[str, tuple[str, str]]:
    """Binary name -> (Debian package, probe), from `.ci/setup`'s ``system_packages`` lines ``"package probe"``."""
    text = SETUP.read_text()
    start = text.index("system_packages=(")
    block = text[start : text.index("\n)", start)]
    return {Path(probe).name: (package, probe) for package, probe in re.findall(r'^\s*"(\S+) (\S+)"', block, re.M)}


def find(binary: str) -> str | None:
    """Where ``binary`` is: on PATH, or where its package's probe looks (PostgreSQL's server tools are off PATH)."""
    package = packages().get(binary)
    if package is not None and package[1].startswith("/") and (matches := sorted(glob.glob(package[1]))):
        return matches[-1]
    return shutil.which(binary)


def _missing(binaries: tuple[str, ...]) -> tuple[list[str], str]:
    """The binaries not found and, if any, the reason a test that needs them is skipped (one line)."""
    unknown = [binary for binary in binaries if binary not in packages()]
    if unknown:
        raise KeyError(f"{', '.join(unknown)}: not among .ci/setup's system_packages; add a line there")
    missing = [binary for binary in binaries if find(binary) is None]
    names = " ".join(dict.fromkeys(packages()[binary][0] for binary in missing))
    return missing, f"no {', '.join(missing)}: apt-get install --no-install-recommends {names} (.ci/setup does as root)"


def requires(*binaries: str) -> pytest.MarkDecorator:
    """A mark (on a test, or a module's ``pytestmark``): skip unless every one of ``binaries`` is installed."""
    missing, reason = _missing(binaries)
    return pytest.mark.skipif(bool(missing), reason=reason)


def require(*binaries: str) -> None:
    """The same inside a fixture: skip every test that uses it unless each of ``binaries`` is installed."""
    missing, reason = _missing(binaries)
    if missing:
        pytest.skip(reason)
