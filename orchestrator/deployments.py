"""Deployments: which client runs which model version, with which parameters, data and schedules.

One declarative file (``deployments.yaml``) is the source of truth the Dagster definitions are generated from.
It is validated as a whole against the catalog of model versions before any definition exists, and every error
names its place in the file (``clients.acme.models.churn.version``) and what would be valid there.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from dagster._utils.schedules import is_valid_cron_string

from orchestrator.catalog import LATEST, Catalog
from orchestrator.errors import SpecError
from orchestrator.limits import ClientLimits, parse_limits
from orchestrator.specs import validate_name

__all__ = [
    "ClientDeployment",
    "DatasetSource",
    "Deployments",
    "ModelDeployment",
    "load_deployments",
    "pinned_versions",
]

_DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
GENERATORS = ("customers", "sales", "applicants")
ACTIONS = ("train", "predict")
# N.B. libyaml's loader when pyyaml has it: the pure-Python one took 2.7 s on a 5,000-deployment file.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class DeploymentError(SpecError):
    """deployments.yaml says something that cannot be deployed."""


@dataclass(frozen=True)
class DatasetSource:
    """A client's input dataset: generated (the examples) or read from a Parquet/CSV file."""

    client: str
    name: str
    generate: str | None = None
    path: Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelDeployment:
    """One model run for one client: the version it asks for, its parameters, inputs and schedules."""

    client: str
    model: str
    version: str  # an exact version or ``latest``
    params: Mapping[str, Any]
    inputs: Mapping[str, str]  # model input name -> the client's dataset name
    schedules: Mapping[str, str]  # ``train`` / ``predict`` -> cron
    limits: Mapping[str, Any] = field(default_factory=dict)  # this client's limits (orchestrator.limits), parsed

    @property
    def client_limits(self) -> ClientLimits | None:
        """This client's limits, which win over the model's, and where they are written."""
        where = f"deployments.yaml clients.{self.client}.models.{self.model}.limits"
        return ClientLimits(self.limits, where) if self.limits else None

    @property
    def where(self) -> str:
        """``client/model``: how errors, tags and the redeploy sensor's cursor name this deployment."""
        return f"{self.client}/{self.model}"

    @property
    def follows_latest(self) -> bool:
        return self.version == LATEST


@dataclass(frozen=True)
class ClientDeployment:
    name: str
    datasets: Mapping[str, DatasetSource]
    models: Mapping[str, ModelDeployment]


@dataclass(frozen=True)
class Deployments:
    path: Path
    clients: Mapping[str, ClientDeployment]
    digest: str  # sha256 of the file as loaded: the redeploy sensor tells when the definitions no longer match it

    def changed_on_disk(self) -> bool:
        try:
            return _digest(self.path.read_bytes()) != self.digest
        except OSError:
            return True

    def all(self) -> list[ModelDeployment]:
        return [d for client in self.clients.values() for d in client.models.values()]

    def running(self, catalog: Catalog) -> dict[str, str]:
        """``client/model`` -> the ``model@version`` it runs now: the pinned one, or the newest for ``latest``."""
        return {d.where: f"{d.model}@{catalog.resolve(d.model, d.version).version}" for d in self.all()}


# N.B. The names modelpex gives its own asset groups and key prefixes (orchestrator/assets.py). A client of one of these
# names would share them: its job, `AssetSelection.groups(<client>)`, would select every model version's pex.
RESERVED_CLIENT_NAMES = frozenset({"modelpex", "model", "models"})


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DeploymentError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _cron(value: Any, where: str) -> str:
    if not isinstance(value, str) or not is_valid_cron_string(value):
        raise DeploymentError(f"{where} = {value!r} is not a cron expression such as '0 2 * * *'")
    return value


def _dataset(client: str, name: str, raw: Any, root: Path, where: str) -> DatasetSource:
    if not _DATASET_NAME.fullmatch(name):
        raise DeploymentError(f"{where}: dataset name {name!r} must be lowercase letters, digits and underscores")
    options = dict(_table(raw, where))
    generate, path = options.pop("generate", None), options.pop("path", None)
    if (generate is None) == (path is None):
        raise DeploymentError(f"{where} needs exactly one of 'generate: <{'|'.join(GENERATORS)}>' or 'path: <file>'")
    if generate is not None and generate not in GENERATORS:
        raise DeploymentError(f"{where}.generate = {generate!r} is not one of {', '.join(GENERATORS)}")
    resolved = None
    if path is not None:
        resolved = (root / str(path)).resolve()
        if resolved.suffix not in (".parquet", ".csv"):
            raise DeploymentError(f"{where}.path = {path!r} must be a .parquet or .csv file")
    return DatasetSource(client, name, generate, resolved, options)


def _model(
    client: str,
    name: str,
    raw: Any,
    datasets: Mapping[str, DatasetSource],
    defaults: Mapping[str, str],
    catalog: Catalog,
    where: str,
) -> ModelDeployment:
    table = _table(raw, where)
    unknown = sorted(set(table) - {"version", "params", "inputs", "schedules", "limits"})
    if unknown:
        raise DeploymentError(
            f"{where}: unknown keys {unknown}; allowed are version, params, inputs, schedules, limits"
        )
    if name not in catalog.specs:
        raise DeploymentError(
            f"{where}: no model {name!r} in model_packages/ (known: {', '.join(sorted(catalog.specs))})"
        )
    version = str(table.get("version", LATEST))
    try:
        catalog.resolve(name, version)
    except SpecError as exc:
        raise DeploymentError(f"{where}.version: {exc}") from None
    inputs = {str(k): str(v) for k, v in _table(table.get("inputs"), f"{where}.inputs").items()}
    declared = catalog.specs[name].inputs
    if declared and sorted(declared) != sorted(inputs):
        raise DeploymentError(
            f"{where}.inputs maps {sorted(inputs)} but {name} reads {sorted(declared)}: map each of them"
        )
    for model_input, dataset in inputs.items():
        if dataset not in datasets:
            raise DeploymentError(
                f"{where}.inputs.{model_input} = {dataset!r}: client {client!r} has no such dataset "
                f"(it has {', '.join(sorted(datasets)) or 'none'})"
            )
    schedules = {**defaults, **_table(table.get("schedules"), f"{where}.schedules")}
    return ModelDeployment(
        client,
        name,
        version,
        dict(_table(table.get("params"), f"{where}.params")),
        inputs,
        {a: _cron(schedules[a], f"{where}.schedules.{a}") for a in ACTIONS if a in schedules},
        _limits(table.get("limits"), f"{where}.limits"),
    )


def _limits(table: Any, where: str) -> dict[str, Any]:
    try:
        return parse_limits(table, where)
    except SpecError as exc:
        raise DeploymentError(f"deployments.yaml {exc}") from None


def _client(name: str, raw: Any, root: Path, catalog: Catalog) -> ClientDeployment:
    where = f"clients.{name}"
    try:
        validate_name(name)
    except SpecError:
        raise DeploymentError(
            f"{where}: client name {name!r} must be lowercase letters, digits and underscores"
        ) from None
    if name in RESERVED_CLIENT_NAMES:
        raise DeploymentError(
            f"{where}: client name {name!r} is one modelpex names its own assets with "
            f"({', '.join(sorted(RESERVED_CLIENT_NAMES))}): rename the client, e.g. {name}_client"
        )
    table = _table(raw, where)
    datasets = {
        str(d): _dataset(name, str(d), v, root, f"{where}.datasets.{d}")
        for d, v in _table(table.get("datasets"), f"{where}.datasets").items()
    }
    defaults = dict(_table(table.get("schedules"), f"{where}.schedules"))
    models = {
        str(m): _model(name, str(m), v, datasets, defaults, catalog, f"{where}.models.{m}")
        for m, v in _table(table.get("models"), f"{where}.models").items()
    }
    # N.B. Steps are named after the datasets, `<model>_train` and `<model>_predict`, and datasets share the key
    # prefix `<client>/` with the model's assets, `<client>_<model>_state` and `_predictions` (orchestrator/assets.py).
    for model in models:
        for step in (f"{model}_train", f"{model}_predict"):
            if step in datasets:
                raise DeploymentError(f"{where}.datasets.{step}: the name is {model}'s step: rename the dataset")
        for asset in (f"{name}_{model}_state", f"{name}_{model}_predictions"):
            if asset in datasets:
                raise DeploymentError(f"{where}.datasets.{asset}: the name is {model}'s asset: rename the dataset")
    return ClientDeployment(name, datasets, models)


def _load_yaml(path: Path) -> tuple[bytes, Any]:
    try:
        text = Path(path).read_bytes()
        return text, yaml.load(text.decode("utf-8"), Loader=_LOADER)
    except FileNotFoundError:
        raise DeploymentError(f"no deployments file at {path}: create one (see README, 'Deployments')") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DeploymentError(f"{path} is not valid YAML: {exc}") from None


def pinned_versions(path: Path) -> set[tuple[str, str]]:
    """(model, version) of every exact version a client pins, read without the catalog; no file pins nothing.

    N.B. gc must keep what clients pin even when this clone cannot resolve it (a clone without the release tags):
    `load_deployments` would reject such a file, and gc would then not know what to keep.
    """
    if not Path(path).exists():
        return set()
    _, raw = _load_yaml(path)
    pinned = set()
    try:
        for client, table in _table(_table(raw, "top level").get("clients"), "clients").items():
            for model, spec in _table(_table(table, f"clients.{client}").get("models"), f"clients.{client}").items():
                version = str(_table(spec, f"clients.{client}.models.{model}").get("version", LATEST))
                pinned |= set() if version == LATEST else {(str(model), version)}
    except DeploymentError as exc:
        raise DeploymentError(f"{path}: {exc}") from None
    return pinned


def load_deployments(path: Path, catalog: Catalog) -> Deployments:
    """Parse and validate ``path``; a `DeploymentError` names the file, the place in it and the fix."""
    text, raw = _load_yaml(path)
    try:
        clients = {
            str(c): _client(str(c), v, Path(path).parent, catalog)
            for c, v in _table(raw, "top level").get("clients", {}).items()
        }
    except DeploymentError as exc:
        raise DeploymentError(f"{path}: {exc}") from None
    return Deployments(Path(path), clients, _digest(text))


def _digest(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()
