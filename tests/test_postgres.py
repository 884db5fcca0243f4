"""The documented PostgreSQL dagster.yaml works against a real PostgreSQL server the test starts on loopback."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from dagster import DagsterInstance

from orchestrator.store import LocalPexStore

from .conftest import REPO, Project, pg_bin
from .test_dagster import client, defs_for, m_model, predictions, run_client, write_deployments


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
            pg_bin("psql"),
            "-h",
            "127.0.0.1",
            "-p",
            postgres["DAGSTER_PG_PORT"],
            "-U",
            "modelpex",
            "-d",
            postgres["DAGSTER_PG_DB"],
            "-tAc",
            f"select count(*) from runs where run_id = '{result.run_id}'",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert count.stdout.strip() == "1"
