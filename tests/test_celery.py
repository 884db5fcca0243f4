"""Distributed steps on Dagster's Celery executor (MODELPEX_EXECUTOR=celery), every part real and on loopback:
Debian's redis-server as the broker, SeaweedFS as the store, PostgreSQL as the instance, and Celery workers that
are simulated hosts: each its own HOME, pex cache, modelpex cache and PEX_ROOT, and no local store. The test acts
as CI first (the base and the model versions published to S3), then launches runs as Dagster's CLI does
(`dagster asset materialize`: the run executes in that process and hands each step to the broker)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import yaml
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus
from filelock import FileLock

from orchestrator.errors import ModelpexError
from orchestrator.executors import run_executor
from orchestrator.s3store import S3PexStore
from orchestrator.settings import Settings
from orchestrator.store import ArtifactRecord

from .broker import RedisServer
from .conftest import REPO, S3_BUCKET, Project, SessionBase, make_project, postgres_database, shm_held
from .seaweed import SeaweedServer, unique_prefix
from .servers import spawn, terminate
from .system import require
from .test_dagster import client, m_model, predictions, state, write_deployments
from .test_topology import _failure, _overlap

CLIENTS = [f"c{i}" for i in range(8)]
CONCURRENCY = 2  # N.B. Per worker: two steps of one worker prepare the same base at once.
# N.B. Only the storage: these runs execute in the process that launches them, through no run coordinator.
INSTANCE = {
    "storage": yaml.safe_load((REPO / "orchestrator" / "dagster-postgres.yaml").read_text())["storage"],
    "telemetry": {"enabled": False},
}
BIN = Path(sys.executable).parent


def expected_version(client_name: str) -> str:
    """Odd clients pin m 1.0.0 (its release tag); even ones follow latest, 1.1.0 in the working tree."""
    return "1.0.0" if int(client_name[1:]) % 2 else "1.1.0"


def _project(project: Project) -> None:
    m_model(project, "1.0.0")
    project.commit_and_tag("m 1.0.0", "m/v1.0.0")
    m_model(project, "1.1.0")
    write_deployments(project, {name: client(expected_version(name)) for name in CLIENTS})
    project.commit_and_tag("m 1.1.0 and eight clients")


@dataclass(frozen=True)
class Host:
    """A simulated machine: what it keeps is its own; it shares only the project checkout (the image), the store,
    the instance, the broker and the signing key (a secret distributed to every host)."""

    name: str
    root: Path

    @classmethod
    def make(cls, name: str) -> Host:
        # N.B. Outside pytest's mode-0700 folder: model processes, another uid, read the cache's venvs.
        root = Path(tempfile.mkdtemp(prefix=f"modelpex-celery-{name}-"))
        root.chmod(0o755)
        for folder in ("home", "cache"):
            (root / folder).mkdir(mode=0o755)
        return cls(name, root)

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def env(self) -> dict[str, str]:
        return {
            "HOME": str(self.root / "home"),
            "PEX_ROOT": str(self.root / "home" / ".pex"),
            "MODELPEX_CACHE": str(self.cache),
            "MODELPEX_PEX_ROOT": str(self.cache / "pex_root"),
        }

    def fetched(self) -> list[Path]:
        """The verified artifacts in its cache."""
        return sorted((self.cache / "artifacts").glob("*.pex"))


@dataclass
class Worker:
    """One Celery worker process (`celery -A orchestrator.celery_worker worker`, as README says), on one host."""

    name: str
    host: Host
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def nodename(self) -> str:
        return f"{self.name}@{socket.gethostname()}"

    def tail(self, chars: int = 3000) -> str:
        return f"--- {self.name}\n{self.log.read_text(errors='replace')[-chars:]}"

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.ready_at() is None:
            assert self.process.poll() is None, f"worker {self.name} exited:\n{self.tail()}"
            assert time.monotonic() < deadline, f"worker {self.name} not ready in {timeout} s:\n{self.tail()}"
            time.sleep(0.1)

    def ready_at(self) -> float | None:
        """When the worker said it was ready to take tasks (epoch seconds, as file times are), from its own log line
        ``[2026-12-03 09:51:00,123: INFO/MainProcess] worker1@host ready.`` (local time); None before."""
        found = re.search(
            rf"^\[([\d-]+ [\d:]+,\d+): INFO/MainProcess\] {re.escape(self.nodename)} ready\.$",
            self.log.read_text(errors="replace"),
            re.M,
        )
        if found is None:
            return None
        return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()

    def stop(self) -> None:
        """Celery's warm shutdown (SIGTERM to the main process, as a supervisor stops it)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self) -> int | None:
        """Until it has exited (a minute at most), then nothing of its session may be left; its exit status, or None
        when it had to be killed."""
        try:
            code: int | None = self.process.wait(60)
        except subprocess.TimeoutExpired:
            code = None
        terminate(self.process, 0, signal.SIGKILL)  # N.B. Whatever is left of its session: the pool's children.
        return code


@dataclass
class Cluster:
    """The services and the artifacts every test here shares, and the workers and hosts they start."""

    folder: Path
    home: Path
    env: dict[str, str]
    broker: RedisServer
    store_url: str
    base: ArtifactRecord
    workers: list[Worker] = field(default_factory=list)
    hosts: list[Host] = field(default_factory=list)

    def host(self, name: str) -> Host:
        host = Host.make(name)
        self.hosts.append(host)
        return host

    def start_worker(self, name: str, host: Host, extra: dict[str, str] | None = None) -> Worker:
        broker = self.broker.url()
        command = [str(BIN / "celery"), "-A", "orchestrator.celery_worker", "-b", broker, "--result-backend", broker]
        # N.B. --disable-prefetch: a worker takes a step only into a free slot, never holds one back from an idle
        # worker while its own slots train (without it, each slot also reserved a queued step).
        command += ["worker", "-n", f"{name}@%h", "-c", str(CONCURRENCY), "--disable-prefetch", "-l", "INFO"]
        env = {**self.env, **host.env(), **self.executor(), **(extra or {})}
        log = self.folder / f"{name}.log"
        with open(log, "wb") as out:
            process = spawn(command, env=env, stdout=out)
        worker = Worker(name, host, process, log)
        self.workers.append(worker)
        return worker

    def executor(self) -> dict[str, str]:
        """The settings that put a run's steps on the workers (README, "Running on a cluster")."""
        return {"MODELPEX_EXECUTOR": "celery", "MODELPEX_CELERY_BROKER": self.broker.url()}

    def launch(self, clients: list[str], host: Host, extra: dict[str, str] | None = None) -> Launch:
        """A run over the clients' groups, as `dagster asset materialize` executes it: in its own process, each
        step handed to the broker."""
        select = " or ".join(f"group:{name}" for name in clients)
        command = [str(BIN / "dagster"), "asset", "materialize", "-m", "orchestrator.definitions", "-a", "defs"]
        env = {**self.env, **host.env(), **self.executor(), **(extra or {})}
        log = self.folder / f"launch-{'-'.join(clients)}-{len(list(self.folder.glob('launch-*')))}.log"
        with open(log, "wb") as out:
            process = spawn([*command, "--select", select], env=env, stdout=out)
        return Launch(clients, host, process, log)

    def instance(self) -> DagsterInstance:
        return DagsterInstance.from_config(str(self.home))

    def tail(self) -> str:
        return "\n".join(worker.tail() for worker in self.workers)

    def close(self) -> None:
        """Stop every worker, each of which must exit 0 on its own (a warm shutdown); then no process may be left
        that runs from a host's folders (a model process)."""
        for worker in self.workers:
            worker.stop()
        exits = {worker.name: worker.wait_stopped() for worker in self.workers}
        left = [p for p in psutil.process_iter(["pid", "cmdline"]) if self._runs_from_a_host(p.info["cmdline"])]
        for process in left:
            process.kill()
        for host in self.hosts:
            shutil.rmtree(host.root, ignore_errors=True)
        assert all(code == 0 for code in exits.values()), f"workers' exits on SIGTERM: {exits}\n{self.tail()}"
        assert not left, f"processes outlived their workers: {[p.info for p in left]}"

    def _runs_from_a_host(self, cmdline: list[str] | None) -> bool:
        return any(str(host.root) in arg for host in self.hosts for arg in cmdline or ())


@dataclass
class Launch:
    clients: list[str]
    host: Host
    process: subprocess.Popen[bytes]
    log: Path

    def wait(self, cluster: Cluster, timeout: float = 240) -> str:
        """The run's id, once the run is over."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            terminate(self.process, 0, signal.SIGKILL)
            raise AssertionError(
                f"run of {self.clients} not over in {timeout} s:\n{self.output()}\n{cluster.tail()}"
            ) from None
        run_id = self.run_id()
        assert run_id, f"run of {self.clients} did not start:\n{self.output()}\n{cluster.tail()}"
        return run_id

    def run_id(self) -> str | None:
        """The run's id, once it has started."""
        found = re.search(r" - ([0-9a-f-]{36}) - \d+ - RUN_START - ", self.log.read_text(errors="replace"))
        return found.group(1) if found else None

    def output(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        terminate(self.process, 0, signal.SIGKILL)


def _publish(project: Project, store_url: str, base_path: Path, base: ArtifactRecord, ci: Host, env: dict) -> None:
    """What CI does before any worker runs: the session's base (building it takes minutes) goes up through the
    store's API, then `modelpex build --all` finds it there and publishes both model versions."""
    S3PexStore(store_url, cache=ci.cache).put(base, base_path)
    built = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "build", "--all"],
        env={**env, **ci.env()},
        cwd=project.root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    assert [line.split()[:2] for line in built.stdout.splitlines()] == [
        ["cached", "base"],
        ["built", "unpacked"],  # N.B. The base's unpacked form, which cold workers install (`orchestrator.cache`).
        ["built", "m@1.0.0"],
        ["built", "m@1.1.0"],
    ], built.stdout


@pytest.fixture(scope="module")
def cluster(
    s3_server: SeaweedServer,
    postgres_cluster: dict[str, str],
    session_base: SessionBase,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    require("redis-server", "initdb")
    folder = tmp_path_factory.mktemp("celery")
    with ExitStack() as stack, pytest.MonkeyPatch.context() as monkeypatch:
        for name, value in s3_server.env().items():
            monkeypatch.setenv(name, value)  # N.B. The test reads the store too.
        postgres = postgres_database(postgres_cluster)  # N.B. The session's server, a database of its own.
        broker = RedisServer.start(folder)
        stack.callback(broker.stop)
        project = make_project(folder / "project")
        _project(project)
        home = folder / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text(yaml.safe_dump(INSTANCE))
        key = folder / "signing.key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        for name, value in postgres.items():
            monkeypatch.setenv(name, value)
        store_url = f"s3://{S3_BUCKET}/{unique_prefix('celery')}"
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "MODELPEX_PROJECT": str(project.root),
            "MODELPEX_STORE": store_url,
            "MODELPEX_SIGNING_KEY_FILE": str(key),
        }
        base = session_base.build.record
        cluster = Cluster(folder, home, env, broker, store_url, base)
        stack.callback(cluster.close)
        _publish(project, store_url, session_base.store_root / "bases" / base.filename, base, cluster.host("ci"), env)
        yield cluster


@dataclass
class Pair:
    """Two workers on two cold hosts, each started on first use and stopped with the cluster."""

    cluster: Cluster
    started: dict[int, Worker] = field(default_factory=dict)

    def start(self, number: int, host: Host | None = None) -> Worker:
        if number not in self.started:
            worker = self.cluster.start_worker(f"worker{number}", host or self.cluster.host(f"host{number}"))
            worker.wait_ready()
            self.started[number] = worker
        return self.started[number]

    def both(self) -> list[Worker]:
        return [self.start(1), self.start(2)]


@pytest.fixture(scope="module")
def pair(cluster: Cluster) -> Pair:
    return Pair(cluster)


@pytest.fixture
def launches() -> Iterator[list[Launch]]:
    """Launched runs: any still going when a test ends is killed."""
    made: list[Launch] = []
    yield made
    for launch in made:
        launch.kill()


# --- what the instance recorded ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepRun:
    step: str
    worker: str
    start: float
    end: float


def steps_of(instance: DagsterInstance, run_id: str) -> dict[str, StepRun]:
    """Each step of a run with the Celery worker that executed it (dagster-celery's engine event names it) and
    when it started and ended."""
    workers: dict[str, str] = {}
    times: dict[str, list[float]] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type == DagsterEventType.ENGINE_EVENT:
            worker = event.event_specific_data.metadata.get("Celery worker")
            if worker is not None:
                workers[event.step_key] = worker.value
        elif event.event_type in (DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS):
            times.setdefault(event.step_key, []).append(entry.timestamp)
    return {step: StepRun(step, workers.get(step, ""), min(t), max(t)) for step, t in times.items()}


def assert_materialised(instance: DagsterInstance, run_id: str, clients: list[str]) -> None:
    """The run succeeded and recorded every asset of its clients; predictions came from each client's version."""
    run = instance.get_run_by_id(run_id)
    assert run is not None and run.status == DagsterRunStatus.SUCCESS, _failure(instance, run_id)
    recorded = {
        entry.dagster_event.asset_key
        for entry in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)
    }
    wanted = {key for name in clients for key in (AssetKey([name, "data"]), state(name), predictions(name))}
    assert recorded == wanted, f"{run_id}: recorded {sorted(recorded)}"
    for name in clients:
        event = instance.get_latest_materialization_event(predictions(name))
        assert event is not None and event.run_id == run_id, name
        assert event.asset_materialization.metadata["model_version"].value == expected_version(name), name


def is_model_step(step: str) -> bool:
    return step.endswith(("_train", "_predict"))


def assert_cache_intact(host: Host, records: dict[str, ArtifactRecord], base: ArtifactRecord) -> None:
    """Every artifact in the host's cache is whole and is the store's (its sha256 recomputed here), vouched for,
    with no half-written copy beside it; the base's wheels are installed and the models' venvs run."""
    artifacts = host.cache / "artifacts"
    assert base.sha256 in {p.stem for p in host.fetched()}, f"{host.name} fetched the base"
    for path in host.fetched():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest == path.stem and digest in records, f"{host.name}: {path.name} is not what the store holds"
        assert path.with_suffix(".verified").is_file(), path
    assert not list(artifacts.glob(".*.tmp")), f"{host.name}: a copy was left half-written"
    # N.B. The base comes from its unpacked form (S3 stores have one): its wheels are installed, and the models'
    # venvs are built on them (the base's own venv is made only by `modelpex warm`).
    assert (artifacts / f"{base.sha256}.wheels").is_file(), f"{host.name}: the base's wheels are not installed"
    venvs = [Path(ready.read_text()) for ready in artifacts.glob("*.ready")]
    assert venvs, f"{host.name}: no model venv is ready"
    for venv in venvs:
        assert venv.is_relative_to(host.cache / "pex_root"), venv
        python = str(venv / "bin" / "python")
        done = subprocess.run([python, "-c", "import pandas, pyarrow, sklearn"], capture_output=True)
        assert done.returncode == 0, f"{host.name}: the venv {venv} is broken: {done.stderr.decode()[-2000:]}"


def store_records(cluster: Cluster) -> dict[str, ArtifactRecord]:
    return {record.sha256: record for record in S3PexStore(cluster.store_url).records()}


# --- the tests ----------------------------------------------------------------------------------------------------


def executor_config(env: dict[str, str]) -> dict:
    """The configuration the code location's executor runs with under these settings.

    N.B. Dagster has no public reader of a configured executor's values: its config schema resolves them."""
    executor = run_executor(Settings.from_env(env={"MODELPEX_STORE": "s3://bucket/prefix", **env}, project=str(REPO)))
    resolved = executor.config_schema.resolve_config({})
    assert resolved.success, resolved.errors
    return {"name": executor.name, **resolved.value["config"]}


def test_the_executor_setting_chooses_dagster_celery_on_the_broker_given() -> None:
    assert run_executor(Settings.from_env(env={}, project=str(REPO))).name == "in_process", "the default"
    broker = "redis://127.0.0.1:6379/0"
    config = executor_config({"MODELPEX_EXECUTOR": "celery", "MODELPEX_CELERY_BROKER": broker})
    assert (config["name"], config["broker"], config["backend"]) == ("celery", broker, broker), "results: the broker"
    backend = {"MODELPEX_CELERY_BACKEND": "redis://127.0.0.1:6379/1"}
    config = executor_config({"MODELPEX_EXECUTOR": "celery", "MODELPEX_CELERY_BROKER": broker, **backend})
    assert config["backend"] == "redis://127.0.0.1:6379/1"


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        pytest.param(
            {"MODELPEX_EXECUTOR": "threads"}, ["MODELPEX_EXECUTOR='threads'", "in_process, celery"], id="name"
        ),
        pytest.param({"MODELPEX_EXECUTOR": "celery"}, ["needs MODELPEX_CELERY_BROKER", "redis://"], id="no broker"),
        pytest.param(
            {"MODELPEX_EXECUTOR": "celery", "MODELPEX_CELERY_BROKER": "127.0.0.1:6379"},
            ["MODELPEX_CELERY_BROKER='127.0.0.1:6379' is not a URL", "e.g. redis://"],
            id="not a url",
        ),
    ],
)
def test_executor_settings_errors_are_one_line_naming_the_variable(env: dict[str, str], fragments: list[str]) -> None:
    with pytest.raises(ModelpexError) as raised:
        Settings.from_env(env=env, project=str(REPO))
    message = str(raised.value)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message


def test_celery_with_a_local_store_is_refused_in_one_line() -> None:
    """Workers on other hosts cannot see a folder on this one: the code location refuses to load, saying so."""
    env = {"MODELPEX_EXECUTOR": "celery", "MODELPEX_CELERY_BROKER": "redis://h:6379/0"}
    with pytest.raises(ModelpexError) as raised:
        run_executor(Settings.from_env(env=env, project=str(REPO)))
    message = str(raised.value)
    assert "\n" not in message and "is a folder on this host" in message and "s3://" in message, message


def test_without_dagster_celery_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # N.B. Every dagster_celery module: one an earlier test imported would otherwise be found in sys.modules.
    for name in [n for n in sys.modules if n == "dagster_celery" or n.startswith("dagster_celery.")] + [
        "dagster_celery"
    ]:
        monkeypatch.setitem(sys.modules, name, None)
    env = {"MODELPEX_EXECUTOR": "celery", "MODELPEX_CELERY_BROKER": "redis://h:6379/0", "MODELPEX_STORE": "s3://b/p"}
    settings = Settings.from_env(env=env, project=str(REPO))
    with pytest.raises(
        ModelpexError, match=r"MODELPEX_EXECUTOR=celery needs dagster-celery .*pip install -e '\.\[cluster\]'"
    ):
        run_executor(settings)


@pytest.mark.timeout(300)
def test_a_run_spreads_over_two_workers_one_starting_while_the_other_unpacks_the_base(
    cluster: Cluster, pair: Pair, launches: list[Launch]
) -> None:
    """Four clients in one run. Worker 1 (cold) takes the first steps, two at a time: two of them prepare the base at
    once in its one cache. While it unpacks the base, worker 2 starts on another cold host and takes the steps
    still queued. Each fetches the base from S3 into its own cache, which ends whole; the steps' events name the
    worker that ran them; the process that launched the run (a host of its own) fetched nothing.

    N.B. A slow unpack, made certain rather than hoped for: the test holds worker 1's own lock on unpacking the base
    (the lock its steps take) until worker 1 has two model steps waiting on it and worker 2 has started a model step;
    what happened in which order is then read from what was recorded: the steps' start events, worker 2's log line
    saying it was ready, the time worker 1's base was ready."""
    clients = CLIENTS[:4]
    host = cluster.host("host1")
    (host.cache / "locks").mkdir(mode=0o700)
    unpacking = FileLock(host.cache / "locks" / f"wheels-{cluster.base.sha256}.lock")
    with unpacking:
        first = pair.start(1, host)
        launch = cluster.launch(clients, cluster.host("launcher"))
        launches.append(launch)
        _poll(lambda: len(_model_steps(cluster, launch, first)) >= 2, "worker1 starts two model steps", launch)
        second = pair.start(2)
        _poll(lambda: _model_steps(cluster, launch, second), "worker2 starts a model step", launch)
    run_id = launch.wait(cluster)
    with cluster.instance() as instance:
        assert_materialised(instance, run_id, clients)
        steps = steps_of(instance, run_id)
    assert len(steps) == 3 * len(clients), sorted(steps)
    assert {s.worker for s in steps.values()} == {first.nodename, second.nodename}, f"all on the workers: {steps}"
    ready_at = (first.host.cache / "artifacts" / f"{cluster.base.sha256}.wheels").stat().st_mtime
    second_ready = second.ready_at()
    assert second_ready is not None and second_ready < ready_at, "worker2 was ready while worker1 unpacked the base"
    models = {
        w.name: [s for s in steps.values() if s.worker == w.nodename and is_model_step(s.step)] for w in pair.both()
    }
    assert any(s.start < ready_at for s in models["worker2"]), f"worker2 took model steps meanwhile: {steps}"
    preparing = [s.step for s in models["worker1"] if s.start < ready_at]
    assert len(preparing) >= 2, f"two steps of worker1 prepared the base at once: {models['worker1']}, {ready_at}"
    records = store_records(cluster)
    for worker in (first, second):
        assert_cache_intact(worker.host, records, cluster.base)
    assert launch.host.fetched() == [], "no step ran where the run was launched"
    print(
        f"\nworker2 was ready {ready_at - second_ready:.1f} s before worker1's base; worker1 prepared it "
        f"for {preparing} at once; model steps: { {name: [s.step for s in ran] for name, ran in models.items()} }"
    )


def _model_steps(cluster: Cluster, launch: Launch, worker: Worker) -> list[str]:
    """The model steps of ``launch``'s run that ``worker`` has started so far, as the instance recorded them."""
    run_id = launch.run_id()
    if run_id is None:
        return []
    with cluster.instance() as instance:
        steps = steps_of(instance, run_id).values()
    return [s.step for s in steps if s.worker == worker.nodename and is_model_step(s.step)]


@pytest.mark.timeout(400)
def test_eight_runs_at_once_on_two_workers(cluster: Cluster, pair: Pair, launches: list[Launch]) -> None:
    """Eight clients, a run each, launched together over shared model versions: every run succeeds with every
    materialisation recorded, both workers take part, no shared memory outlives a run, no cache is corrupt."""
    workers = pair.both()
    shm_before = shm_held()
    launcher = cluster.host("launcher8")
    started = time.monotonic()
    launches.extend(cluster.launch([name], launcher) for name in CLIENTS)
    run_ids = [launch.wait(cluster) for launch in launches]
    seconds = time.monotonic() - started
    with cluster.instance() as instance:
        for name, run_id in zip(CLIENTS, run_ids, strict=True):
            assert_materialised(instance, run_id, [name])
        records = [instance.get_run_record_by_id(run_id) for run_id in run_ids]
        steps = [step for run_id in run_ids for step in steps_of(instance, run_id).values()]
    assert _overlap(records) >= 2, "the runs ran at once"
    assert {s.worker for s in steps} == {w.nodename for w in workers}, "both workers took the runs' steps"
    assert shm_held() - shm_before < 1 << 20, "no segment outlived its run"
    artifacts = store_records(cluster)
    for worker in workers:
        assert_cache_intact(worker.host, artifacts, cluster.base)
    counts = {w.name: sum(s.worker == w.nodename for s in steps) for w in workers}
    print(f"\n8 runs in {seconds:.1f} s, at most {_overlap(records)} at once; steps per worker {counts}")


def _poll(done: Callable[[], bool], what: str, launch: Launch, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert launch.process.poll() is None, f"the run ended first:\n{launch.output()}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.05)


@pytest.mark.timeout(600)
def test_a_step_whose_worker_is_killed_goes_to_another_worker(
    cluster: Cluster, pair: Pair, launches: list[Launch]
) -> None:
    """kill -9 of a whole worker (its main process and its pool, as when its host dies) in the middle of a model
    step: the step was not acknowledged, so the broker hands it to the other worker once its visibility timeout
    (MODELPEX_CELERY_REDELIVER, here 2 minutes) has passed, and the run ends SUCCESS within minutes instead of staying
    STARTED for ever. The killed worker's exit status is SIGKILL's; the step's last execution is on the survivor.

    N.B. Mid-step made certain: the doomed worker's first model step prepares the base on a cold host, under the
    host's unpack lock, which the test holds until the step has started."""
    redeliver = 120
    timeout = {"MODELPEX_CELERY_REDELIVER": str(redeliver)}
    for number, worker in list(pair.started.items()):  # N.B. Earlier tests' workers would take the steps first.
        worker.stop()
        assert worker.wait_stopped() == 0, f"{worker.name} stopped warmly"
        cluster.workers.remove(worker)
        del pair.started[number]
    doomed_host = cluster.host("doomed")
    (doomed_host.cache / "locks").mkdir(mode=0o700)
    unpacking = FileLock(doomed_host.cache / "locks" / f"wheels-{cluster.base.sha256}.lock")
    with unpacking:
        doomed = cluster.start_worker("doomed", doomed_host, timeout)
        doomed.wait_ready()
        launch = cluster.launch(["c2"], cluster.host("launcher-lost"), timeout)
        launches.append(launch)
        _poll(lambda: _model_steps(cluster, launch, doomed), "the doomed worker starts a model step", launch)
        (lost_step,) = _model_steps(cluster, launch, doomed)
        os.killpg(doomed.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert doomed.process.wait(10) == -signal.SIGKILL, "the worker died of SIGKILL"
    cluster.workers.remove(doomed)  # N.B. Dead already: not one to stop warmly at the end.
    survivor = cluster.start_worker("survivor", cluster.host("survivor"), timeout)
    survivor.wait_ready()
    run_id = launch.wait(cluster, timeout=redeliver + 300)
    seconds = time.monotonic() - killed_at
    with cluster.instance() as instance:
        assert_materialised(instance, run_id, ["c2"])
        steps = steps_of(instance, run_id)
    assert steps[lost_step].worker == survivor.nodename, f"{lost_step} re-ran on the survivor: {steps}"
    assert seconds < redeliver + 300, f"the run ended {seconds:.0f} s after the kill"
    print(f"\n{lost_step}: its worker killed mid-step, re-delivered to {survivor.name}; run over {seconds:.0f} s later")


@pytest.mark.timeout(300)
def test_a_run_no_worker_takes_says_so(cluster: Cluster, launches: list[Launch]) -> None:
    """No worker listens on the run's broker (another Redis database): the run's log says so, naming the broker and
    the command that starts a worker, instead of waiting without a word."""
    empty = cluster.broker.url(7)
    launch = cluster.launch(["c4"], cluster.host("launcher-alone"), {"MODELPEX_CELERY_BROKER": empty})
    launches.append(launch)
    _poll(lambda: "no Celery worker answers on" in launch.output(100_000), "the run says no worker listens", launch)
    line = next(line for line in launch.output(100_000).splitlines() if "no Celery worker answers on" in line)
    assert empty in line and "celery -A orchestrator.celery_worker" in line, line
    with cluster.instance() as instance:
        run = instance.get_run_by_id(launch.run_id() or "")
        assert run is not None and run.status == DagsterRunStatus.STARTED, "still waiting: a worker may yet start"
