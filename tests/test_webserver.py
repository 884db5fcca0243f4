"""End to end: `modelpex ui` starts the real `dagster dev` on loopback; a run launched through its GraphQL API
succeeds, its materialisation metadata reads back, an hourly prediction leaves the state in sync, a real browser
(Debian's chromium, headless) renders the asset graph and a predictions page with the model names and metadata, and
the server stops cleanly on SIGTERM. The real sensor daemon (`dagster-daemon run`) redeploys every change of a model,
back and forth.

Screenshots of the pages go to ``$MODELPEX_TEST_ARTIFACTS`` (default ``test-artifacts/`` in the repository)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
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

from . import servers
from .conftest import REPO, Project, free_port
from .servers import spawn, terminate
from .system import find, requires
from .test_dagster import client, dataset_key, m_model, predictions, state, write_deployments

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
def server(project: Project, store: LocalPexStore, tmp_path: Path) -> Iterator[tuple[GraphQL, subprocess.Popen, int]]:
    m_model(project, "1.0.0")
    schedules = {"train": "0 2 1 1 *", "predict": "0 3 1 1 *"}  # N.B. Never during a test: automation is on.
    write_deployments(project, {"acme": {**client("latest"), "schedules": schedules}, "globex": client("latest")})
    shutil.copyfile(REPO / "workspace.yaml", project.root / "workspace.yaml")
    port = free_port()
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(QUIET)
    env = {
        **os.environ,
        "MODELPEX_PROJECT": str(project.root),
        "MODELPEX_STORE": str(store.root),
        "DAGSTER_HOME": str(home),
        "MODELPEX_SENSOR_INTERVAL": "2",
    }
    with open(tmp_path / "dagster-dev.log", "w") as log:
        process = spawn([sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port)], env=env, stdout=log)
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
        yield graphql, process, port
    finally:
        terminate(process, 0, signal.SIGKILL)


# N.B. No telemetry, and no "join the community" dialog over the screenshots.
QUIET = "telemetry: {enabled: false}\nnux: {enabled: false}\n"

LOCATION = """
{ repositoriesOrError { ... on RepositoryConnection { nodes {
    name location { name } jobs { name description } schedules { name description } sensors { name description }
    assetNodes { assetKey { path } groupName }
} } } }
"""

LAUNCH = """
mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
    __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
} }
"""

STATUS = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status tags { key value } } } }"

METADATA = """
query($path: [String!]!) { assetOrError(assetKey: {path: $path}) { ... on Asset {
    assetMaterializations(limit: 1) { runId metadataEntries {
        label ... on IntMetadataEntry { intValue } ... on FloatMetadataEntry { floatValue }
        ... on TextMetadataEntry { text } ... on MarkdownMetadataEntry { mdStr }
    } }
} } }
"""

STALE = "query($path: [String!]!) { assetNodeOrError(assetKey: {path: $path}) { ... on AssetNode { staleStatus } } }"


def run(graphql: GraphQL, keys: list[list[str]]) -> dict:
    """Launch Dagster's asset job over ``keys``, as the UI's Materialize does, and wait for the run to end."""
    selector = {**REPOSITORY, "jobName": "__ASSET_JOB", "assetSelection": [{"path": key} for key in keys]}
    launched = graphql(LAUNCH, params={"selector": selector, "runConfigData": {}})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + 240
    while (found := graphql(STATUS, id=run_id)["runOrError"])["status"] not in ("SUCCESS", "FAILURE", "CANCELED"):
        assert time.monotonic() < deadline, f"run {run_id} still {found['status']}"
        time.sleep(1)
    return {"id": run_id, "status": found["status"], "tags": {t["key"]: t["value"] for t in found["tags"]}}


@requires("chromium")
def test_run_launched_through_graphql(server: tuple[GraphQL, subprocess.Popen, int]) -> None:
    graphql, process, port = server
    (repository,) = graphql(LOCATION)["repositoriesOrError"]["nodes"]
    assert repository["location"]["name"] == "modelpex"
    assert {j["name"] for j in repository["jobs"]} == {"__ASSET_JOB", "build_model"}
    for kind in ("jobs", "sensors", "schedules"):
        assert all(d["description"] for d in repository[kind] if d["name"] != "__ASSET_JOB"), kind
    assert {s["name"] for s in repository["sensors"]} == {
        "modelpex_automation",
        "modelpex_redeploy",
        "modelpex_failures",
    }
    assert repository["schedules"] == [], "the crons are automation conditions on the assets"
    assert ["model", "m", "m_v1_0_0"] in [a["assetKey"]["path"] for a in repository["assetNodes"]]

    acme = [a["assetKey"]["path"] for a in repository["assetNodes"] if a["groupName"] == "acme"]
    first = run(graphql, acme)
    assert first["status"] == "SUCCESS"
    assert (first["tags"]["client"], first["tags"]["model"], first["tags"]["action"]) == ("acme", "m", "predict,train")

    (materialization,) = graphql(METADATA, path=path(predictions("acme")))["assetOrError"]["assetMaterializations"]
    assert materialization["runId"] == first["id"]
    entries = {e["label"]: e for e in materialization["metadataEntries"]}
    assert entries["dagster/row_count"]["intValue"] == 50
    assert entries["model_version"]["text"] == "1.0.0"
    assert entries["data_moved"]["text"].endswith(" KB")
    assert "customer_id" in entries["preview"]["mdStr"]
    assert graphql(METADATA, path=path(predictions("globex")))["assetOrError"]["assetMaterializations"] == []

    hourly = run(graphql, [path(dataset_key("acme", "data")), path(predictions("acme"))])
    assert hourly["status"] == "SUCCESS" and hourly["tags"]["action"] == "predict"
    stale = {
        key: graphql(STALE, path=path(key))["assetNodeOrError"]["staleStatus"]
        for key in (state("acme"), predictions("acme"))
    }
    assert stale == {state("acme"): "FRESH", predictions("acme"): "FRESH"}, "the hourly run left nothing Unsynced"

    browse(port)
    stop(process)


def path(key) -> list[str]:
    return list(key.path)


ARTIFACTS = Path(os.environ.get("MODELPEX_TEST_ARTIFACTS", REPO / "test-artifacts"))


def chromium() -> str:
    found = find("chromium")
    assert found, "no chromium: requires('chromium') should have skipped this test"
    return found


def page(url: str, expect: str, screenshot: Path) -> str:
    """The text a person sees at ``url`` once the UI has rendered ``expect``, with a screenshot of it.

    N.B. ``--no-sandbox``: Chromium refuses to run as root otherwise (CI does), and the page is our own UI on loopback.
    A fresh profile per call, so that no other Chromium's profile lock is in the way.
    """
    with tempfile.TemporaryDirectory(prefix="modelpex-chromium-") as profile:
        flags = [
            chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", "--window-size=1600,1100", "--virtual-time-budget=20000",
        ]  # fmt: skip
        text = ""
        for _ in range(3):  # N.B. The UI fetches what it shows after it loads; a slow machine may need another look.
            dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
            text = visible_text(dom)
            if expect in text:
                break
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    assert screenshot.stat().st_size > 10_000, f"{screenshot} is blank"
    return text


def visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


def browse(port: int) -> None:
    """The asset graph names every model's asset after its model; the predictions page shows the metadata."""
    base = f"http://127.0.0.1:{port}"
    graph = page(f"{base}/locations/modelpex/asset-groups/acme/lineage", "m_predictions", ARTIFACTS / "asset-graph.png")
    labels = set(graph.split())
    assert {"acme_m_state", "acme_m_predictions", "m_v1_0_0", "data"} <= labels, graph[:2000]
    assert not {"state", "predictions", "v1_0_0"} & labels, "a label without its model"

    url = f"{base}/assets/{'/'.join(path(predictions('acme')))}"
    asset = page(url, "class_balance", ARTIFACTS / "predictions.png")
    for shown in (
        "acme runs m 1.0.0 (follows latest): its predictions.",
        "Row count 50",
        "customer_id int64",  # N.B. The columns, from dagster/column_schema.
        "class_balance",
        "data_moved",
        "Latest check results 1",  # N.B. rows_match_input, on the Checks tab.
    ):
        assert shown in asset, f"{shown!r} not on the page: {asset[:3000]}"
    when = r"(\w{3} \d+, \d+:\d+ [AP]M )?"  # N.B. The overview's metadata table shows each entry's time.
    assert re.search(f"model_version {when}1.0.0 ", asset) and re.search(f"params {when}{{}}", asset), asset[:3000]


LATEST = """
query($path: [String!]!) { assetOrError(assetKey: {path: $path}) { ... on Asset {
    assetMaterializations(limit: 1) { timestamp metadataEntries { label ... on TextMetadataEntry { text } } }
} } }
"""


def latest(graphql: GraphQL, key) -> dict[str, str] | None:
    """The timestamp and text metadata of an asset's latest materialisation, None when it has none."""
    found = graphql(LATEST, path=path(key))["assetOrError"].get("assetMaterializations") or []
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


def test_changes_redeploy_themselves_without_a_reload(server: tuple[GraphQL, subprocess.Popen, int], project: Project):
    """No one presses Reload: an edit of the version acme follows is trained and predicted again, and a new release
    tag gets its asset and becomes what acme runs. The redeploy sensor reloads the code location through the
    webserver `modelpex ui` started; the assets' automation conditions do the rest."""
    graphql, process, _ = server
    everything = asset_paths(graphql)
    assert run(graphql, everything)["status"] == "SUCCESS", "deployed once, as `modelpex deploy` does"
    before, globex = latest(graphql, predictions("acme")), latest(graphql, predictions("globex"))
    model_py = project.models / "m" / "src" / "m" / "model.py"
    model_py.write_text(model_py.read_text() + "\n# an edit\n")
    poll("acme's predictions after the edit", lambda: latest(graphql, predictions("acme")) != before)
    poll(
        "globex's predictions after the edit (globex follows latest too)",
        lambda: latest(graphql, predictions("globex")) != globex,
    )

    pyproject = project.models / "m" / "pyproject.toml"
    project.commit_and_tag("m 1.0.0 edited")
    pyproject.write_text(pyproject.read_text().replace('"1.0.0"', '"2.0.0"'))
    project.commit_and_tag("m 2.0.0")
    pyproject.write_text(pyproject.read_text().replace('"2.0.0"', '"1.0.0"'))
    project.commit_and_tag("back to developing 1.0.0")
    project.git("tag", "m/v2.0.0", "HEAD~1")
    poll("the asset of m@2.0.0", lambda: ["model", "m", "m_v2_0_0"] in asset_paths(graphql))
    poll(
        "acme's predictions from m@2.0.0",
        lambda: (latest(graphql, predictions("acme")) or {}).get("model_version") == "2.0.0",
    )
    stop(process)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, as a supervisor stops a server (to its process group): it must exit on its own, with exit status 0,
    within 30 s."""
    servers.stop(process, "the server", 30, group=True)
    assert process.returncode == 0, f"exit code {process.returncode} after SIGTERM"


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
        process = spawn(
            [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", "workspace.yaml"],
            cwd=project.root,
            env=env,
            stdout=out,
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
        terminate(process, 0, signal.SIGKILL)


def _sensor_runs(instance: DagsterInstance) -> list:
    return instance.get_runs(filters=RunsFilter(tags={SENSOR_NAME_TAG: "modelpex_redeploy"}))


def _sensor_cursor(instance: DagsterInstance) -> bool:
    """The redeploy sensor's first tick is done. N.B. By name: the automation sensor keeps a cursor too, and an edit
    made once it ticked but before this one would be the tree this one first remembers."""
    return any(
        s.instigator_name == "modelpex_redeploy" and s.instigator_data and s.instigator_data.cursor
        for s in instance.all_instigator_state()
    )
