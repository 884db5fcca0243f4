"""Build: the base pex from a pex lock, and a small pex per model version layered on it, each by content key.

A model pex holds only the model's sources and the locked dependencies the base does not ship; it runs in pex's
``--venv`` mode with the base on its build-time pex path, named by the base's content key (field notes: that
reached plain-venv warm-start speed). Nothing is rebuilt whose key exists; builds go to a work directory under
a per-key file lock and are published atomically by the store.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from orchestrator.errors import BuildError, DependencyConflictError, ModelpexWarning, RecordError, SpecError
from orchestrator.files import staged
from orchestrator.specs import (
    BASE_DISTRIBUTION,
    BaseEnv,
    ModelSpec,
    check_sources,
    locked_versions,
    read_lock,
    tree_digest,
)
from orchestrator.store import ArtifactRecord, PexStore
from orchestrator.versions import ModelSource

__all__ = [
    "BuildResult",
    "Builder",
    "Interpreter",
    "layer_args",
    "lock_base",
    "pex_command",
    "lock_model",
    "model_requirements",
]

# N.B. Bump when the pex flags below change what an artifact contains: it is part of every key.
RECIPE = "modelpex-recipe-2"
# N.B. pex's vendored pip (20.3.4) cannot bootstrap newer pips here; 25.3 resolves and builds offline from cache.
PIP_VERSION = "25.3"
LOCK_SYSTEM = ("--style", "universal", "--target-system", "linux", "--interpreter-constraint", "CPython>=3.11,<3.14")
RUNTIME_MODULE = "modelpex_runtime"
KEY_LENGTH = 32

Step = Callable[[str], None]


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:KEY_LENGTH]


def _pex_version() -> str:
    from pex.version import __version__

    return __version__


@dataclass(frozen=True)
class Interpreter:
    """The Python that runs the pexes; its identity is part of the base key (wheels are per ABI and platform).

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


@dataclass(frozen=True)
class BuildResult:
    """A published artifact and whether this call built it or found it in the store."""

    record: ArtifactRecord
    cached: bool
    seconds: float


def model_requirements(spec: ModelSpec, pins: dict[str, str]) -> list[str]:
    """The model's requirements the base does not satisfy; a requirement the base pins differently is an error.

    N.B. pex cannot see a conflict across layers: with ``--exclude`` a model asking for ``numpy>=3`` would
    silently run on the base's numpy (field notes). So every requirement on a package the base ships is checked
    against the base's exact version here, before anything is resolved.
    """
    extra = []
    for text in spec.requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        if name not in pins:
            extra.append(text)
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            raise DependencyConflictError(
                f"model {spec.name!r} {spec.version} requires {text!r} but the base ships {name} {pins[name]}: "
                f"relax the requirement in {spec.folder / 'pyproject.toml'}, or change base_env and rebuild the base"
            )
    return extra


def _lock_excludes(spec: ModelSpec, extra: list[str], pins: dict[str, str]) -> list[str]:
    """Check the model's lock against its requirements and the base; return the locked names the base ships."""
    fix = f"run `modelpex lock {spec.name}` and commit {spec.lock_file}"
    lock = read_lock(spec.lock_file, what=f"model {spec.name!r} (it needs {', '.join(extra)} beyond the base)", fix=fix)
    locked_for = sorted(str(Requirement(r)) for r in lock.get("requirements", []))  # type: ignore[union-attr]
    if locked_for != sorted(str(Requirement(r)) for r in extra):
        raise SpecError(f"the lock of model {spec.name!r} was made for {locked_for}, not for {sorted(extra)}: {fix}")
    overlap = []
    for name, version in locked_versions(lock).items():
        if name in pins and pins[name] != version:
            raise DependencyConflictError(
                f"model {spec.name!r} {spec.version} locks {name} {version} but the base ships {name} {pins[name]}: "
                f"{fix} so it resolves against the current base"
            )
        overlap += [name] if name in pins else []
    return overlap


def _run(command: Sequence[str], *, what: str, cwd: Path | None = None) -> str:
    """Run a build command; on failure raise `BuildError` with the tail of its output."""
    done = subprocess.run(list(command), capture_output=True, text=True, cwd=cwd, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
        raise BuildError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def layer_args(base_filename: str) -> list[str]:
    """pex flags that layer a pex over the base: venv mode with the base on its (relative) build-time pex path.

    N.B. Relative on purpose: pex resolves it against the working directory when it first creates the model's
    venv, and the runner starts the model in a directory holding the verified base under this name, so the
    artifact's bytes stay independent of where any store lives. ``--sh-boot`` with a build-time pex path is what
    reached plain-venv warm-start speed (field notes); ``PEX_PATH`` at run time would disable sh-boot's fast path.
    """
    return ["--venv", "--sh-boot", "--pex-path", base_filename]


def pex_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pex", "--pip-version", PIP_VERSION, *args]


def pex3_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from pex.cli.pex import main; sys.exit(main())", *args]


def _write_lock(command: list[str], destination: Path, what: str) -> Path:
    with staged(destination) as temporary:
        _run([*command, "--indent", "2", "-o", str(temporary)], what=what)
    return destination


def lock_base(base: BaseEnv) -> Path:
    """(Re)create ``base_env/pex.lock`` from the base project's dependencies (needs the package index)."""
    command = pex3_command("lock", "create", "--project", str(base.folder), *LOCK_SYSTEM, "--pip-version", PIP_VERSION)
    return _write_lock(command, base.lock_file, "locking the base environment")


def lock_model(spec: ModelSpec, base: BaseEnv) -> Path | None:
    """(Re)create the model's ``pex.lock`` for what it needs beyond the base, constrained to the base's pins."""
    pins = base.pins()
    extra = model_requirements(spec, pins)
    if not extra:
        spec.lock_file.unlink(missing_ok=True)
        return None
    with tempfile.TemporaryDirectory(prefix="modelpex-pins-") as tmp:
        constraints = Path(tmp) / "base-pins.txt"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items()) if n != BASE_DISTRIBUTION))
        command = pex3_command("lock", "create", *extra, "--constraints", str(constraints), *LOCK_SYSTEM)
        return _write_lock([*command, "--pip-version", PIP_VERSION], spec.lock_file, f"locking model {spec.name!r}")


class Builder:
    """Builds or finds the base and model pexes of one base environment for one interpreter, in one store."""

    def __init__(
        self, store: PexStore, base: BaseEnv, interpreter: Interpreter | None = None, step: Step | None = None
    ):
        self.store = store
        self.base_env = base
        self.interpreter = interpreter or Interpreter.detect()
        self.step = step or (lambda message: None)

    @functools.cached_property
    def base_key(self) -> str:
        """Content key of the base: its lock and runtime sources, the interpreter and platform, the recipe."""
        return _key(RECIPE, _pex_version(), tree_digest(self.base_env.folder), self.interpreter.identity)

    def model_key(self, digest: str) -> str:
        """Content key of a model pex: the digest of its folder (`tree_digest`) and the base key."""
        return _key(RECIPE, _pex_version(), digest, self.base_key)

    def base(self, *, force: bool = False) -> BuildResult:
        """The base pex for the current base_env, built only when its key is not in the store."""
        record = ArtifactRecord(
            "base", "base", self.base_env.version, self.base_key, interpreter=self.interpreter.identity
        )
        return self._publish(record, self._build_base, force=force)

    def model(self, source: ModelSource, *, force: bool = False) -> BuildResult:
        """The pex of one model version against the current base (built first if needed)."""
        spec = source.spec
        check_sources(spec)
        base = self.base().record
        pins = self.base_env.pins()
        extra = model_requirements(spec, pins)
        overlap = _lock_excludes(spec, extra, pins) if extra else []
        record = ArtifactRecord(
            "model",
            spec.name,
            spec.version,
            self.model_key(tree_digest(spec.folder)),
            base_key=base.key,
            git_commit=source.commit,
            interpreter=self.interpreter.identity,
            details={"train": spec.train, "predict": spec.predict, "frames": spec.frames, "requirements": extra},
        )
        return self._publish(record, lambda work: self._build_model(spec, base, extra, overlap, work), force=force)

    def _publish(self, record: ArtifactRecord, build: Callable[[Path], Path], *, force: bool) -> BuildResult:
        started = time.perf_counter()
        existing = None if force else self._existing(record, force=False)
        if existing is not None:
            return BuildResult(existing, True, time.perf_counter() - started)
        self.store.check_writable(f"build {record.label}")
        with self.store.lock(f"{record.kind}-{record.key}"):
            existing = self._existing(record, force=force)
            if existing is not None and not force:
                return BuildResult(existing, True, time.perf_counter() - started)
            with self.store.work_dir() as work:
                self.step(f"building {record.label} (key {record.key})")
                path = build(work)
                finished = record.finished(path, build_seconds=round(time.perf_counter() - started, 3))
                # N.B. Forced, the old artifact stays published until the new one replaces it: a kill mid-build
                # loses nothing.
                published = self.store.put(finished, path, replace=force)
        return BuildResult(published, False, time.perf_counter() - started)

    def _existing(self, record: ArtifactRecord, *, force: bool) -> ArtifactRecord | None:
        """The stored record of exactly this artifact; forced, an unreadable or foreign one is reported and replaced."""
        try:
            return self.store.record(record.kind, record.name, record.key, record.version)
        except RecordError as exc:
            if not force:
                raise
            warnings.warn(f"replacing index record {exc.where}, which {exc.problem}", ModelpexWarning, stacklevel=2)
            return None

    def _build_base(self, work: Path) -> Path:
        self.base_env.pins()  # N.B. Fails with "run `modelpex lock base`" before pex does, if the lock is missing.
        self.step("building the model-side runtime wheel")
        wheel = _run(
            [sys.executable, "-c", _BUILD_WHEEL, str(work)],
            what="building the modelpex-base wheel",
            cwd=self.base_env.folder,
        ).strip()
        self.step("building the base pex from base_env/pex.lock (about a minute when the wheels are cached)")
        output = work / f"base-{self.base_key}.pex"
        _run(
            pex_command(
                "--lock",
                str(self.base_env.lock_file),
                "--project",
                str(work / wheel),
                "--python",
                self.interpreter.path,
                "--venv",
                "--sh-boot",
                "-o",
                str(output),
            ),
            what="building the base pex",
        )
        return output

    def _build_model(
        self, spec: ModelSpec, base: ArtifactRecord, extra: list[str], overlap: list[str], work: Path
    ) -> Path:
        output = work / f"{spec.name}.pex"
        (work / base.filename).symlink_to(self.store.fetch(base))
        resolve = ["--lock", str(spec.lock_file), *extra, *(f"--exclude={n}" for n in overlap)] if extra else []
        _run(
            pex_command(
                "-D",
                str(spec.source_dir),
                *resolve,
                "--python",
                self.interpreter.path,
                *layer_args(base.filename),
                "-m",
                RUNTIME_MODULE,
                "--inject-env",
                f"MODELPEX_MODEL={spec.entry_env()}",
                "-o",
                str(output),
            ),
            what=f"building model {spec.name!r} {spec.version}",
            cwd=work,
        )
        return output


_BUILD_WHEEL = "import sys; from hatchling.build import build_wheel; print(build_wheel(sys.argv[1]))"
