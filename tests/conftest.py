"""Shared fixtures: one real base pex per test session, and throwaway projects and stores built around it."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from orchestrator.build import Builder, BuildResult
from orchestrator.specs import load_base_env
from orchestrator.store import LocalPexStore

from .seaweed import SERVICE_PIDS, SeaweedServer, unique_prefix

if TYPE_CHECKING:
    from orchestrator.transport import SegmentPool

REPO = Path(__file__).resolve().parents[1]


def shm_used() -> int:
    """Bytes in use on /dev/shm: our segments are unnamed, so what they hold shows only here."""
    stat = os.statvfs("/dev/shm")
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


SHM_AT_START = shm_used()


def assert_pool_holds_only_idle(pool: SegmentPool, before: int) -> None:
    """Between calls a pool holds idle segments only, and /dev/shm no more than they take (``before`` the pool).

    N.B. Check before the pool closes: closing frees leased segments too, so a call that never gave its segments
    back is invisible afterwards, and so to the suite-level check below, which runs once every pool has closed.
    """
    assert pool.leased_bytes() == 0, "every call gave its segments back"
    assert shm_used() <= before + pool.held_bytes() + (1 << 20), "/dev/shm holds only what the pool keeps idle"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No shared memory of ours may outlive the suite: every test closed its model processes and pools.

    N.B. This sees only segments nobody closed; a leak inside a live pool is checked where the pool lives
    (`assert_pool_holds_only_idle`), and a timed-out call's on a tmpfs of its own (tests/test_transport.py).
    """
    import gc

    gc.collect()
    grown = shm_used() - SHM_AT_START
    if grown > 1 << 20:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\n/dev/shm holds {grown / 1e6:.1f} MB more than when the suite started", file=sys.stderr)


def leaked_children() -> list[object]:
    """This process's descendants, less the servers the session keeps running (SeaweedFS) and theirs."""
    import psutil

    services = {pid for pid in SERVICE_PIDS if psutil.pid_exists(pid)}
    for pid in list(services):
        services |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
    return [child for child in psutil.Process().children(recursive=True) if child.pid not in services]


_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".hypothesis")


@dataclass(frozen=True)
class SessionBase:
    store_root: Path
    build: BuildResult


@pytest.fixture(scope="session")
def session_base(tmp_path_factory: pytest.TempPathFactory) -> SessionBase:
    """The repository's base_env built for real, once per session (about 20 s with pex's wheel cache warm)."""
    root = tmp_path_factory.mktemp("session-store")
    builder = Builder(LocalPexStore(root), load_base_env(REPO / "base_env"))
    return SessionBase(root, builder.base())


def clone_store(session: SessionBase, root: Path) -> LocalPexStore:
    """A fresh store already holding the session's base (hard-linked: tests must never modify it)."""
    record = session.build.record
    for relative in (f"bases/{record.filename}", f"index/base/{record.key}.json"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        os.link(session.store_root / relative, root / relative)
    return LocalPexStore(root)


@pytest.fixture
def store(session_base: SessionBase, tmp_path: Path) -> LocalPexStore:
    return clone_store(session_base, tmp_path / "store")


S3_BUCKET = "modelpex"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS server on loopback for the session (up in about 3 s), with the bucket ``modelpex``; it must stop
    cleanly at the end (exit 0 on SIGTERM), or the session reports an error."""
    server = SeaweedServer.start(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.create_bucket(S3_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_url(s3_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh ``s3://`` store URL (a prefix of its own in the session's bucket), with the standard AWS variables
    that reach the server set for this test, as a user would set them."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return f"s3://{S3_BUCKET}/{unique_prefix(request.node.name)}"


def write_model(
    models_dir: Path,
    name: str,
    *,
    version: str = "1.0.0",
    code: str | None = None,
    dependencies: tuple[str, ...] = ("modelpex-base",),
    frames: str = "pyarrow",
    tool: str | None = None,
) -> Path:
    """A small model folder; by default it trains a mean and predicts ``x`` plus that mean."""
    folder = models_dir / name
    (folder / "src" / name).mkdir(parents=True, exist_ok=True)
    deps = ", ".join(f'"{d}"' for d in dependencies)
    table = (
        tool
        if tool is not None
        else (f'[tool.modelpex]\ntrain = "{name}.model:train"\npredict = "{name}.model:predict"\nframes = "{frames}"\n')
    )
    (folder / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "{version}"\ndependencies = [{deps}]\n\n{table}'
    )
    (folder / "src" / name / "__init__.py").write_text("")
    (folder / "src" / name / "model.py").write_text(textwrap.dedent(code or DEFAULT_MODEL_CODE))
    return folder


DEFAULT_MODEL_CODE = """
    import pyarrow as pa
    import pyarrow.compute as pc


    def train(inputs, params):
        return {"mean": pc.mean(inputs["data"]["x"]).as_py()}


    def predict(inputs, state, params):
        x = inputs["data"]["x"]
        return pa.table({"x": x, "y": pc.add(x, state["mean"] + params.get("offset", 0))})
"""


@dataclass(frozen=True)
class Project:
    root: Path

    @property
    def models(self) -> Path:
        return self.root / "model_packages"

    def git(self, *args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(self.root), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    def commit_and_tag(self, message: str, *tags: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-qm", message)
        for tag in tags:
            self.git("tag", tag)
        return self.git("rev-parse", "HEAD")


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """A throwaway modelpex repository (a git work tree) with the real base_env and no models yet."""
    return make_project(tmp_path / "project")


def make_project(root: Path) -> Project:
    """A modelpex repository at ``root`` (a git work tree) with the real base_env and no models yet; for fixtures
    of a wider scope than `project`'s."""
    shutil.copytree(REPO / "base_env", root / "base_env", ignore=_IGNORE)
    (root / "model_packages").mkdir()
    project = Project(root)
    project.git("init", "-q", "-b", "main")
    project.git("config", "user.email", "tests@modelpex.invalid")
    project.git("config", "user.name", "modelpex tests")
    return project


def copy_example(project: Project, name: str) -> Path:
    return Path(shutil.copytree(REPO / "model_packages" / name, project.models / name, ignore=_IGNORE))


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(project: Project, store: LocalPexStore) -> Callable[..., CliResult]:
    """Run the real ``modelpex`` command in a subprocess against the test project and store.

    ``wrap`` is a command prefix it runs under (`read_only`, for instance).
    """

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300, wrap: Sequence[str] = ()) -> CliResult:
        full_env = {
            **os.environ,
            "MODELPEX_PROJECT": str(project.root),
            "MODELPEX_STORE": str(store.root),
            **(env or {}),
        }
        done = subprocess.run(
            [*wrap, sys.executable, "-m", "orchestrator.cli", *args],
            capture_output=True,
            text=True,
            env=full_env,
            cwd=project.root,
            timeout=timeout,
        )
        return CliResult(done.returncode, done.stdout, done.stderr)

    return run


def read_only(path: Path) -> list[str]:
    """A command prefix: run the rest in a mount namespace of its own where ``path`` is a read-only bind mount.

    N.B. Root ignores mode bits, so only a read-only mount really refuses root's writes; the mount is private to
    that namespace, so nothing else on the machine sees it.
    """
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, str(path)]


def store_snapshot(store: LocalPexStore) -> dict[str, int]:
    """Every file and folder in the store with its size (-1 for a folder): artifacts and index, and also work/,
    locks/ and states/, so that "the store is unchanged" catches a build folder, a lock or a state left behind."""
    return {
        str(p.relative_to(store.root)): -1 if p.is_dir() else p.stat().st_size for p in sorted(store.root.rglob("*"))
    }


@pytest.fixture
def fresh_cache() -> Iterator[dict[str, str]]:
    """Settings for an empty artifact cache (so artifacts come from the store again) on the shared PEX_ROOT.

    N.B. Outside pytest's mode-0700 temporary folder: model processes' private folders live in the cache.
    """
    from orchestrator.settings import Settings

    folder = Path(tempfile.mkdtemp(prefix="modelpex-test-cache-"))
    folder.chmod(0o755)
    yield {"MODELPEX_CACHE": str(folder), "MODELPEX_PEX_ROOT": str(Settings.from_env(env={}).model_pex_root)}
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def sample_table() -> Iterator[object]:
    import pyarrow as pa

    yield pa.table({"x": pa.array([1.0, 2.0, 3.0, 6.0])})


def pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    assert found, f"{name} not found: install PostgreSQL (Debian: apt-get install postgresql), as .ci/run does"
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(command: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server tools as the postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres() -> Iterator[dict[str, str]]:
    with postgres_server() as variables:
        yield variables


@contextmanager
def postgres_server() -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL server on loopback with a database ``dagster``; yields the ``DAGSTER_PG_*`` variables
    that orchestrator/dagster-postgres.yaml reads. Stopped and removed on exit."""
    # N.B. Not under pytest's tmp_path: that is private to root, and the server runs as the postgres user.
    root = Path(tempfile.mkdtemp(prefix="modelpex-pg-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (root, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
    subprocess.run(
        _as_postgres([pg_bin("initdb"), "-D", str(data), "-U", "modelpex", "--auth=trust"]),
        check=True,
        capture_output=True,
    )
    port = str(free_port())
    # N.B. mmap dynamic shared memory keeps the server's own segments out of /dev/shm, where ours are checked.
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c dynamic_shared_memory_type=mmap"
    # N.B. -l: the server must not inherit our pipes, or waiting for pg_ctl's output would wait for the server.
    subprocess.run(
        _as_postgres([pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start"]),
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=60,
    )
    try:
        subprocess.run([pg_bin("createdb"), "-h", "127.0.0.1", "-p", port, "-U", "modelpex", "dagster"], check=True)
        yield {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": port,
            "DAGSTER_PG_DB": "dagster",
            "DAGSTER_PG_USER": "modelpex",
            "DAGSTER_PG_PASSWORD": "",
        }
    finally:
        subprocess.run(
            _as_postgres([pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]), capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)
