"""modelpex as a Dagster Component: `dg` lists it, an existing Dagster project adds a model repository with
`dg scaffold defs` and one defs.yaml, this repository is itself a dg project, and the component builds what the
workspace.yaml code location builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from dagster import ComponentTree

from orchestrator.component import ModelpexComponent
from orchestrator.definitions import build_definitions
from orchestrator.settings import Settings
from orchestrator.store import LocalPexStore

from .conftest import REPO, Project
from .test_dagster import client, m_model, write_deployments

COMPONENT = "orchestrator.component.ModelpexComponent"


def dg(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real `dg` CLI of this environment (the venv counts as activated, as in a user's shell)."""
    venv = Path(sys.executable).parent.parent
    full = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", **(env or {})}
    command = [str(venv / "bin" / "dg"), *args]
    return subprocess.run(command, cwd=cwd, env=full, capture_output=True, text=True, timeout=300)


def their_project(root: Path) -> Path:
    """A Dagster project as `create-dagster project` lays it out, knowing nothing of modelpex."""
    package = root / "src" / "their_project"
    (package / "defs").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        '[project]\nname = "their-project"\nversion = "0.1.0"\n\n[tool.dg]\ndirectory_type = "project"\n\n'
        '[tool.dg.project]\nroot_module = "their_project"\n'
    )
    (package / "__init__.py").write_text("")
    (package / "defs" / "__init__.py").write_text("")
    (package / "definitions.py").write_text(
        textwrap.dedent(
            """
            from pathlib import Path

            import dagster as dg


            @dg.definitions
            def defs() -> dg.Definitions:
                return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
            """
        )
    )
    return root


def test_dg_lists_the_component() -> None:
    done = dg("list", "components", "--json", cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert COMPONENT in {entry["key"] for entry in json.loads(done.stdout)["items"]}


def test_an_existing_project_adds_a_model_repository(project: Project, store: LocalPexStore, tmp_path: Path) -> None:
    m_model(project, "1.0.0")
    write_deployments(project, {"acme": client("latest")})
    root = their_project(tmp_path / "theirs")
    env = {"PYTHONPATH": str(root / "src"), "MODELPEX_STORE": str(store.root)}
    done = dg("scaffold", "defs", COMPONENT, "models", "--project", str(project.root), cwd=root, env=env)
    assert done.returncode == 0, done.stderr
    defs_yaml = root / "src" / "their_project" / "defs" / "models" / "defs.yaml"
    assert yaml.safe_load(defs_yaml.read_text()) == {"type": COMPONENT, "attributes": {"project": str(project.root)}}

    checked = dg("check", "defs", cwd=root, env=env)
    assert checked.returncode == 0, checked.stderr
    listed = json.loads(dg("list", "defs", "--json", cwd=root, env=env).stdout)
    assets = {a["asset_key"] for a in listed["assets"]}
    assert {"model/m/m_v1_0_0", "acme/m/m_state", "acme/m/m_predictions", "modelpex/base"} <= assets
    assert {s["name"] for s in listed["sensors"]} == {"modelpex_automation", "modelpex_redeploy", "modelpex_failures"}


def test_this_repository_is_a_dg_project() -> None:
    done = dg("check", "defs", cwd=REPO, env={"MODELPEX_PROJECT": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "All definitions loaded successfully" in done.stdout + done.stderr


def test_the_component_builds_what_the_code_location_builds(project: Project, store: LocalPexStore) -> None:
    """Python first: the component built from objects, no YAML, equals `build_definitions` for the same repo."""
    m_model(project, "1.0.0")
    write_deployments(project, {"acme": client("latest"), "globex": client("1.0.0")})
    component = ModelpexComponent(project=str(project.root), store=str(store.root))
    built = component.build_defs(ComponentTree.for_test().load_context)
    direct = build_definitions(Settings.from_env(env={}, project=str(project.root), store_url=str(store.root)))
    keys = set(built.resolve_asset_graph().get_all_asset_keys())
    assert keys == set(direct.resolve_asset_graph().get_all_asset_keys())
    assert len(keys) == 8, "the base, m@1.0.0, and per client (two) its data, state and predictions"
    assert {j.name for j in built.jobs} == {j.name for j in direct.jobs}
