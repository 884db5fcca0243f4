"""The documented PostgreSQL dagster.yaml works against a real PostgreSQL server the test starts on loopback."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance

from orchestrator.store import LocalPexStore

from .conftest import REPO, Project
from .test_dagster import client, defs_for, m_model, predictions, run_client, write_deployments


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    assert found, f"{name} not found: install PostgreSQL (Debian: apt-get install postgresql), as .ci/run does"
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(command: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server tools as the postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres() -> Iterator[dict[str, str]]:
    # N.B. Not under pytest's tmp_path: that is private to root, and the server runs as the postgres user.
    root = Path(tempfile.mkdtemp(prefix="modelpex-pg-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (root, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
    subprocess.run(
        _as_postgres([_pg_bin("initdb"), "-D", str(data), "-U", "modelpex", "--auth=trust"]),
        check=True,
        capture_output=True,
    )
    port = str(_free_port())
    # N.B. mmap dynamic shared memory keeps the server's own segments out of /dev/shm, where ours are checked.
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c dynamic_shared_memory_type=mmap"
    # N.B. -l: the server must not inherit our pipes, or waiting for pg_ctl's output would wait for the server.
    subprocess.run(
        _as_postgres(
            [_pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start"]
        ),
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=60,
    )
    try:
        subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", port, "-U", "modelpex", "dagster"], check=True)
        yield {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": port,
            "DAGSTER_PG_DB": "dagster",
            "DAGSTER_PG_USER": "modelpex",
            "DAGSTER_PG_PASSWORD": "",
        }
    finally:
        subprocess.run(
            _as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]), capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def test_runs_and_metadata_live_in_postgres(
    postgres: dict[str, str], project: Project, store: LocalPexStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in postgres.items():
        monkeypatch.setenv(name, value)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO / "orchestrator" / "dagster-postgres.yaml", home / "dagster.yaml")
    m_model(project, "1.0.0")
    write_deployments(project, {"acme": client("latest")})
    defs = defs_for(project, store)
    with DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        result = run_client(defs, instance, "acme")
        assert result.success
    with DagsterInstance.from_config(str(home)) as reopened:
        event = reopened.get_latest_materialization_event(predictions("acme"))
        assert event is not None and event.run_id == result.run_id
        assert event.asset_materialization.metadata["dagster/row_count"].value == 50
    count = subprocess.run(
        [
            _pg_bin("psql"),
            "-h",
            "127.0.0.1",
            "-p",
            postgres["DAGSTER_PG_PORT"],
            "-U",
            "modelpex",
            "-d",
            "dagster",
            "-tAc",
            f"select count(*) from runs where run_id = '{result.run_id}'",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert count.stdout.strip() == "1"
