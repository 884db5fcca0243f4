"""Build: the base pex from a pex lock, and a small pex per model version layered on it, each by content key.

A model pex holds only the model's sources and the locked dependencies the base does not ship; it runs in pex's
``--venv`` mode with the base on its build-time pex path, named by the base's content key (field notes: that
reached plain-venv warm-start speed). Nothing is rebuilt whose key exists; builds go to a work directory under
a per-key file lock and are published atomically by the store. Into a store other hosts fetch from (S3), a native
base is published a second time, unpacked and compiled (`Builder.unpacked`), so that a host without it does not
spend 16-18 s unpacking it (`orchestrator.cache`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
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

from orchestrator.cache import ArtifactCache, pack_unpacked
from orchestrator.errors import BuildError, DependencyConflictError, ModelpexWarning, RecordError, SpecError
from orchestrator.files import staged
from orchestrator.platforms import PLATFORM_DETAIL, CompletePlatform, Interpreter, pex3_command
from orchestrator.specs import (
    BASE_DISTRIBUTION,
    BaseEnv,
    ModelSpec,
    check_sources,
    locked_versions,
    read_lock,
    tree_digest,
)
from orchestrator.store import ArtifactRecord, PexStore, is_remote
from orchestrator.versions import ModelSource

__all__ = [
    "BuildResult",
    "Builder",
    "Interpreter",
    "Step",
    "layer_args",
    "lock_base",
    "lock_model",
    "model_requirements",
    "pex3_command",
    "pex_command",
]

# N.B. Bump when the pex flags below change what an artifact contains: it is part of every key. (Builds for a complete
# platform have keys of a new form, see `Builder.base_key`; native builds and their keys are unchanged.)
RECIPE = "modelpex-recipe-2"
# N.B. pex's vendored pip (20.3.4) cannot bootstrap newer pips here; 25.3 resolves and builds offline from cache.
PIP_VERSION = "25.3"
LOCK_SYSTEM = ("--style", "universal", "--target-system", "linux", "--interpreter-constraint", "CPython>=3.11,<3.14")
RUNTIME_MODULE = "modelpex_runtime"
# N.B. What the unpacked base holds, in its record: one made to another recipe is built again (`Builder.unpacked`).
UNPACKED_CONTENTS = "PEX_ROOT installed_wheels/, compiled, without the packages' test suites"
KEY_LENGTH = 32
_NO_WHEEL = re.compile(r"^\s*\d+\.\) (\S+ \S+) .*?does not have any compatible artifacts", re.MULTILINE)

Step = Callable[[str], None]


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:KEY_LENGTH]


def _pex_version() -> str:
    from pex.version import __version__

    return __version__


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
    """Run a build command; on failure raise `BuildError` with the tail of its output.

    N.B. pex lists every distribution of a lock that has no wheel for the target, over a hundred lines for a
    platform the lock does not cover: the first line names them, since the tail shows only the last.
    """
    done = subprocess.run(list(command), capture_output=True, text=True, cwd=cwd, check=False)
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        tail = "\n".join(output.splitlines()[-12:])
        missing = list(dict.fromkeys(_NO_WHEEL.findall(output)))
        if missing:
            raise BuildError(
                f"{what} failed: the lock has no wheel for this target of {', '.join(missing)}; build for a platform "
                f"the lock covers ({' '.join(LOCK_SYSTEM)}), or lock for this one:\n{tail}"
            )
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
    """Builds or finds the base and model pexes of one base environment, in one store, for one target: this
    interpreter (native), or the workers' complete platform (``platform``) when they run on another machine."""

    def __init__(
        self,
        store: PexStore,
        base: BaseEnv,
        interpreter: Interpreter | None = None,
        step: Step | None = None,
        *,
        platform: CompletePlatform | None = None,
    ):
        self.store = store
        self.base_env = base
        self.interpreter = interpreter or Interpreter.detect()
        self.step = step or (lambda message: None)
        self.platform = platform

    def for_platform(self, platform: CompletePlatform | None) -> Builder:
        """The same base environment and store, for another target."""
        return Builder(self.store, self.base_env, self.interpreter, self.step, platform=platform)

    @property
    def target(self) -> str:
        """What the artifacts are built for, as records say it: the interpreter's identity or the platform."""
        return self.platform.describe() if self.platform else self.interpreter.identity

    @functools.cached_property
    def base_key(self) -> str:
        """Content key of the base: its lock and runtime sources, the target (interpreter or complete platform),
        the recipe.

        N.B. A complete platform stands in for the interpreter: the key is then the same on every machine that
        builds for that platform (a laptop, CI, the workers themselves), and never one of a native build.
        """
        target = f"complete-platform {self.platform.digest}" if self.platform else self.interpreter.identity
        return _key(RECIPE, _pex_version(), tree_digest(self.base_env.folder), target)

    def model_key(self, digest: str) -> str:
        """Content key of a model pex: the digest of its folder (`tree_digest`) and the base key."""
        return _key(RECIPE, _pex_version(), digest, self.base_key)

    def base(self, *, force: bool = False) -> BuildResult:
        """The base pex for the current base_env, built only when its key is not in the store."""
        # N.B. Workers read the target from here before running anything built on this base (`check_runs_here`).
        details = {PLATFORM_DETAIL: self.platform.to_json()} if self.platform else {}
        record = ArtifactRecord(
            "base", "base", self.base_env.version, self.base_key, interpreter=self.target, details=details
        )
        result = self._publish(record, self._build_base, force=force)
        if not result.cached and is_remote(self.store.url):
            self.unpacked(result.record, force=force)
        return result

    def unpacked(self, base: ArtifactRecord, *, force: bool = False) -> BuildResult | None:
        """``base`` unpacked and compiled, as hosts install it (`orchestrator.cache`), published under its key once;
        ``None`` for a base built for a complete platform, which this interpreter cannot unpack.

        N.B. `base` publishes it with a new base only into a remote store: a host's own folder store is read by
        hosts whose PEX_ROOT `modelpex warm` fills directly, and would only hold 750 MB more (in the image, too).

        N.B. Tied to the base's bytes (``base_sha256``): after a forced rebuild of the base, hosts ignore the unpacked
        form of the old bytes until this publishes the new one. One made to an older recipe (``contents``: with the
        packages' test suites) is replaced.
        """
        if self.platform is not None:
            return None
        record = ArtifactRecord(
            "unpacked",
            base.name,
            base.version,
            base.key,
            base_key=base.key,
            git_commit=base.git_commit,
            interpreter=base.interpreter,
            details={"base_sha256": base.sha256, "contents": UNPACKED_CONTENTS},
        )
        existing = None if force else self._existing(record, force=False)
        current = {"base_sha256": base.sha256, "contents": UNPACKED_CONTENTS}
        if existing is not None and all(existing.details.get(k) == v for k, v in current.items()):
            return BuildResult(existing, True, 0.0)
        build = lambda work: self._build_unpacked(base, record, work)  # noqa: E731
        return self._publish(record, build, force=force or existing is not None)

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
            interpreter=self.target,
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
                *self._target_args(work),
                "--venv",
                "--sh-boot",
                "-o",
                str(output),
            ),
            what=f"building the base pex for {self.target}",
        )
        return output

    def _build_unpacked(self, base: ArtifactRecord, record: ArtifactRecord, work: Path) -> Path:
        self.step("unpacking and compiling the base for hosts that lack it (about 20 s)")
        cache = ArtifactCache(work / "cache", work / "pex_root", self.interpreter)
        cache.warm(self.store, base, unpacked=False)
        output = work / record.filename
        left_out = pack_unpacked(cache.pex_root, output)
        self.step(f"left out {len(left_out)} test-suite folders of the base's packages (no other module names them)")
        return output

    def _target_args(self, work: Path) -> list[str]:
        """pex flags for the target: this interpreter, or the complete platform (written into the build folder, so
        pex builds for exactly what the key says) with wheels only.

        N.B. ``--no-build``: for a foreign platform pex would compile an sdist with this machine's interpreter
        (minutes, for a wheel of the wrong platform); without a wheel for the target it fails at once, naming it.
        """
        if self.platform is None:
            return ["--python", self.interpreter.path]
        path = work / "complete-platform.json"
        if not path.exists():
            path.write_text(json.dumps(self.platform.to_json(), indent=1))
        return ["--complete-platform", str(path), "--no-build"]

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
                *self._target_args(work),
                *layer_args(base.filename),
                "-m",
                RUNTIME_MODULE,
                "--inject-env",
                f"MODELPEX_MODEL={spec.entry_env()}",
                "-o",
                str(output),
            ),
            what=f"building model {spec.name!r} {spec.version} for {self.target}",
            cwd=work,
        )
        return output


_BUILD_WHEEL = "import sys; from hatchling.build import build_wheel; print(build_wheel(sys.argv[1]))"
