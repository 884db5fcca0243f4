"""deployments.yaml: the repository's own file is valid, and every mistake names its place and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.catalog import Catalog
from orchestrator.deployments import RESERVED_CLIENT_NAMES, DeploymentError, load_deployments

from .conftest import REPO, Project, write_model


def test_repository_deployments_are_valid() -> None:
    catalog = Catalog(REPO, REPO / "model_packages")
    deployments = load_deployments(REPO / "deployments.yaml", catalog)
    acme, globex = deployments.clients["acme"], deployments.clients["globex"]
    assert acme.models["churn"].version == "1.0.0" and globex.models["churn"].follows_latest
    assert catalog.resolve("churn", "latest").version != "1.0.0", "two clients on two versions of churn"
    assert {pair for pair, label in deployments.running(catalog).items() if label == "churn@1.0.0"} == {"acme/churn"}


def write(project: Project, clients: dict) -> Path:
    path = project.root / "deployments.yaml"
    path.write_text(yaml.safe_dump({"clients": clients}))
    return path


def good_client(**model: object) -> dict:
    return {
        "datasets": {"data": {"generate": "customers", "rows": 10}},
        "schedules": {"train": "0 2 * * *", "predict": "0 * * * *"},
        "models": {"m": {"version": "latest", "inputs": {"data": "data"}, **model}},
    }


@pytest.mark.parametrize(
    ("client", "message"),
    [
        (
            good_client(version="9.9.9"),
            r"clients.acme.models.m.version: model 'm' has no version '9.9.9': known versions are 1.0.0",
        ),
        (
            good_client(inputs={"data": "nope"}),
            r"clients.acme.models.m.inputs.data = 'nope': client 'acme' has no such dataset \(it has data\)",
        ),
        (
            good_client(inputs={"other": "data"}),
            r"clients.acme.models.m.inputs maps \['other'\] but m reads \['data'\]",
        ),
        (
            good_client(schedules={"train": "every day"}),
            r"clients.acme.models.m.schedules.train = 'every day' is not a cron",
        ),
        (good_client(colour="blue"), r"clients.acme.models.m: unknown keys \['colour'\]"),
        (
            {**good_client(), "datasets": {"data": {"generate": "lottery"}}},
            r"clients.acme.datasets.data.generate = 'lottery'",
        ),
        ({**good_client(), "datasets": {"data": {"path": "x.xlsx"}}}, r"must be a .parquet or .csv file"),
        (
            {**good_client(), "models": {"nope": {}}},
            r"clients.acme.models.nope: no model 'nope' in model_packages/ \(known: m\)",
        ),
        (
            {**good_client(), "datasets": {"data": {"generate": "customers"}, "m_train": {"generate": "sales"}}},
            r"clients.acme.datasets.m_train: the name is m's step: rename the dataset",
        ),
        (
            {**good_client(), "datasets": {"data": {"generate": "customers"}, "acme_m_state": {"generate": "sales"}}},
            r"clients.acme.datasets.acme_m_state: the name is m's asset: rename the dataset",
        ),
    ],
)
def test_mistakes_name_their_place(project: Project, client: dict, message: str) -> None:
    write_model(
        project.models,
        "m",
        tool='[tool.modelpex]\ntrain = "m.model:train"\npredict = "m.model:predict"\ninputs = ["data"]\n',
    )
    path = write(project, {"acme": client})
    with pytest.raises(DeploymentError, match=message):
        load_deployments(path, Catalog(project.root, project.models))


def test_client_names_cannot_play_path_tricks(project: Project) -> None:
    write_model(project.models, "m")
    path = write(project, {"../acme": good_client()})
    with pytest.raises(DeploymentError, match=r"client name '../acme' must be lowercase"):
        load_deployments(path, Catalog(project.root, project.models))


@pytest.mark.parametrize("name", sorted(RESERVED_CLIENT_NAMES))
def test_client_names_cannot_take_modelpex_own_names(project: Project, name: str) -> None:
    """A client named `models` would share the group of every model version's pex (a selection by group)."""
    write_model(project.models, "m")
    path = write(project, {"acme": good_client(), name: good_client()})
    with pytest.raises(DeploymentError, match=rf"clients.{name}: client name '{name}' is one modelpex names its own"):
        load_deployments(path, Catalog(project.root, project.models))


def test_invalid_yaml_and_missing_file(project: Project) -> None:
    (project.root / "deployments.yaml").write_text("clients: [unclosed")
    with pytest.raises(DeploymentError, match="is not valid YAML"):
        load_deployments(project.root / "deployments.yaml", Catalog(project.root, project.models))
    with pytest.raises(DeploymentError, match="no deployments file at"):
        load_deployments(project.root / "missing.yaml", Catalog(project.root, project.models))
