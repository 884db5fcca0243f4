"""Specs: what a model folder and the base environment declare, validated before anything is built.

A model is ``model_packages/<name>/`` with a PEP 621 ``pyproject.toml`` and a ``[tool.modelpex]`` table. Names
and versions end up in file names, git tag names and Dagster asset keys, so they are validated strictly here,
once, and every later step can trust them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tomllib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from modelpex_runtime.protocol import STATE_FORMATS
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from orchestrator.errors import ModelpexWarning, SpecError

__all__ = [
    "BASE_DISTRIBUTION",
    "FRAME_LIBRARIES",
    "BaseEnv",
    "ColumnCheck",
    "ModelRef",
    "ModelSpec",
    "PredictionContract",
    "check_sources",
    "discover_models",
    "load_base_env",
    "load_model_spec",
    "scan_models",
    "tree_digest",
    "validate_name",
    "validate_version",
    "warn_broken",
]

BASE_DISTRIBUTION = "modelpex-base"
FRAME_LIBRARIES = ("pandas", "polars", "pyarrow")
LOCK_FILE = "pex.lock"

# N.B. Names become file names, tag names (`<name>/v<version>`) and Dagster asset key parts ([A-Za-z0-9_]).
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_VERSION_RE = re.compile(r"^[0-9][0-9a-z.+]{0,62}$")
_CALLABLE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_TYPE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
# N.B. A checked column names a Dagster asset check (``<column>_range``): Dagster names are [A-Za-z0-9_].
_CHECK_COLUMN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,50}$")
SEVERITIES = ("error", "warn")
ROWS_INPUT, ROWS_ANY = "input", "any"
# Files that never change what a pex contains; everything else in a model folder is part of its key.
_IGNORED_PARTS = {"__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache", "build", "dist"}
_IGNORED_SUFFIXES = (".pyc", ".pyo", ".egg-info")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe model name; raise a `SpecError` naming the fix otherwise."""
    if not _NAME_RE.fullmatch(name):
        raise SpecError(
            f"model name {name!r} is not valid: use 1-63 lowercase letters, digits and underscores, "
            "starting with a letter (it becomes a folder, a git tag and a Dagster asset key)"
        )
    return name


def validate_version(version: str, *, model: str = "model") -> str:
    """Return ``version`` if it is a normalised PEP 440 version with no path tricks."""
    try:
        normalised = str(Version(version))
    except InvalidVersion:
        normalised = None
    if normalised != version or not _VERSION_RE.fullmatch(version):
        hint = f" (did you mean {normalised!r}?)" if normalised else ""
        raise SpecError(
            f"version {version!r} of {model!r} is not a normalised PEP 440 version{hint}: "
            "use something like 1.2.0 in the model's pyproject.toml"
        )
    return version


@dataclass(frozen=True)
class ModelRef:
    """``name`` or ``name@version`` as a user types it on the command line or in a deployment."""

    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, sep, version = text.partition("@")
        validate_name(name)
        if sep:
            validate_version(version, model=name)
        return cls(name, version if sep else None)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


@dataclass(frozen=True)
class ColumnCheck:
    """A check a model declares on one column of its predictions: a range (``min``/``max``) or allowed ``values``.

    ``severity = "error"`` (the default) makes a failure block what follows in the run; ``"warn"`` only shows it.
    """

    column: str
    min: float | None = None
    max: float | None = None
    values: tuple[str | int | float | bool, ...] = ()
    severity: str = "error"

    @property
    def name(self) -> str:
        """The Dagster check name: ``<column>_values`` or ``<column>_range``."""
        return f"{self.column}_values" if self.values else f"{self.column}_range"

    def describe(self) -> str:
        if self.values:
            return f"every {self.column} is one of {', '.join(map(str, self.values))}"
        low = "-inf" if self.min is None else f"{self.min:g}"
        high = "inf" if self.max is None else f"{self.max:g}"
        return f"every {self.column} lies in [{low}, {high}]"


@dataclass(frozen=True)
class PredictionContract:
    """What a model promises about its predictions (``[tool.modelpex.predictions]``); each promise is an asset check.

    ``columns``: present and never null. ``rows``: as many rows as the input it names, ``"input"`` for the model's
    only input (the default), or ``"any"`` (a forecast, an aggregate). ``checks``: per-column ranges and value sets.
    """

    columns: tuple[str, ...] = ()
    rows: str = ROWS_INPUT
    checks: tuple[ColumnCheck, ...] = ()

    def to_json(self) -> dict[str, object]:
        """Plain data for the catalog's cache of released versions."""
        return {
            "columns": list(self.columns),
            "rows": self.rows,
            "checks": [dataclasses.asdict(c) | {"values": list(c.values)} for c in self.checks],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> PredictionContract:
        checks = tuple(ColumnCheck(**{**c, "values": tuple(c["values"])}) for c in data["checks"])  # type: ignore[union-attr, index]
        return cls(tuple(data["columns"]), str(data["rows"]), checks)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelSpec:
    """A model folder as modelpex understands it: identity, entry points, and what it needs beyond the base."""

    name: str
    version: str
    folder: Path
    train: str
    predict: str
    frames: str
    requirements: tuple[str, ...]
    inputs: tuple[str, ...] = ()  # the input frames the model reads; empty means "not declared"
    state: str = "auto"  # how the fitted state is persisted (modelpex_runtime.state)
    trusted_types: tuple[str, ...] = ()  # types skops may load beyond its defaults
    reuse: bool = True  # False: a process per call, for a model that keeps data in module globals
    predictions: PredictionContract = PredictionContract()  # the checks its predictions must pass
    description: str = ""  # [project] description, shown beside the version's asset

    @property
    def source_dir(self) -> Path:
        return self.folder / "src"

    @property
    def lock_file(self) -> Path:
        return self.folder / LOCK_FILE

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.version)

    def entry_env(self) -> str:
        """The JSON the model pex carries (``MODELPEX_MODEL``) so it knows which callables to run."""
        return json.dumps(
            {
                "name": self.name,
                "version": self.version,
                "train": self.train,
                "predict": self.predict,
                "frames": self.frames,
                "state": self.state,
                "trusted_types": list(self.trusted_types),
                "reuse": self.reuse,
            },
            sort_keys=True,
        )


@dataclass(frozen=True)
class BaseEnv:
    """The shared base environment: one project folder and the pex lock every model is resolved against."""

    folder: Path
    version: str

    @property
    def lock_file(self) -> Path:
        return self.folder / LOCK_FILE

    def pins(self) -> dict[str, str]:
        """Canonical project name -> exact version, for every distribution the base pex ships."""
        lock = read_lock(self.lock_file, what="the base environment", fix="run `modelpex lock base`")
        pins = {canonicalize_name(name): version for name, version in locked_versions(lock).items()}
        pins[BASE_DISTRIBUTION] = self.version
        return pins


def _read_pyproject(folder: Path, what: str) -> Mapping[str, object]:
    path = folder / "pyproject.toml"
    if not path.is_file():
        raise SpecError(f"{what} has no pyproject.toml at {path}: add one with a [project] table")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path} is not valid TOML ({exc}): fix the file") from None


def load_model_spec(folder: Path) -> ModelSpec:
    """Read and validate ``<folder>/pyproject.toml``; every problem is a `SpecError` naming file and fix."""
    folder = Path(folder).resolve()
    name = validate_name(folder.name)
    data = _read_pyproject(folder, f"model folder {folder}")
    project = data.get("project")
    path = folder / "pyproject.toml"
    if not isinstance(project, dict):
        raise SpecError(f"{path} has no [project] table: add name, version and dependencies")
    project_name = project.get("name")
    if not isinstance(project_name, str) or canonicalize_name(project_name) != canonicalize_name(name):
        raise SpecError(f"{path}: [project] name is {project_name!r} but the folder is {name!r}: make them match")
    version = project.get("version")
    if not isinstance(version, str):
        raise SpecError(f'{path}: [project] needs a static version string such as "1.0.0"')
    validate_version(version, model=name)
    table = data.get("tool", {}).get("modelpex") if isinstance(data.get("tool"), dict) else None
    if not isinstance(table, dict):
        raise SpecError(
            f'{path} has no [tool.modelpex] table: add one with train = "pkg.module:train", '
            'predict = "pkg.module:predict" and frames = "pandas" | "polars" | "pyarrow"'
        )
    train, predict = (_callable(table, key, path) for key in ("train", "predict"))
    frames = table.get("frames", "pandas")
    if frames not in FRAME_LIBRARIES:
        raise SpecError(f"{path}: [tool.modelpex] frames = {frames!r} is not one of {', '.join(FRAME_LIBRARIES)}")
    requirements = tuple(_requirements(project.get("dependencies", []), path))
    inputs = table.get("inputs", [])
    if not isinstance(inputs, list) or not all(isinstance(i, str) and i.isidentifier() for i in inputs):
        raise SpecError(f'{path}: [tool.modelpex] inputs = {inputs!r} must be a list of names such as ["customers"]')
    state = table.get("state", "auto")
    if state not in ("auto", *STATE_FORMATS):
        raise SpecError(f"{path}: [tool.modelpex] state = {state!r} is not one of auto, {', '.join(STATE_FORMATS)}")
    trusted = table.get("trusted_types", [])
    if not isinstance(trusted, list) or not all(isinstance(t, str) and _TYPE_RE.fullmatch(t) for t in trusted):
        raise SpecError(
            f"{path}: [tool.modelpex] trusted_types = {trusted!r} must be a list of dotted type names such as "
            '["sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"]'
        )
    reuse = table.get("reuse", True)
    if not isinstance(reuse, bool):
        raise SpecError(f"{path}: [tool.modelpex] reuse = {reuse!r} must be true or false")
    contract = prediction_contract(table.get("predictions", {}), tuple(inputs), path)
    spec = ModelSpec(
        name,
        version,
        folder,
        train,
        predict,
        frames,
        requirements,
        tuple(inputs),
        state,
        tuple(trusted),
        reuse,
        contract,
        str(project.get("description") or ""),
    )
    if not spec.source_dir.is_dir():
        raise SpecError(f"model {name!r} has no src/ folder at {spec.source_dir}: put the model's package there")
    return spec


def prediction_contract(table: object, inputs: tuple[str, ...], path: Path) -> PredictionContract:
    """``[tool.modelpex.predictions]``: declared columns, the row rule and per-column checks, validated."""
    where = f"{path}: [tool.modelpex.predictions]"
    if not isinstance(table, dict):
        raise SpecError(f"{where} must be a table with columns, rows and checks")
    unknown = sorted(set(table) - {"columns", "rows", "checks"})
    if unknown:
        raise SpecError(f"{where} has unknown keys {unknown}; allowed are columns, rows, checks")
    columns = table.get("columns", [])
    if not isinstance(columns, list) or not all(isinstance(c, str) and c for c in columns):
        raise SpecError(f'{where} columns = {columns!r} must be a list of column names such as ["customer_id"]')
    rows = table.get("rows", ROWS_INPUT)
    if not isinstance(rows, str) or (rows not in (ROWS_INPUT, ROWS_ANY) and inputs and rows not in inputs):
        named = f" or one of its inputs ({', '.join(inputs)})" if inputs else " or the name of an input"
        raise SpecError(f'{where} rows = {rows!r} must be "{ROWS_INPUT}", "{ROWS_ANY}"{named}')
    checks = table.get("checks", {})
    if not isinstance(checks, dict):
        raise SpecError(f"{where}.checks must be a table of column = {{min = ..., max = ...}} or {{values = [...]}}")
    parsed = tuple(_column_check(column, rule, f"{where}.checks.{column}") for column, rule in checks.items())
    return PredictionContract(tuple(columns), rows, parsed)


def _column_check(column: str, rule: object, where: str) -> ColumnCheck:
    if not _CHECK_COLUMN_RE.fullmatch(column):
        raise SpecError(f"{where}: only columns named with letters, digits and '_' can be checked (it names a check)")
    if not isinstance(rule, dict) or set(rule) - {"min", "max", "values", "severity"}:
        raise SpecError(f"{where} must be {{min = ..., max = ...}} or {{values = [...]}}, with an optional severity")
    severity = rule.get("severity", "error")
    if severity not in SEVERITIES:
        raise SpecError(f"{where}.severity = {severity!r} is not one of {', '.join(SEVERITIES)}")
    bounds = [rule.get("min"), rule.get("max")]
    values = rule.get("values")
    if values is not None:
        if any(b is not None for b in bounds):
            raise SpecError(f"{where}: declare either a range (min, max) or values, not both")
        if not isinstance(values, list) or not values or not all(isinstance(v, (str, int, float)) for v in values):
            raise SpecError(f"{where}.values = {values!r} must be a non-empty list of strings, numbers or booleans")
        return ColumnCheck(column, values=tuple(values), severity=severity)
    if all(b is None for b in bounds):
        raise SpecError(f"{where} declares nothing to check: give min, max or values")
    for bound in bounds:
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))):
            raise SpecError(f"{where}: min and max must be numbers, got {bound!r}")
    low, high = (None if b is None else float(b) for b in bounds)
    if low is not None and high is not None and low > high:
        raise SpecError(f"{where}: min = {low:g} is above max = {high:g}")
    return ColumnCheck(column, min=low, max=high, severity=severity)


def check_sources(spec: ModelSpec) -> None:
    """Compile every module of the model, so a syntax error fails the build rather than a production run."""
    for path in sorted(spec.source_dir.rglob("*.py")):
        try:
            compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
        except SyntaxError as exc:
            raise SpecError(
                f"model {spec.name!r} {spec.version}: syntax error in {path} line {exc.lineno}: {exc.msg}; "
                "fix the code and build again"
            ) from None


def _callable(table: Mapping[str, object], key: str, path: Path) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not _CALLABLE_RE.fullmatch(value):
        raise SpecError(f'{path}: [tool.modelpex] {key} = {value!r} must look like "package.module:function"')
    return value


def _requirements(values: object, path: Path) -> Iterator[str]:
    if not isinstance(values, list):
        raise SpecError(f"{path}: [project] dependencies must be a list of requirement strings")
    for value in values:
        try:
            requirement = Requirement(str(value))
        except InvalidRequirement as exc:
            raise SpecError(f"{path}: dependency {value!r} is not a valid requirement ({exc})") from None
        if requirement.url:
            raise SpecError(f"{path}: dependency {value!r} points at a URL: depend on a released version instead")
        yield str(requirement)


def load_base_env(folder: Path) -> BaseEnv:
    """Read the base environment's project; its lock is read lazily by `BaseEnv.pins`."""
    folder = Path(folder).resolve()
    data = _read_pyproject(folder, f"base environment {folder}")
    project = data.get("project")
    if not isinstance(project, dict) or canonicalize_name(str(project.get("name"))) != BASE_DISTRIBUTION:
        raise SpecError(f"{folder / 'pyproject.toml'} must declare [project] name = {BASE_DISTRIBUTION!r}")
    return BaseEnv(folder, validate_version(str(project.get("version")), model=BASE_DISTRIBUTION))


def scan_models(root: Path) -> tuple[list[ModelSpec], dict[Path, SpecError]]:
    """Every model folder under ``root`` (a folder with a pyproject.toml), sorted by name, and those that are not
    valid models (a bad folder name, a broken pyproject.toml) with their errors."""
    root = Path(root)
    specs: list[ModelSpec] = []
    broken: dict[Path, SpecError] = {}
    folders = sorted(p for p in root.iterdir() if (p / "pyproject.toml").is_file()) if root.is_dir() else []
    for folder in folders:
        try:
            specs.append(load_model_spec(folder))
        except SpecError as exc:
            broken[folder] = exc
    return specs, broken


def warn_broken(broken: Mapping[Path, SpecError]) -> None:
    """One warning per model folder that was skipped, naming it and its problem."""
    for folder, exc in broken.items():
        warnings.warn(f"skipping model folder {folder}: {exc}", ModelpexWarning, stacklevel=2)


def discover_models(root: Path) -> list[ModelSpec]:
    """Every valid model folder under ``root``, sorted by name.

    N.B. A folder that is not a valid model is skipped with a warning: one bad folder (a space in its name, a typo
    in its pyproject.toml) fails alone, and every other model still builds, deploys and is collected by gc.
    """
    specs, broken = scan_models(root)
    warn_broken(broken)
    return specs


def read_lock(path: Path, *, what: str, fix: str) -> Mapping[str, object]:
    """Load a pex lock file (JSON) with an error that says how to create it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{what} has no lock file at {path}: {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"the lock file {path} of {what} is not valid JSON ({exc}): {fix}") from None


def locked_versions(lock: Mapping[str, object]) -> dict[str, str]:
    """Project name -> version of everything a pex lock resolved (one resolve: we lock for one system)."""
    versions: dict[str, str] = {}
    for resolve in lock.get("locked_resolves", []):  # type: ignore[union-attr]
        for requirement in resolve["locked_requirements"]:
            versions[canonicalize_name(requirement["project_name"])] = requirement["version"]
    return versions


def tree_digest(folder: Path) -> str:
    """sha256 over the relative paths, modes and bytes of every file that can change a build.

    N.B. Paths are hashed relative to the folder so a clone elsewhere, or a git tag exported to a temporary
    folder, gets the same key as the working tree it came from.
    """
    digest = hashlib.sha256()
    folder = Path(folder)
    for path in sorted(_content_files(folder)):
        relative = path.relative_to(folder).as_posix()
        executable = os.access(path, os.X_OK)
        digest.update(f"{relative}\0{int(executable)}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _content_files(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d not in _IGNORED_PARTS and not d.endswith(_IGNORED_SUFFIXES)]
        for filename in filenames:
            if not filename.endswith(_IGNORED_SUFFIXES):
                yield Path(dirpath, filename)
