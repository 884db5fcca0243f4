"""Shared fixtures: one real base pex per test session, and throwaway projects and stores built around it."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from orchestrator.build import Builder, BuildResult
from orchestrator.errors import ModelpexError
from orchestrator.specs import load_base_env
from orchestrator.store import ArtifactRecord, LocalPexStore, file_sha256

from . import servers
from .seaweed import SERVICE_PIDS, SeaweedServer, unique_prefix
from .servers import log_tail, spawn, stop
from .system import find, require

if TYPE_CHECKING:
    from orchestrator.transport import SegmentPool

REPO = Path(__file__).resolve().parents[1]


def cache_folder(prefix: str) -> Path:
    """A new, empty folder beside the one modelpex caches in by default (/var/cache when models run as another user,
    ~/.cache otherwise), for a cache of a test's own.

    N.B. Not under pytest's mode-0700 temporary folder, which the model user cannot reach, nor under /tmp or /var/tmp,
    which bubblewrap replaces with private ones: there a model would see a fresh folder around its own, not the
    cache (tests/test_isolation.py's attacks would write into that and look allowed).
    """
    from orchestrator.settings import Settings

    parent = Settings.from_env(env={}, project=str(REPO)).cache_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    folder.chmod(0o755)
    return folder


def _session_cache() -> Path:
    """A modelpex cache of this test session's own (MODELPEX_CACHE, for every test and the commands they start), on
    the PEX_ROOT this machine's set-up warmed (``modelpex warm``): model processes' folders (``runs/``) and verified
    copies are this session's alone, whoever else runs modelpex or its tests on the machine. Removed when the
    session ends.
    """
    from orchestrator.settings import Settings

    os.environ.setdefault("MODELPEX_PEX_ROOT", str(Settings.from_env(project=str(REPO)).model_pex_root))
    folder = cache_folder("modelpex-test-session-")
    os.environ["MODELPEX_CACHE"] = str(folder)
    return folder


SESSION_CACHE = _session_cache()


def cache_env(**more: str) -> dict[str, str]:
    """The session's cache settings (and ``more``), for a `Settings.from_env(env=...)` that must not fall back to the
    machine's default cache."""
    return {name: os.environ[name] for name in ("MODELPEX_CACHE", "MODELPEX_PEX_ROOT")} | more


def shm_held(root: int | None = None) -> int:
    """Bytes of shared memory (unnamed files on /dev/shm, memfds) held open or mapped by process ``root`` (this one by
    default) and its descendants, each segment counted once.

    N.B. What the tests created, and only that: other sessions and other engineers' work share this machine's
    /dev/shm, so its overall use says nothing about ours. A process that outlived its parent is no longer a
    descendant; tests that kill processes check that none is left (`leaked_children`, the tests' own scans).
    """
    import psutil

    try:
        top = psutil.Process(root)
        processes = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    sizes: dict[tuple[int, int], int] = {}
    for process in processes:
        sizes.update(_segments_of(process.pid))
    return sum(sizes.values())


def _is_segment(target: str) -> bool:
    return target.startswith(("/dev/shm/", "/memfd:"))


def _segments_of(pid: int) -> dict[tuple[int, int], int]:
    """(device, inode) -> allocated bytes of each segment ``pid`` holds as a descriptor or maps."""
    found: dict[tuple[int, int], int] = {}
    proc = Path(f"/proc/{pid}")
    try:
        for fd in (proc / "fd").iterdir():
            try:
                if _is_segment(os.readlink(fd)):
                    info = os.stat(fd)
                    found[(info.st_dev, info.st_ino)] = info.st_blocks * 512
            except OSError:
                continue
        maps = (proc / "maps").read_text()
    except OSError:
        return found
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not _is_segment(fields[5]):
            continue
        major, minor = (int(part, 16) for part in fields[3].split(":"))
        key = (os.makedev(major, minor), int(fields[4]))
        if key not in found:
            start, end = (int(part, 16) for part in fields[0].split("-"))
            try:
                info = os.stat(proc / "map_files" / fields[0])
                found[key] = info.st_blocks * 512
            except OSError:  # N.B. map_files is root's only: the mapping's length, then.
                found[key] = end - start
    return found


def assert_pool_holds_only_idle(pool: SegmentPool, before: int) -> None:
    """Between calls a pool holds idle segments only, and we no more shared memory than they take (``before`` the
    pool).

    N.B. Check before the pool closes: closing frees leased segments too, so a call that never gave its segments
    back is invisible afterwards, and so to the suite-level check below, which runs once every pool has closed.
    """
    assert pool.leased_bytes() == 0, "every call gave its segments back"
    assert shm_held() <= before + pool.held_bytes() + (1 << 20), "we hold only the shared memory the pool keeps idle"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No shared memory of ours may outlive the suite: every test closed its model processes and pools.

    N.B. This sees only segments nobody closed; a leak inside a live pool is checked where the pool lives
    (`assert_pool_holds_only_idle`), and a timed-out call's on a tmpfs of its own (tests/test_transport.py).
    """
    import gc

    gc.collect()
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)
    held = shm_held()
    if held > 1 << 20:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nthe test session still holds {held / 1e6:.1f} MB of shared memory", file=sys.stderr)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under ``CI=true`` a skipped test is a failure: CI must run every test (`.ci/run` sets it). Elsewhere a test
    that needs a program the machine lacks is skipped, saying which package to install (`tests/system.py`)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and _in_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true, and this test was skipped: {reason}"


def leaked_children() -> list[object]:
    """This process's descendants, less the servers the tests started (`tests.servers.spawn`), theirs and the reaper."""
    import psutil

    services = {pid for pid in servers.services() | SERVICE_PIDS if psutil.pid_exists(pid)}
    for pid in list(services):
        try:
            services |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    return [child for child in psutil.Process().children(recursive=True) if child.pid not in services]


_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".hypothesis")


@dataclass(frozen=True)
class SessionBase:
    store_root: Path
    build: BuildResult


@pytest.fixture(scope="session")
def session_base(tmp_path_factory: pytest.TempPathFactory) -> SessionBase:
    """The repository's base_env as a base pex, in a store of the session's own, once per session.

    N.B. Set-up has usually built it already (`.ci/setup` runs `modelpex build --all` into the project's store,
    pex_builds/): that very artifact is taken, found by its key and its bytes hashed against its record, instead of
    a second build of the same key (a minute or more). Otherwise (base_env changed since, or no set-up) it is built
    here, for real; `SessionBase.build.cached` says which.
    """
    root = tmp_path_factory.mktemp("session-store")
    builder = Builder(LocalPexStore(root), load_base_env(REPO / "base_env"))
    record = _built_base(builder.base_key)
    if record is not None:
        for relative in (f"bases/{record.filename}", f"index/base/{record.key}.json"):
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            os.link(REPO / "pex_builds" / relative, root / relative)
    return SessionBase(root, builder.base())


def _built_base(key: str) -> ArtifactRecord | None:
    """The base of ``key`` in the project's store, whole (its bytes hashed against its record), or None."""
    if not (REPO / "pex_builds" / "index").is_dir():
        return None
    built = LocalPexStore(REPO / "pex_builds")
    try:
        record = built.record("base", "base", key)
        return record if record is not None and file_sha256(built.local_path(record)) == record.sha256 else None
    except (ModelpexError, OSError):
        return None


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
    folder = cache_folder("modelpex-test-cache-")
    yield {"MODELPEX_CACHE": str(folder), "MODELPEX_PEX_ROOT": os.environ["MODELPEX_PEX_ROOT"]}
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def sample_table() -> Iterator[object]:
    import pyarrow as pa

    yield pa.table({"x": pa.array([1.0, 2.0, 3.0, 6.0])})


def pg_bin(name: str) -> str:
    """A PostgreSQL program, from the server's own folder (Debian keeps the server's tools off PATH)."""
    require("initdb")
    found = Path(str(find("initdb"))).with_name(name)
    assert found.is_file(), f"{found} is missing: reinstall PostgreSQL (apt-get install postgresql)"
    return str(found)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(command: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server tools as the postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[dict[str, str]]:
    """One PostgreSQL server for the session (`postgres_server`): each test takes a database of its own on it
    (`postgres`), which saves an initdb and a server start per test and isolates them as well."""
    with postgres_server() as variables:
        yield variables


@pytest.fixture
def postgres(postgres_cluster: dict[str, str]) -> dict[str, str]:
    """The ``DAGSTER_PG_*`` variables of a fresh, empty database of this test's own on the session's server."""
    return postgres_database(postgres_cluster)


def postgres_database(server: dict[str, str]) -> dict[str, str]:
    """A new database on ``server`` (`postgres_server`'s variables); its variables, naming it."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    host, port, user = (server[f"DAGSTER_PG_{part}"] for part in ("HOST", "PORT", "USER"))
    subprocess.run([pg_bin("createdb"), "-h", host, "-p", port, "-U", user, name], check=True)
    return {**server, "DAGSTER_PG_DB": name}


@contextmanager
def postgres_server() -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL server on loopback with a database ``dagster``; yields the ``DAGSTER_PG_*`` variables
    that orchestrator/dagster-postgres.yaml reads. Its stop is checked (a fast shutdown, exit 0), and its folder
    removed.

    N.B. The server itself (``postgres``), not ``pg_ctl start``, whose server detaches: started by `spawn`, it dies
    with the test session however that ends.
    """
    # N.B. Not under pytest's tmp_path: that is private to root, and the server runs as the postgres user.
    root = Path(tempfile.mkdtemp(prefix="modelpex-pg-"))
    try:
        data, sockets, log = root / "data", root / "sockets", root / "server.log"
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
        # N.B. mmap dynamic shared memory keeps the server's own segments off /dev/shm.
        options = ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "dynamic_shared_memory_type=mmap"]
        with open(log, "wb") as out:
            server = spawn(
                [pg_bin("postgres"), "-D", str(data), "-p", port, "-k", str(sockets), *options],
                user="postgres" if os.geteuid() == 0 else None,
                stdout=out,
            )
        try:
            _wait_for_postgres(server, port, log)
            subprocess.run([pg_bin("createdb"), "-h", "127.0.0.1", "-p", port, "-U", "modelpex", "dagster"], check=True)
            yield {
                "DAGSTER_PG_HOST": "127.0.0.1",
                "DAGSTER_PG_PORT": port,
                "DAGSTER_PG_DB": "dagster",
                "DAGSTER_PG_USER": "modelpex",
                "DAGSTER_PG_PASSWORD": "",
            }
        finally:
            # N.B. SIGINT is PostgreSQL's fast shutdown: clients are disconnected, and it exits 0 when all went well.
            stop(server, "PostgreSQL", 60, sig=signal.SIGINT, tail=lambda: log_tail(log, 20))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_postgres(server: subprocess.Popen, port: str, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    ready = [pg_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", port, "-t", "1"]
    while subprocess.run(ready, check=False).returncode != 0:
        assert server.poll() is None, f"PostgreSQL exited with {server.returncode} at start:\n{log_tail(log, 20)}"
        assert time.monotonic() < deadline, f"PostgreSQL did not answer in {seconds:.0f} s:\n{log_tail(log, 20)}"
        time.sleep(0.1)
