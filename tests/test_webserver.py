"""End to end: `modelpex ui` starts the real `dagster dev` on loopback; a run launched through its GraphQL API
succeeds, its materialisation metadata reads back, and the server stops cleanly on SIGTERM. The real sensor daemon
(`dagster-daemon run`) redeploys every change of a model, back and forth."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.dagster_run import RunsFilter
from dagster._core.storage.tags import SENSOR_NAME_TAG

from orchestrator.store import LocalPexStore

from .conftest import REPO, Project, free_port
from .test_dagster import client, m_model, write_deployments

REPOSITORY = {"repositoryLocationName": "modelpex", "repositoryName": "__repository__"}


class GraphQL:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/graphql"

    def __call__(self, query: str, **variables: object) -> dict:
        body = json.dumps({"query": query, "variables": variables}).encode()
        request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = json.load(response)
        assert "errors" not in payload, payload
        return payload["data"]


@pytest.fixture
def server(project: Project, store: LocalPexStore, tmp_path: Path) -> Iterator[tuple[GraphQL, subprocess.Popen]]:
    m_model(project, "1.0.0")
    schedules = {"train": "0 2 1 1 *", "predict": "0 3 1 1 *"}  # N.B. Never during a test: automation is on.
    write_deployments(project, {"acme": {**client("latest"), "schedules": schedules}, "globex": client("latest")})
    shutil.copyfile(REPO / "workspace.yaml", project.root / "workspace.yaml")
    port = free_port()
    env = {
        **os.environ,
        "MODELPEX_PROJECT": str(project.root),
        "MODELPEX_STORE": str(store.root),
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "MODELPEX_SENSOR_INTERVAL": "2",
    }
    log = open(tmp_path / "dagster-dev.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    graphql = GraphQL(port)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if graphql("{ version }")["version"]:
                    break
            except (urllib.error.URLError, ConnectionError):  # N.B. Not up yet; a GraphQL error is a failure.
                pass
            assert process.poll() is None, (tmp_path / "dagster-dev.log").read_text()
            assert time.monotonic() < deadline, "dagster dev did not answer GraphQL within 120 s"
            time.sleep(0.5)
        yield graphql, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


LOCATION = """
{ repositoriesOrError { ... on RepositoryConnection { nodes {
    name location { name } jobs { name } schedules { name } sensors { name } assetNodes { assetKey { path } }
} } } }
"""

LAUNCH = """
mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
    __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
} }
"""

STATUS = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"

METADATA = """
query($path: [String!]!) { assetOrError(assetKey: {path: $path}) { ... on Asset {
    assetMaterializations(limit: 1) { runId metadataEntries {
        label ... on IntMetadataEntry { intValue } ... on FloatMetadataEntry { floatValue }
        ... on TextMetadataEntry { text } ... on MarkdownMetadataEntry { mdStr }
    } }
} } }
"""


def test_run_launched_through_graphql(server: tuple[GraphQL, subprocess.Popen]) -> None:
    graphql, process = server
    (repository,) = graphql(LOCATION)["repositoriesOrError"]["nodes"]
    assert repository["location"]["name"] == "modelpex"
    assert {"__ASSET_JOB", "client_acme", "client_globex", "model_m", "build_model"} <= {
        j["name"] for j in repository["jobs"]
    }
    assert {s["name"] for s in repository["sensors"]} == {
        "modelpex_automation",
        "modelpex_redeploy",
        "modelpex_failures",
    }
    assert repository["schedules"] == [], "the crons are automation conditions on the assets"
    assert ["model", "m", "v1_0_0"] in [a["assetKey"]["path"] for a in repository["assetNodes"]]

    run_id = launch(graphql, "client_acme")
    assert finish(graphql, run_id) == "SUCCESS"

    (materialization,) = graphql(METADATA, path=["acme", "m", "predictions"])["assetOrError"]["assetMaterializations"]
    assert materialization["runId"] == run_id
    entries = {e["label"]: e for e in materialization["metadataEntries"]}
    assert entries["rows_out"]["intValue"] == 50
    assert entries["model_version"]["text"] == "1.0.0"
    assert entries["bytes_moved"]["intValue"] > 0
    assert "customer_id" in entries["preview"]["mdStr"]
    assert graphql(METADATA, path=["globex", "m", "predictions"])["assetOrError"]["assetMaterializations"] == []

    stop(process)


def launch(graphql: GraphQL, job: str) -> str:
    params = {"selector": {**REPOSITORY, "jobName": job}, "runConfigData": {}}
    launched = graphql(LAUNCH, params=params)["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def finish(graphql: GraphQL, run_id: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while (status := graphql(STATUS, id=run_id)["runOrError"]["status"]) not in ("SUCCESS", "FAILURE", "CANCELED"):
        assert time.monotonic() < deadline, f"run {run_id} still {status}"
        time.sleep(1)
    return status


LATEST = """
query($path: [String!]!) { assetOrError(assetKey: {path: $path}) { ... on Asset {
    assetMaterializations(limit: 1) { timestamp metadataEntries { label ... on TextMetadataEntry { text } } }
} } }
"""


def latest(graphql: GraphQL, *path: str) -> dict[str, str] | None:
    """The timestamp and text metadata of an asset's latest materialisation, None when it has none."""
    found = graphql(LATEST, path=list(path))["assetOrError"].get("assetMaterializations") or []
    if not found:
        return None
    return {"timestamp": found[0]["timestamp"], **{e["label"]: e.get("text") for e in found[0]["metadataEntries"]}}


def asset_paths(graphql: GraphQL) -> list[list[str]]:
    (repository,) = graphql(LOCATION)["repositoriesOrError"]["nodes"]
    return [a["assetKey"]["path"] for a in repository["assetNodes"]]


def poll(what: str, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(1)


def test_changes_redeploy_themselves_without_a_reload(server: tuple[GraphQL, subprocess.Popen], project: Project):
    """No one presses Reload: an edit of the version acme follows is trained and predicted again, and a new release
    tag gets its asset and becomes what acme runs. The redeploy sensor reloads the code location through the
    webserver `modelpex ui` started; the assets' automation conditions do the rest."""
    graphql, process = server
    assert [finish(graphql, launch(graphql, f"client_{c}")) for c in ("acme", "globex")] == ["SUCCESS"] * 2
    before, globex = latest(graphql, "acme", "m", "predictions"), latest(graphql, "globex", "m", "predictions")
    model_py = project.models / "m" / "src" / "m" / "model.py"
    model_py.write_text(model_py.read_text() + "\n# an edit\n")
    poll(
        "acme's predictions after the edit",
        lambda: latest(graphql, "acme", "m", "predictions") != before,
    )
    assert latest(graphql, "model", "m", "v1_0_0") is not None, "the edited version's pex was rebuilt"
    assert latest(graphql, "globex", "m", "predictions") != globex, "globex follows latest too"

    pyproject = project.models / "m" / "pyproject.toml"
    project.commit_and_tag("m 1.0.0 edited")
    pyproject.write_text(pyproject.read_text().replace('"1.0.0"', '"2.0.0"'))
    project.commit_and_tag("m 2.0.0")
    pyproject.write_text(pyproject.read_text().replace('"2.0.0"', '"1.0.0"'))
    project.commit_and_tag("back to developing 1.0.0")
    project.git("tag", "m/v2.0.0", "HEAD~1")
    poll("the asset of m@2.0.0", lambda: ["model", "m", "v2_0_0"] in asset_paths(graphql))
    poll(
        "acme's predictions from m@2.0.0",
        lambda: (latest(graphql, "acme", "m", "predictions") or {}).get("model_version") == "2.0.0",
    )
    stop(process)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, as a supervisor stops a server: it must exit on its own, cleanly, within 30 s."""
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=30) == 0, f"exit code {process.returncode} after SIGTERM"


QUEUE_ONLY = """
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config: {max_concurrent_runs: 0}
telemetry: {enabled: false}
"""


def test_real_daemon_redeploys_a_model_edited_back_and_forth(
    project: Project, store: LocalPexStore, tmp_path: Path
) -> None:
    """`dagster-daemon run` ticks the redeploy sensor every second; a model edited A -> B -> A -> B launches three
    runs (queued, never started: the sensor is the subject here)."""
    m_model(project, "1.0.0")
    write_deployments(project, {"acme": client("latest")})
    shutil.copyfile(REPO / "workspace.yaml", project.root / "workspace.yaml")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(QUEUE_ONLY)
    env = {
        **os.environ,
        "MODELPEX_PROJECT": str(project.root),
        "MODELPEX_STORE": str(store.root),
        "MODELPEX_SENSOR_INTERVAL": "1",
        "DAGSTER_HOME": str(home),
    }
    log = tmp_path / "daemon.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", "workspace.yaml"],
            cwd=project.root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_for(what: str, ready) -> None:
        deadline = time.monotonic() + 240
        while not ready():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"{what} within 240 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)

    try:
        with DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
            wait_for("the sensor's first tick", lambda: _sensor_cursor(instance))
            model_py = project.models / "m" / "src" / "m" / "model.py"
            a = model_py.read_text()
            for count, content in enumerate([a + "\n# B\n", a, a + "\n# B\n"], start=1):
                model_py.write_text(content)
                wait_for(f"redeploy number {count}", lambda n=count: len(_sensor_runs(instance)) == n)
            assert all(r.tags["modelpex/redeploy"] == "m@1.0.0" for r in _sensor_runs(instance))
        stop(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def _sensor_runs(instance: DagsterInstance) -> list:
    return instance.get_runs(filters=RunsFilter(tags={SENSOR_NAME_TAG: "modelpex_redeploy"}))


def _sensor_cursor(instance: DagsterInstance) -> bool:
    return any(s.instigator_data and s.instigator_data.cursor for s in instance.all_instigator_state())
