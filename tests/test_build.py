"""Real pex builds: the base is reused by key, a model pex carries only its own bytes, conflicts fail clearly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.build import Builder, model_requirements
from orchestrator.errors import DependencyConflictError, SpecError
from orchestrator.specs import load_base_env, load_model_spec
from orchestrator.store import LocalPexStore
from orchestrator.versions import resolve_source

from .conftest import REPO, CliResult, Project, SessionBase, copy_example, store_snapshot, write_model


def builder_for(project: Project, store: LocalPexStore) -> Builder:
    return Builder(store, load_base_env(project.root / "base_env"))


def build(project: Project, store: LocalPexStore, ref: str, tmp_path: Path, **kwargs: bool):
    from orchestrator.specs import ModelRef

    source = resolve_source(project.root, project.models, ModelRef.parse(ref), tmp_path / "exports")
    return builder_for(project, store).model(source, **kwargs)


def own_bytes(pex: Path) -> int:
    """Compressed bytes in a pex that are not pex's bootstrap (the same ~1.1 MB in every pex)."""
    with zipfile.ZipFile(pex) as archive:
        return sum(i.compress_size for i in archive.infolist() if not i.filename.startswith(".bootstrap/"))


def test_base_is_reused_by_key(session_base: SessionBase, project: Project, store: LocalPexStore) -> None:
    """A second builder of the same base_env finds the session's base by its key and builds nothing."""
    again = builder_for(project, store).base()
    assert again.cached and again.record == session_base.build.record
    assert again.record.size > 50_000_000  # numpy, pandas, polars, pyarrow, scikit-learn
    store.verify(again.record)


def test_model_pex_is_small_and_rebuilt_only_on_change(project: Project, store: LocalPexStore, tmp_path: Path) -> None:
    folder = write_model(project.models, "m")
    first = build(project, store, "m", tmp_path)
    assert not first.cached
    pex = store.local_path(first.record)
    assert own_bytes(pex) < 100_000, own_bytes(pex)
    with zipfile.ZipFile(pex) as archive:
        names = archive.namelist()
        info = json.loads(archive.read("PEX-INFO"))
    assert not any(n.startswith(".deps/") for n in names), "a pure-Python model must not re-bundle base packages"
    assert info["pex_path"] == f"base-{first.record.base_key}.pex"
    assert info["venv"] is True
    assert build(project, store, "m", tmp_path).cached
    (folder / "src" / "m" / "model.py").write_text((folder / "src" / "m" / "model.py").read_text() + "\n# edit\n")
    changed = build(project, store, "m", tmp_path)
    assert not changed.cached and changed.record.key != first.record.key
    assert {r.key for r in store.find("model", "m", "1.0.0")} == {first.record.key, changed.record.key}


def test_model_with_extra_dependency_ships_only_that(project: Project, store: LocalPexStore, tmp_path: Path) -> None:
    copy_example(project, "credit_risk")
    result = build(project, store, "credit_risk", tmp_path)
    with zipfile.ZipFile(store.local_path(result.record)) as archive:
        deps = {n.split("/")[1].split("-")[0].lower() for n in archive.namelist() if n.startswith(".deps/")}
    assert "pydantic" in deps and "pydantic_core" in deps
    assert not deps & {"numpy", "pandas", "polars", "pyarrow", "scikit_learn", "scipy"}
    assert result.record.details["requirements"] == ["pydantic>=2"]


def test_conflict_with_base_names_package_requirement_and_version(
    project: Project, store: LocalPexStore, tmp_path: Path
) -> None:
    write_model(project.models, "m", dependencies=("modelpex-base", "numpy>=3"))
    before = store_snapshot(store)
    numpy = load_base_env(project.root / "base_env").pins()["numpy"]
    with pytest.raises(DependencyConflictError, match=rf"requires 'numpy>=3' but the base ships numpy {numpy}"):
        build(project, store, "m", tmp_path)
    assert store_snapshot(store) == before


def test_requirements_the_base_satisfies_are_not_resolved_again() -> None:
    spec = load_model_spec(REPO / "model_packages" / "churn")
    assert model_requirements(spec, load_base_env(REPO / "base_env").pins()) == []


def test_extra_dependency_without_lock_says_how_to_lock(project: Project, store: LocalPexStore, tmp_path: Path) -> None:
    write_model(project.models, "m", dependencies=("modelpex-base", "pydantic>=2"))
    with pytest.raises(SpecError, match=r"no lock file .*run `modelpex lock m`"):
        build(project, store, "m", tmp_path)


def test_stale_lock_is_refused(project: Project, store: LocalPexStore, tmp_path: Path) -> None:
    folder = copy_example(project, "credit_risk")
    pyproject = folder / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"pydantic>=2"', '"pydantic>=2.5"'))
    with pytest.raises(SpecError, match=r"lock of model 'credit_risk' was made for \['pydantic>=2'\]"):
        build(project, store, "credit_risk", tmp_path)


def test_syntax_error_fails_the_build_and_leaves_the_store(
    project: Project, store: LocalPexStore, tmp_path: Path
) -> None:
    write_model(project.models, "m", code="def train(inputs, params)\n    return 1\n")
    before = store_snapshot(store)
    with pytest.raises(SpecError, match="syntax error"):
        build(project, store, "m", tmp_path)
    assert store_snapshot(store) == before


def test_versions_from_git_tags_live_side_by_side(project: Project, store: LocalPexStore, tmp_path: Path) -> None:
    folder = write_model(project.models, "m", version="1.0.0")
    released = project.commit_and_tag("m 1.0.0", "m/v1.0.0")
    pyproject = folder / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "1.0.0"', 'version = "1.1.0"'))
    project.commit_and_tag("m 1.1.0")
    old, new = build(project, store, "m@1.0.0", tmp_path), build(project, store, "m", tmp_path)
    assert (old.record.version, old.record.git_commit) == ("1.0.0", released)
    assert new.record.version == "1.1.0" and old.record.key != new.record.key
    assert {r.version for r in store.records() if r.kind == "model"} == {"1.0.0", "1.1.0"}


def _build_command(project: Project, store: LocalPexStore, model: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "MODELPEX_PROJECT": str(project.root), "MODELPEX_STORE": str(store.root)}
    return [sys.executable, "-m", "orchestrator.cli", "build", model], env


def test_two_processes_building_one_key(project: Project, store: LocalPexStore) -> None:
    write_model(project.models, "m")
    command, env = _build_command(project, store, "m")
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    assert sorted(o.split()[0] for o in outputs) == ["built", "cached"]
    (record,) = store.find("model", "m")
    store.verify(record)


def _session_commands(session: int) -> list[str]:
    """Command lines of the live processes in ``session`` (a process group leader's pid)."""
    commands = []
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rpartition(")")[2].split()
            if proc.name.isdigit() and int(fields[3]) == session:
                commands.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError, IndexError):
            continue
    return commands


def _kill_while_pex_builds(process: subprocess.Popen, store: LocalPexStore) -> Path:
    """SIGKILL the build's whole session once pex runs inside a build folder; return that folder.

    N.B. Proves a build was in progress when killed: a kill before the build started would prove nothing.
    """
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        folders = [p for p in (store.root / "work").glob("build-*") if p.is_dir()]
        if folders and any(" -m pex " in c for c in _session_commands(process.pid)):
            break
        assert process.poll() is None, "the build ended before it could be killed"
        time.sleep(0.01)
    else:
        pytest.fail("no pex build started within 120 s")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    (folder,) = folders
    return folder


def _assert_left_behind(store: LocalPexStore, folder: Path) -> None:
    """What a killed build leaves: its leased build folder (with the base it was building on) and its lock file."""
    assert sorted(p.name for p in (store.root / "work").iterdir()) == [folder.name, f"{folder.name}.lock"]
    assert any(p.name.startswith("base-") for p in folder.iterdir()), "the model build had begun in it"


def test_killed_build_publishes_nothing(
    project: Project, store: LocalPexStore, cli: Callable[..., CliResult], fresh_cache: dict[str, str]
) -> None:
    write_model(project.models, "m")
    command, env = _build_command(project, store, "m")
    folder = _kill_while_pex_builds(subprocess.Popen(command, env=env, start_new_session=True), store)
    assert store.find("model", "m") == []
    assert not list((store.root / "models").rglob("*.pex"))
    _assert_left_behind(store, folder)
    gc = cli("gc", env={**fresh_cache, "MODELPEX_GC_GRACE": "0.001"})
    assert gc.returncode == 0, gc.stderr
    assert f"removed {folder}, left by a run that ended" in gc.stdout
    assert list((store.root / "work").iterdir()) == []
    assert cli("build", "m").stdout.startswith("built  m@1.0.0")


def test_killed_forced_rebuild_keeps_the_old_artifact(project: Project, store: LocalPexStore, cli, fresh_cache) -> None:
    write_model(project.models, "m")
    assert cli("build", "m").returncode == 0
    (old,) = store.find("model", "m")
    before = store_snapshot(store)
    command, env = _build_command(project, store, "m")
    folder = _kill_while_pex_builds(subprocess.Popen([*command, "--force"], env=env, start_new_session=True), store)
    assert store.find("model", "m") == [old], "the old artifact stays published until a new one replaces it"
    store.verify(old)
    _assert_left_behind(store, folder)
    assert cli("gc", env={**fresh_cache, "MODELPEX_GC_GRACE": "0.001"}).returncode == 0
    assert store_snapshot(store) == before, "gc removed the killed build's folder, and nothing else"
