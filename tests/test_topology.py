"""Dagster's production topology on one machine: the instance on PostgreSQL, a code server
(`dagster code-server start`), the daemon with the queued run coordinator and a concurrency limit, and the
webserver, each its own process on loopback. Eight runs at once share model versions; the redeploy sensor and an
`on_cron` condition launch runs, and those runs execute there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, DagsterInstance, DagsterRunStatus
from dagster._core.storage.dagster_run import RunsFilter

from orchestrator.store import LocalPexStore

from .conftest import REPO, Project, free_port, shm_held
from .servers import spawn, stop, terminate
from .test_dagster import client, m_model

CONCURRENCY = 8
CLIENTS = [f"c{i}" for i in range(CONCURRENCY)] + ["cron"]  # N.B. One more run than the limit lets run at once.
INSTANCE = {
    "storage": yaml.safe_load((REPO / "orchestrator" / "dagster-postgres.yaml").read_text())["storage"],
    "run_coordinator": {
        "module": "dagster._core.run_coordinator",
        "class": "QueuedRunCoordinator",
        "config": {"max_concurrent_runs": CONCURRENCY},
    },
    "telemetry": {"enabled": False},
}


@dataclass
class Topology:
    home: Path
    graphql: Callable[..., dict]
    processes: dict[str, subprocess.Popen]
    logs: Path

    def instance(self) -> DagsterInstance:
        return DagsterInstance.from_config(str(self.home))

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(self.logs.glob("*.log")))


def _graphql(port: int) -> Callable[..., dict]:
    def call(query: str, **variables: object) -> dict:
        body = json.dumps({"query": query, "variables": variables}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = json.load(response)
        assert "errors" not in payload, payload
        return payload["data"]

    return call


def _start(name: str, command: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    with open(logs / f"{name}.log", "w") as log:
        return spawn(command, env=env, stdout=log)


def _project(project: Project) -> None:
    """Model m: 1.0.0 released, 1.1.0 in the tree. Nine clients share the two versions; `cron` also predicts every
    minute from an `on_cron` condition."""
    m_model(project, "1.0.0")
    project.commit_and_tag("m 1.0.0", "m/v1.0.0")
    m_model(project, "1.1.0")
    clients = {name: client("1.0.0" if i % 2 else "latest") for i, name in enumerate(CLIENTS)}
    # N.B. cron pins 1.0.0: an edit of 1.1.0 while its every-minute prediction runs would fail that run, rightly
    # (its state was trained by the code before the edit), and the redeploy's own prediction would follow.
    clients["cron"] = {**client("1.0.0"), "schedules": {"predict": "* * * * *"}}
    (project.root / "deployments.yaml").write_text(yaml.safe_dump({"clients": clients}))
    project.commit_and_tag("m 1.1.0 and eight clients")


@pytest.fixture
def topology(
    postgres: dict[str, str], project: Project, store: LocalPexStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Topology]:
    _project(project)
    for name, value in postgres.items():
        monkeypatch.setenv(name, value)  # N.B. The test reads the instance too.
    home, logs = tmp_path / "dagster_home", tmp_path / "logs"
    home.mkdir()
    logs.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(INSTANCE))
    code_port, web_port = free_port(), free_port()
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        yaml.safe_dump(
            {"load_from": [{"grpc_server": {"host": "127.0.0.1", "port": code_port, "location_name": "modelpex"}}]}
        )
    )
    env = {**os.environ, **postgres, "DAGSTER_HOME": str(home)}
    code_env = {
        **env,
        "MODELPEX_PROJECT": str(project.root),
        "MODELPEX_STORE": str(store.root),
        "MODELPEX_SENSOR_INTERVAL": "2",
        "MODELPEX_WEBSERVER_URL": f"http://127.0.0.1:{web_port}",
    }
    bin_dir = Path(sys.executable).parent
    processes = {
        "code-server": _start(
            "code-server",
            [
                str(bin_dir / "dagster"),
                "code-server",
                "start",
                "-m",
                "orchestrator.definitions",
                "-a",
                "defs",
                "-h",
                "127.0.0.1",
                "-p",
                str(code_port),
                "--location-name",
                "modelpex",
            ],
            code_env,
            logs,
        ),
    }
    graphql = _graphql(web_port)
    topology = Topology(home, graphql, processes, logs)
    try:
        _wait("the code server", lambda: _answers_grpc(code_port), topology)
        processes["webserver"] = _start(
            "webserver",
            [str(bin_dir / "dagster-webserver"), "-w", str(workspace), "-h", "127.0.0.1", "-p", str(web_port)],
            env,
            logs,
        )
        processes["daemon"] = _start(
            "daemon", [str(bin_dir / "dagster-daemon"), "run", "-w", str(workspace)], env, logs
        )
        _wait("the webserver", lambda: _answers_graphql(graphql), topology)
        yield topology
        _stop("daemon", topology)  # N.B. First: no new run (cron predicts every minute) starts after it.
        with topology.instance() as instance:
            _wait("the runs in flight", lambda: not instance.get_runs(filters=RunsFilter(statuses=RUNNING)), topology)
        _stop("webserver", topology)
        # N.B. `dagster code-server start` waits out its gRPC server's grace period on SIGTERM, past 60 s on a loaded
        # machine (CI): no run is in flight by now, so the `finally` below ends it without waiting.
        os.killpg(processes["code-server"].pid, signal.SIGTERM)
    finally:
        for process in processes.values():
            terminate(process, 0, signal.SIGKILL)


RUNNING = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]


def _stop(name: str, topology: Topology) -> None:
    """SIGTERM, as a supervisor stops a server: it must exit on its own, cleanly, within 60 s."""
    stop(topology.processes[name], name, 60, tail=topology.tail)


def _answers_grpc(port: int) -> bool:
    from dagster._grpc.client import DagsterGrpcClient

    try:
        return DagsterGrpcClient(port=port, host="127.0.0.1").ping("x") is not None
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _answers_graphql(graphql: Callable[..., dict]) -> bool:
    try:
        return bool(graphql("{ version }")["version"])
    except (urllib.error.URLError, ConnectionError):
        return False


def _wait(what: str, ready: Callable[[], bool], topology: Topology, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for name, process in topology.processes.items():
            assert process.poll() is None, f"{name} exited:\n{topology.tail()}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s\n{topology.tail()}"
        time.sleep(0.5)


LAUNCH = """
mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
    __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
} }
"""
ASSETS = (
    "{ repositoriesOrError { ... on RepositoryConnection { nodes { assetNodes { assetKey { path } groupName } } } } }"
)
REPOSITORY = {"repositoryLocationName": "modelpex", "repositoryName": "__repository__"}
DONE = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


def _launch(graphql: Callable[..., dict], client_name: str) -> str:
    """One client's assets, as the UI's Materialize on its group does: Dagster's asset job over the selection."""
    (repository,) = graphql(ASSETS)["repositoriesOrError"]["nodes"]
    keys = [{"path": a["assetKey"]["path"]} for a in repository["assetNodes"] if a["groupName"] == client_name]
    selector = {**REPOSITORY, "jobName": "__ASSET_JOB", "assetSelection": keys}
    params = {"selector": selector, "runConfigData": {}}
    launched = graphql(LAUNCH, params=params)["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def _overlap(runs: list) -> int:
    """The most runs that were executing at one moment, from their recorded start and end times."""
    edges = sorted([(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs])
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


def test_production_topology_runs_many_clients_at_once(topology: Topology, project: Project) -> None:
    shm_before = shm_held()
    run_ids = [_launch(topology.graphql, name) for name in CLIENTS]
    with topology.instance() as instance:
        _wait("nine runs", lambda: all(instance.get_run_by_id(r).status in DONE for r in run_ids), topology, 600)
        runs = [instance.get_run_record_by_id(r) for r in run_ids]
        failed = [r.dagster_run.run_id for r in runs if r.dagster_run.status != DagsterRunStatus.SUCCESS]
        assert not failed, f"failed runs {failed}:\n{topology.tail()}"
        assert 2 <= _overlap(runs) <= CONCURRENCY, "they ran at once, within the coordinator's limit"
        for name, run_id in zip(CLIENTS, run_ids, strict=True):
            event = instance.get_latest_materialization_event(AssetKey([name, f"{name}_m_predictions"]))
            assert event is not None and event.run_id == run_id, name
            version = event.asset_materialization.metadata["model_version"].value
            assert version == ("1.0.0" if CLIENTS.index(name) % 2 or name == "cron" else "1.1.0"), name
    assert shm_held() - shm_before < 1 << 20, "no segment outlived its run"

    with topology.instance() as instance:
        _wait("the on_cron run of client cron", lambda: _automation_runs(instance, "cron"), topology, 150)
        model_py = project.models / "m" / "src" / "m" / "model.py"
        model_py.write_text(model_py.read_text() + "\n# an edit for the clients that follow latest\n")
        edited = time.time()
        followers = [name for i, name in enumerate(CLIENTS) if i % 2 == 0 and name != "cron"]
        _wait("the followers' redeploy", lambda: all(_predicted(instance, c) > edited for c in followers), topology)
        pinned = [c for c in CLIENTS if c not in followers and c != "cron"]  # N.B. cron predicts every minute.
        assert all(_predicted(instance, c) < edited for c in pinned), "pinned: untouched"
        launched = instance.get_runs(filters=RunsFilter(tags={"dagster/from_automation_condition": "true"}))
        _wait(
            "the automation's runs",
            lambda: all(instance.get_run_by_id(r.run_id).status in DONE for r in launched),
            topology,
        )
        failed = [r.run_id for r in launched if instance.get_run_by_id(r.run_id).status != DagsterRunStatus.SUCCESS]
        assert not failed, "\n".join(_failure(instance, run_id) for run_id in failed)


def _failure(instance: DagsterInstance, run_id: str) -> str:
    """A failed run's selection and its first error, for the assertion message."""
    run = instance.get_run_by_id(run_id)
    errors = [
        _innermost(e.dagster_event.event_specific_data.error)
        for e in instance.all_logs(run_id)
        if e.dagster_event and e.dagster_event.is_step_failure
    ]
    return f"{run_id} {sorted(k.to_user_string() for k in run.asset_selection or ())}: {errors[:2]}"


def _innermost(error) -> str:
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def _predicted(instance: DagsterInstance, client_name: str) -> float:
    """When ``client_name``'s predictions were last materialised (epoch seconds)."""
    event = instance.get_latest_materialization_event(AssetKey([client_name, f"{client_name}_m_predictions"]))
    return event.timestamp if event else 0.0


def _automation_runs(instance: DagsterInstance, client_name: str) -> list:
    """Runs the automation sensor launched that materialise ``client_name``'s predictions."""
    runs = instance.get_runs(filters=RunsFilter(tags={"dagster/from_automation_condition": "true"}))
    key = AssetKey([client_name, f"{client_name}_m_predictions"])
    return [r for r in runs if r.asset_selection and key in r.asset_selection]
