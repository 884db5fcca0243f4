"""Builds for the workers' platform: a pex complete platform in the key and the record, and a worker that refuses
an artifact built for a platform that is not its own, before anything of it runs."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.build import Builder
from orchestrator.errors import PlatformError
from orchestrator.platforms import PLATFORM_DETAIL, CompletePlatform, Interpreter, check_runs_here
from orchestrator.specs import load_base_env
from orchestrator.store import ArtifactRecord, LocalPexStore

from .conftest import CliResult, Project, SessionBase, store_snapshot, write_model
from .test_cli import assert_one_line_error

Cli = Callable[..., CliResult]
INSPECT_HINT = "pex3 interpreter inspect --markers --tags"


def inspect_here(path: Path) -> Path:
    """This interpreter's complete platform file, written by pex as the README tells a worker to write it."""
    pex3 = Path(sys.executable).with_name("pex3")
    command = [str(pex3), "interpreter", "inspect", "--markers", "--tags", "--python", Interpreter.detect().path]
    subprocess.run([*command, "--indent", "2", "-o", str(path)], check=True, capture_output=True)
    return path


def edited(source: Path, destination: Path, change: Callable[[dict], None]) -> Path:
    data = json.loads(source.read_text())
    change(data)
    destination.write_text(json.dumps(data))
    return destination


def newer_glibc(data: dict) -> None:
    """Workers with a glibc four minor versions newer than this machine's: every tag of this machine plus the four
    newer ones, which it does not accept.

    N.B. Offline, the only other platform the lock's cached wheels can be built for: it resolves to the very wheels
    this machine uses, so the build works, and only the recorded target tells the worker it is not for it.
    """
    prefix, glibc, arch = newest_manylinux(data)
    newer = [f"{prefix}-manylinux_2_{v}_{arch}" for v in range(glibc + NEWER, glibc, -1)]
    data["compatible_tags"] = newer + data["compatible_tags"]


NEWER = 4


def newest_manylinux(data: dict) -> tuple[str, int, str]:
    """The platform's first (most specific) manylinux tag, ``cp311-cp311-manylinux_2_36_x86_64`` as (``cp311-cp311``,
    36, ``x86_64``): this machine's glibc, whichever it is."""
    tag = next(t for t in data["compatible_tags"] if "-manylinux_2_" in t)
    prefix, _, rest = tag.partition("-manylinux_2_")
    glibc, _, arch = rest.partition("_")
    return prefix, int(glibc), arch


def macos(data: dict) -> None:
    markers = data["marker_environment"]
    markers.update(sys_platform="darwin", platform_system="Darwin", platform_machine="arm64", platform_release="24.0")
    python = f"cp{markers['python_version'].replace('.', '')}"
    data["compatible_tags"] = [f"{python}-{abi}-macosx_14_0_arm64" for abi in (python, "abi3")] + ["py3-none-any"]


def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0, 6.0]}), path)
    return path


@pytest.fixture
def here(tmp_path: Path) -> Path:
    return inspect_here(tmp_path / "here.json")


def test_build_for_this_interpreters_platform_and_run_it(
    cli: Cli,
    project: Project,
    store: LocalPexStore,
    session_base: SessionBase,
    here: Path,
    tmp_path: Path,
    fresh_cache: dict[str, str],
) -> None:
    write_model(project.models, "m")
    built = cli("build", "--complete-platform", str(here), "m")
    assert built.returncode == 0, built.stderr
    platform = CompletePlatform.load(here, "test")
    (base,) = [r for r in store.find("base", "base") if r.key != session_base.build.record.key]
    (model,) = store.find("model", "m")
    assert base.details[PLATFORM_DETAIL] == platform.to_json(), "the record says what the base was built for"
    assert model.base_key == base.key and model.interpreter == base.interpreter == platform.describe()
    native = Builder(store, load_base_env(project.root / "base_env"))
    assert base.key != native.base_key, "a build for a platform never takes the native build's key"

    output = tmp_path / "out.parquet"
    env = {**fresh_cache, "MODELPEX_COMPLETE_PLATFORM": str(here)}
    before = store_snapshot(store)
    ran = cli("run", "m", "--input", f"data={data_file(tmp_path)}", "--output", str(output), env=env)
    assert ran.returncode == 0, ran.stderr
    assert pq.read_table(output)["y"].to_pylist() == [4.0, 5.0, 6.0, 9.0]
    assert store_snapshot(store) == before, "the worker found the artifacts by the same keys: nothing was rebuilt"
    again = cli("build", "--all", env={"MODELPEX_COMPLETE_PLATFORM": str(here)})
    assert [line.split()[0] for line in again.stdout.splitlines()] == ["cached", "cached"], again.stdout

    collected = cli("gc", env=fresh_cache)  # N.B. Without the setting: this machine's own target is native.
    assert collected.returncode == 0, collected.stderr
    assert store.find("model", "m") == [model] and base in store.find("base", "base"), collected.stdout


def test_an_artifact_for_another_platform_is_refused_before_it_runs(
    cli: Cli, project: Project, store: LocalPexStore, here: Path, tmp_path: Path, fresh_cache: dict[str, str]
) -> None:
    write_model(project.models, "m")
    other = edited(here, tmp_path / "newer-glibc.json", newer_glibc)
    built = cli("build", "--complete-platform", str(other), "m")
    assert built.returncode == 0, built.stderr
    (model,) = store.find("model", "m")
    worker_tag = json.loads(here.read_text())["compatible_tags"][0]

    output = tmp_path / "out.parquet"
    before = store_snapshot(store)
    refused = cli(
        "run",
        "m",
        "--input",
        f"data={data_file(tmp_path)}",
        "--output",
        str(output),
        env={**fresh_cache, "MODELPEX_COMPLETE_PLATFORM": str(other)},
    )
    assert_one_line_error(
        refused,
        "refusing to run m@1.0.0",
        f"built for {json.loads(other.read_text())['compatible_tags'][0]}",
        f"this worker's {worker_tag}",
        INSPECT_HINT,
        "modelpex build --complete-platform FILE",
    )
    assert "training" not in refused.stderr and not output.exists()
    assert store_snapshot(store) == before
    cache = Path(fresh_cache["MODELPEX_CACHE"])
    assert not list((cache / "artifacts").iterdir()), "nothing of the artifact was copied to the cache"
    assert not list(cache.glob("runs/*")), "no model process folder was made"
    assert store.find("model", "m") == [model]


def test_building_for_a_platform_the_lock_does_not_cover_fails_clearly(
    cli: Cli, store: LocalPexStore, here: Path, tmp_path: Path
) -> None:
    """A base for macOS from a lock made for Linux: pex has no wheel for it, and says so without compiling sdists
    (it would, for minutes, without ``--no-build``) or reaching for the network."""
    mac = edited(here, tmp_path / "macos.json", macos)
    published = {k: v for k, v in store_snapshot(store).items() if k.startswith(("bases", "models", "index"))}
    result = cli("build", "--complete-platform", str(mac), "base", timeout=120)
    assert result.returncode == 1, result.stderr
    first = result.stderr.splitlines()[0]
    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert first.startswith(f"error: building the base pex for {python}-{python}-macosx_14_0_arm64"), first
    assert "the lock has no wheel for this target of numpy" in first, first
    after = {k: v for k, v in store_snapshot(store).items() if k.startswith(("bases", "models", "index"))}
    assert after == published, "nothing was published (a failed build leaves its lock file, as any build does)"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read it"),
        ("{not json", "is not a pex complete platform"),
        ("[]", "is a JSON list, not an object"),
        ('{"marker_environment": {}}', "lacks a marker_environment object or a non-empty compatible_tags list"),
        ('{"marker_environment": {"os": "linux"}, "compatible_tags": ["py3-none-any"]}', "not PEP 508"),
        ('{"marker_environment": {}, "compatible_tags": ["manylinux"]}', "'manylinux' among its compatible_tags"),
    ],
)
def test_a_complete_platform_file_is_checked_in_one_line(
    cli: Cli, project: Project, store: LocalPexStore, tmp_path: Path, content: str | None, problem: str
) -> None:
    path = tmp_path / "platform.json"
    if content is not None:
        path.write_text(content)
    before = store_snapshot(store)
    assert_one_line_error(
        cli("build", "--complete-platform", str(path), "base"), f"--complete-platform {path}", problem, INSPECT_HINT
    )
    write_model(project.models, "m")
    args = ("--input", f"data={data_file(tmp_path)}", "--output", str(tmp_path / "out.parquet"))
    ran = cli("run", "m", *args, env={"MODELPEX_COMPLETE_PLATFORM": str(path)})
    assert_one_line_error(ran, f"MODELPEX_COMPLETE_PLATFORM {path}", problem)
    assert store_snapshot(store) == before


def test_which_platforms_a_worker_accepts(here: Path, tmp_path: Path) -> None:
    worker = Interpreter.detect().platform
    assert CompletePlatform.load(here, "test") == worker, "the file and the worker's own inspection agree"
    data = json.loads(here.read_text())
    older = dict(data, compatible_tags=[t for t in data["compatible_tags"] if "manylinux_2_3" not in t])
    kernel = dict(data, marker_environment={**data["marker_environment"], "platform_release": "7.0.0"})
    for accepted in (older, kernel):
        assert CompletePlatform.parse(accepted).refusal(worker) is None

    def python_3_99(d: dict) -> None:
        d["marker_environment"]["python_version"] = "3.99"

    refusals = {
        "python_version": edited(here, tmp_path / "py.json", python_3_99),
        "platform_machine is 'arm64'": edited(here, tmp_path / "mac.json", macos),
        f"manylinux_2_{newest_manylinux(data)[1] + NEWER}": edited(here, tmp_path / "glibc.json", newer_glibc),
    }
    for fragment, path in refusals.items():
        assert fragment in (CompletePlatform.load(path, "test").refusal(worker) or ""), fragment


def test_the_key_depends_on_the_platform_not_on_the_file(project: Project, store: LocalPexStore, here: Path) -> None:
    base_env = load_base_env(project.root / "base_env")
    platform = CompletePlatform.load(here, "test")
    reformatted = json.loads(here.read_text()) | {"path": "/elsewhere/python3"}
    same = CompletePlatform.parse(reformatted)
    other = CompletePlatform.parse(json.loads(here.read_text()) | {"compatible_tags": ["py3-none-any"]})
    keys = [Builder(store, base_env, platform=p).base_key for p in (platform, same, other, None)]
    assert keys[0] == keys[1] and len(set(keys)) == 3


def test_a_native_base_of_another_interpreter_is_refused(session_base: SessionBase) -> None:
    here = Interpreter.detect()
    base = session_base.build.record
    check_runs_here(base, base, here)
    other = f"cpython-{sys.version_info.major}.{sys.version_info.minor + 1}.0"  # N.B. Never this interpreter.
    elsewhere = dataclasses.replace(base, interpreter=f"{other}-linux-aarch64-glibc-2.39")
    with pytest.raises(PlatformError, match=rf"refusing to run base: .* built for the interpreter {re.escape(other)}"):
        check_runs_here(elsewhere, elsewhere, here)
    record = ArtifactRecord("base", "base", base.version, base.key, details={PLATFORM_DETAIL: {"compatible_tags": 1}})
    with pytest.raises(PlatformError, match="the complete platform in its index record lacks"):
        check_runs_here(record, record, here)
