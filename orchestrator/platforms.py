"""Platforms: the interpreter that runs pexes here, the platform a build targets, and whether one runs the other's.

A build targets either this machine's interpreter (native) or a pex *complete platform*: the PEP 508 marker
environment and the compatible wheel tags of the workers' interpreter, written on a worker by
``pex3 interpreter inspect --markers --tags -o FILE``. A laptop or a CI runner on another OS builds for Linux
workers that way. The target is part of the base key and is recorded in the base's index record; a worker compares
that record with its own interpreter before anything of the artifact runs, and refuses what was built for another
platform (`check_runs_here`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.tags import parse_tag

from orchestrator.errors import BuildError, PlatformError
from orchestrator.store import ArtifactRecord

__all__ = [
    "PLATFORM_DETAIL",
    "CompletePlatform",
    "Interpreter",
    "check_runs_here",
    "inspect_hint",
    "pex3_command",
    "recorded_platform",
]

# N.B. Where a base's index record keeps the complete platform it was built for (absent: built natively).
PLATFORM_DETAIL = "complete_platform"
_MARKER_NAMES = frozenset(default_environment())
# N.B. The markers that decide which distributions a lock resolves to (with the tags). The kernel's release and
# version and the Python patch level differ between workers of one fleet without changing any wheel.
_RESOLVE_MARKERS = (
    "implementation_name",
    "os_name",
    "platform_machine",
    "platform_python_implementation",
    "platform_system",
    "python_version",
    "sys_platform",
)


def pex3_command(*args: str) -> list[str]:
    """pex's ``pex3`` command (locks, interpreter inspection) run by the orchestrator's own Python."""
    return [sys.executable, "-c", "import sys; from pex.cli.pex import main; sys.exit(main())", *args]


def inspect_hint(python: str = "") -> str:
    """The command that writes an interpreter's complete platform file, as messages show it."""
    return f"`pex3 interpreter inspect --markers --tags{f' --python {python}' if python else ''} -o FILE`"


@dataclass(frozen=True)
class CompletePlatform:
    """A pex complete platform: a marker environment and compatible tags, most specific first.

    N.B. Only these two fields count (pex ignores the rest, such as the ``path`` of the interpreter inspected), so
    the same platform inspected on two workers has one digest, and so one base key.
    """

    markers: tuple[tuple[str, str], ...]
    tags: tuple[str, ...]

    @classmethod
    def parse(cls, data: object) -> CompletePlatform:
        """From pex's JSON object; a `PlatformError` says what is missing or wrong (the caller names the source)."""
        if not isinstance(data, dict):
            raise PlatformError(f"is a JSON {type(data).__name__}, not an object")
        markers, tags = data.get("marker_environment"), data.get("compatible_tags")
        if not isinstance(markers, dict) or not isinstance(tags, list) or not tags:
            raise PlatformError("lacks a marker_environment object or a non-empty compatible_tags list")
        wrong = sorted(k for k, v in markers.items() if k not in _MARKER_NAMES or not isinstance(v, str))
        if wrong:
            raise PlatformError(f"has marker_environment entries that are not PEP 508 strings ({', '.join(wrong)})")
        for tag in tags:
            try:
                if not isinstance(tag, str):
                    raise ValueError(tag)
                parse_tag(tag)
            except ValueError:
                raise PlatformError(f"has {tag!r} among its compatible_tags, which is not a wheel tag") from None
        return cls(tuple(sorted(markers.items())), tuple(tags))

    @classmethod
    def load(cls, path: str | os.PathLike[str], what: str) -> CompletePlatform:
        """Read and validate a complete platform file; errors are one line naming ``what`` (the option) and the fix."""
        fix, problem = f"generate it on a worker with {inspect_hint()}", f"{what} {path} is not a pex complete platform"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise PlatformError(f"{what} {path}: cannot read it ({reason}): {fix}") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise PlatformError(f"{problem}: it is not JSON ({exc}): {fix}") from None
        try:
            return cls.parse(data)
        except PlatformError as exc:
            raise PlatformError(f"{problem}: it {exc}: {fix}") from None

    @property
    def marker_environment(self) -> dict[str, str]:
        return dict(self.markers)

    def to_json(self) -> dict[str, object]:
        """pex's format, as `parse` reads it and as ``--complete-platform`` takes it."""
        return {"marker_environment": self.marker_environment, "compatible_tags": list(self.tags)}

    @functools.cached_property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def describe(self) -> str:
        """Short, for messages and records: the most specific tag and the digest."""
        return f"{self.tags[0]} (complete platform {self.digest[:12]})"

    def refusal(self, worker: CompletePlatform) -> str | None:
        """Why an artifact built for this platform may not run on ``worker``; ``None`` when it may.

        N.B. pex picked each wheel by this platform's tags, so every one of them must be a tag the worker's
        interpreter accepts (a worker with a newer glibc accepts everything built for an older one, not the
        reverse); and the markers that select dependencies must agree.
        """
        markers, theirs = self.marker_environment, worker.marker_environment
        for name in _RESOLVE_MARKERS:
            if name in markers and markers[name] != theirs.get(name):
                return f"its {name} is {markers[name]!r}, the worker's {theirs.get(name)!r}"
        accepted = {str(t) for tag in worker.tags for t in parse_tag(tag)}
        foreign = [tag for tag in self.tags if not {str(t) for t in parse_tag(tag)} <= accepted]
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            return f"the worker's interpreter does not accept its tag {foreign[0]}{more}"
        return None


@dataclass(frozen=True)
class Interpreter:
    """The Python that runs the pexes; its identity is part of a native base key (wheels are per ABI and platform).

    N.B. ``path`` is the real interpreter behind a venv's ``python`` symlink: model processes run it as another
    user, outside the orchestrator's venv, which may sit in a folder that user cannot enter.
    """

    path: str
    identity: str

    @classmethod
    @functools.cache
    def detect(cls, path: str | None = None) -> Interpreter:
        path = os.path.realpath(path or sys.executable)
        probe = (
            "import json, platform, sys, sysconfig; print(json.dumps([sys.implementation.name, "
            "platform.python_version(), sysconfig.get_platform(), *platform.libc_ver()]))"
        )
        try:
            out = subprocess.run([path, "-I", "-c", probe], capture_output=True, text=True, check=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BuildError(f"cannot run the interpreter {path} ({exc}): pass an existing Python 3.11+") from None
        return cls(path, "-".join(json.loads(out.stdout)))

    @functools.cached_property
    def platform(self) -> CompletePlatform:
        """This interpreter's complete platform, inspected by pex as it inspects a worker's (cached by pex)."""
        done = subprocess.run(
            pex3_command("interpreter", "inspect", "--markers", "--tags", "--python", self.path),
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            if done.returncode != 0:
                raise ValueError(done.stderr.strip().splitlines()[-1:] or done.returncode)
            return CompletePlatform.parse(json.loads(done.stdout))
        except ValueError as exc:
            raise PlatformError(f"cannot inspect the platform of the interpreter {self.path} ({exc})") from None


def recorded_platform(record: ArtifactRecord) -> CompletePlatform | None:
    """The complete platform a base was built for, from its index record; ``None`` for a native build."""
    data = record.details.get(PLATFORM_DETAIL)
    if data is None:
        return None
    try:
        return CompletePlatform.parse(data)
    except PlatformError as exc:
        raise PlatformError(
            f"refusing to run on base {record.key}: the complete platform in its index record {exc}; rebuild it "
            "with `modelpex build base --force`"
        ) from None


def check_runs_here(base: ArtifactRecord, artifact: ArtifactRecord, interpreter: Interpreter) -> None:
    """Refuse, in one line, an artifact whose base was built for a platform ``interpreter`` is not.

    N.B. Called before anything of the artifact is copied, unpacked or run: a refusal leaves nothing behind.
    """
    target = recorded_platform(base)
    fix = (
        f"build for this worker: write its platform here with {inspect_hint(interpreter.path)}, then "
        "`modelpex build --complete-platform FILE` and point MODELPEX_COMPLETE_PLATFORM at FILE on this worker "
        "(or unset MODELPEX_COMPLETE_PLATFORM to build natively here)"
    )
    if target is None:
        if base.interpreter and base.interpreter != interpreter.identity:
            raise PlatformError(
                f"refusing to run {artifact.label}: its base {base.key} was built for the interpreter "
                f"{base.interpreter}, but this worker runs {interpreter.identity} ({interpreter.path}); {fix}"
            )
        return
    problem = target.refusal(interpreter.platform)
    if problem is not None:
        raise PlatformError(
            f"refusing to run {artifact.label}: its base {base.key} was built for {target.describe()}, not for "
            f"this worker's {interpreter.platform.describe()} ({interpreter.path}): {problem}; {fix}"
        )
