"""modelpex as a Dagster Component: `dg` lists it, an existing Dagster project adds a model repository with
`dg scaffold defs` and one defs.yaml, this repository is itself a dg project, and the component builds what the
workspace.yaml code location builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from dagster import AssetKey, ComponentTree, DagsterInstance

from orchestrator.component import ModelpexComponent
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
    assert {"model/m/m_v1_0_0", "acme/acme_m_state", "acme/acme_m_predictions", "modelpex/base"} <= assets
    assert {s["name"] for s in listed["sensors"]} == {"modelpex_automation", "modelpex_redeploy", "modelpex_failures"}


def test_this_repository_is_a_dg_project() -> None:
    done = dg("check", "defs", cwd=REPO, env={"MODELPEX_PROJECT": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "All definitions loaded successfully" in done.stdout + done.stderr


def test_the_component_builds_the_assets_of_the_repository_and_store_it_names(
    project: Project, store: LocalPexStore
) -> None:
    """Python first: the component built from objects, no YAML, for a repository and a store other than the ones
    this process would find (the working directory's, its ``pex_builds/``): it has every client's assets, and
    materialising the model version through it puts the pex in the store it was given."""
    m_model(project, "1.0.0")
    write_deployments(project, {"acme": client("latest"), "globex": client("1.0.0")})
    component = ModelpexComponent(project=str(project.root), store=str(store.root))
    built = component.build_defs(ComponentTree.for_test().load_context)
    keys = {key.to_user_string() for key in built.resolve_asset_graph().get_all_asset_keys()}
    expected = {f"{c}/{a}" for c in ("acme", "globex") for a in ("data", f"{c}_m_state", f"{c}_m_predictions")}
    assert keys == {"modelpex/base", "model/m/m_v1_0_0", *expected}
    assert {j.name for j in built.jobs} == {"build_model"}
    assert store.find("model", "m") == []
    with DagsterInstance.ephemeral() as instance:
        result = built.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance, asset_selection=[AssetKey(["model", "m", "m_v1_0_0"])]
        )
    assert result.success
    assert [r.version for r in store.find("model", "m")] == ["1.0.0"], "built into the component's store"


def _dagster(*args: str, root: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The `dagster` CLI as a code server or a run worker loads definitions: not a dev command, so the component
    reads its state and does not refresh it."""
    full = {k: v for k, v in os.environ.items() if k != "DAGSTER_IS_DEV_CLI"} | env
    command = [str(Path(sys.executable).with_name("dagster")), *args, "-m", "their_project.definitions"]
    return subprocess.run(command, cwd=root, env=full, capture_output=True, text=True, timeout=600)


def test_released_versions_load_from_state_where_git_is_not(
    project: Project, store: LocalPexStore, cli, tmp_path: Path
) -> None:
    """As dagster-dbt's test deletes the project "to simulate a PEX deploy": the state is refreshed where the tags
    are, CI stores the released pex, then `.git` goes (an image built without it). The client pinned to the release
    still has its assets, and its run fetches the pex CI stored, by its content key."""
    m_model(project, "1.0.0")
    project.commit_and_tag("m 1.0.0", "m/v1.0.0")
    m_model(project, "1.1.0")
    write_deployments(project, {"acme": client("1.0.0"), "globex": client("latest")})
    project.commit_and_tag("m 1.1.0 in the tree")
    built = cli("build", "m@1.0.0")
    assert built.returncode == 0, built.stderr
    root = their_project(tmp_path / "theirs")
    defs_yaml = root / "src" / "their_project" / "defs" / "models" / "defs.yaml"
    defs_yaml.parent.mkdir()
    defs_yaml.write_text(yaml.safe_dump({"type": COMPONENT, "attributes": {"project": str(project.root)}}))
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {"PYTHONPATH": str(root / "src"), "MODELPEX_STORE": str(store.root), "DAGSTER_HOME": str(home)}

    refreshed = dg("utils", "refresh-defs-state", cwd=root, env=env)
    assert refreshed.returncode == 0, refreshed.stderr
    state = root / "src" / "their_project" / "defs" / ".local_defs_state" / "ModelpexComponent" / "state"
    assert [(v["name"], v["version"]) for v in json.loads(state.read_text())["released"]] == [("m", "1.0.0")]

    shutil.rmtree(project.root / ".git")
    done = _dagster("asset", "materialize", "--select", "group:acme", root=root, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with DagsterInstance.from_config(str(home)) as instance:
        event = instance.get_latest_materialization_event(AssetKey(["acme", "acme_m_state"]))
        meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    assert (meta["model_version"], meta["pex"]) == ("1.0.0", "fetched"), meta

    refused = dg("check", "defs", cwd=root, env=env)  # N.B. dg refreshes as it loads: no tags, no refresh.
    assert refused.returncode != 0 and "has no git history" in refused.stdout + refused.stderr

    state.write_text('{"format": "modelpex-released-v1", "released": [{"name": "m", "version": "1.0.0"}]}')
    bad = _dagster("definitions", "validate", root=root, env=env)
    assert bad.returncode != 0 and f"modelpex state {state} is not valid" in bad.stdout + bad.stderr
    assert "dg utils refresh-defs-state" in bad.stdout + bad.stderr

    state.unlink()  # N.B. `modelpex build m@1.0.0` published its release record: the store alone declares it.
    from_store = _dagster("definitions", "validate", root=root, env=env)
    assert from_store.returncode == 0, from_store.stdout[-3000:] + from_store.stderr[-3000:]

    (store.root / "releases" / "m" / "1.0.0.json").unlink()
    missing = _dagster("definitions", "validate", root=root, env=env)
    output = missing.stdout + missing.stderr
    assert missing.returncode != 0 and "has no version '1.0.0'" in output and "refresh-defs-state" in output
    assert "modelpex build m@1.0.0" in output
