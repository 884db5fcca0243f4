"""Cold start on a new host: the base published unpacked and compiled (`Builder.unpacked`), installed into an empty
PEX_ROOT from the store (`orchestrator.cache`) instead of pex unpacking the base there; refused when its bytes are
not the recorded ones, safe when two processes install it at once, and never able to write outside PEX_ROOT."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.build import Builder
from orchestrator.cache import INSTALLED, ArtifactCache, pack_unpacked
from orchestrator.errors import IntegrityError
from orchestrator.platforms import Interpreter
from orchestrator.specs import load_base_env
from orchestrator.store import ArtifactRecord, LocalPexStore, file_sha256

from .conftest import (
    REPO,
    CliResult,
    ModelBuilds,
    Project,
    SessionBase,
    cache_folder,
    clone_store,
    link_or_copy,
    write_model,
)


@dataclasses.dataclass(frozen=True)
class Unpacked:
    """A store holding the session's base and its unpacked form, built once for this module."""

    root: Path
    base: ArtifactRecord
    record: ArtifactRecord


@pytest.fixture(scope="module")
def unpacked(session_base: SessionBase, tmp_path_factory: pytest.TempPathFactory) -> Unpacked:
    store = clone_store(session_base, tmp_path_factory.mktemp("unpacked-store"))
    builder = Builder(store, load_base_env(REPO / "base_env"))
    base = session_base.build.record
    result = builder.unpacked(base)
    assert result is not None and not result.cached
    assert builder.unpacked(base).cached, "published once, then found by the base's key"
    return Unpacked(store.root, base, result.record)


def store_with(unpacked: Unpacked, root: Path, *, copy: bool = False) -> LocalPexStore:
    """A store of a test's own holding the base and its unpacked form (a copy, for a test that alters it)."""
    record = unpacked.record
    for relative in (
        f"bases/{unpacked.base.filename}",
        f"index/base/{record.key}.json",
        f"bases/{record.filename}",
        f"index/base-unpacked/{record.key}.json",
    ):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        source = unpacked.root / relative
        if copy and relative == f"bases/{record.filename}":
            shutil.copyfile(source, root / relative)
        else:
            link_or_copy(source, root / relative)
    return LocalPexStore(root)


@pytest.fixture
def store(unpacked: Unpacked, tmp_path: Path) -> LocalPexStore:
    """The `cli` fixture's store: the base and its unpacked form."""
    return store_with(unpacked, tmp_path / "store")


@pytest.fixture
def empty_cache() -> Iterator[Path]:
    """A cache and PEX_ROOT of their own, empty: a new host (reachable by the model user, see `cache_folder`)."""
    folder = cache_folder("modelpex-test-coldstart-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def leftovers(pex_root: Path) -> list[Path]:
    """What an interrupted or refused install could leave: its private stage, or any wheel."""
    return [*pex_root.glob(".unpacking-*"), *pex_root.glob(f"{INSTALLED}/*/*/*")]


def test_a_host_with_an_empty_cache_installs_the_unpacked_base_and_runs_a_model(
    cli: Callable[..., CliResult], project: Project, unpacked: Unpacked, empty_cache: Path, tmp_path: Path
) -> None:
    write_model(project.models, "m")
    env = {"MODELPEX_CACHE": str(empty_cache), "MODELPEX_PEX_ROOT": str(empty_cache / "pex_root")}
    assert (built := cli("build", "m", env=env)).returncode == 0, built.stderr
    data, output = tmp_path / "data.parquet", tmp_path / "out.parquet"
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0, 6.0]}), data)
    ran = cli("run", "m", "--input", f"data={data}", "--output", str(output), env=env)
    assert ran.returncode == 0, ran.stderr
    assert pq.read_table(output).column("y").to_pylist() == [4.0, 5.0, 6.0, 9.0]
    # N.B. The wheels are the archive's, not pex's own unpacking: each file has the whole-second mtime it carries.
    with tarfile.open(LocalPexStore(unpacked.root).local_path(unpacked.record)) as tar:
        member = next(m for m in tar if m.name.endswith("/pandas/__init__.py"))
    installed = empty_cache / "pex_root" / member.name
    assert installed.stat().st_mtime == member.mtime, "installed from the unpacked base"
    assert list(installed.parent.glob("__pycache__/__init__.cpython-*.pyc")), "compiled before it was packed"
    assert not list((empty_cache / "pex_root").glob(".unpacking-*"))
    venvs = list((empty_cache / "pex_root").glob("venvs/*/*/*/bin/python"))
    assert len(venvs) == 1, f"the model's venv alone, on the base's wheels (no venv of the base's own): {venvs}"


@pytest.mark.parametrize("where", ["a file's bytes", "the first entry's header"])
def test_a_tampered_unpacked_base_is_refused_naming_it_and_nothing_is_left(
    unpacked: Unpacked, empty_cache: Path, tmp_path: Path, where: str
) -> None:
    store = store_with(unpacked, tmp_path / "store", copy=True)
    path = store.local_path(unpacked.record)
    offset = path.stat().st_size // 2 if where == "a file's bytes" else 10
    path.chmod(0o644)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    cache = ArtifactCache(empty_cache, empty_cache / "pex_root", Interpreter.detect())
    with pytest.raises(IntegrityError) as refused:
        cache.warm(store, unpacked.base)
    message = str(refused.value)
    assert "unpacked base" in message and unpacked.record.sha256 in message, message
    assert "modelpex build base --force" in message, message
    assert leftovers(empty_cache / "pex_root") == []
    assert not list(empty_cache.glob("artifacts/*.ready")), "no venv made"


def test_two_processes_installing_at_once_both_succeed_with_one_venv(unpacked: Unpacked, empty_cache: Path) -> None:
    script = (
        "import json, sys; from pathlib import Path\n"
        "from orchestrator.cache import ArtifactCache\n"
        "from orchestrator.platforms import Interpreter\n"
        "from orchestrator.store import ArtifactRecord, LocalPexStore\n"
        "root, store = Path(sys.argv[1]), LocalPexStore(Path(sys.argv[2]))\n"
        "base = ArtifactRecord.from_json(sys.argv[3])\n"
        "venv = ArtifactCache(root, root / 'pex_root', Interpreter.detect()).warm(store, base)\n"
        "print(json.dumps(str(venv)))\n"
    )
    args = [str(empty_cache), str(unpacked.root), unpacked.base.to_json()]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err.decode()
    venvs = {json.loads(out) for out, _ in outputs}
    assert len(venvs) == 1, venvs
    (venv,) = venvs
    assert (Path(venv) / "bin" / "python").exists()
    pex_root = empty_cache / "pex_root"
    assert len(list(pex_root.glob("venvs/*/*/*/bin/python"))) == 1
    with tarfile.open(LocalPexStore(unpacked.root).local_path(unpacked.record)) as tar:
        wheels = {"/".join(m.name.split("/")[:4]) for m in tar if m.name.count("/") >= 3}
    assert {str(p.relative_to(pex_root)) for p in pex_root.glob(f"{INSTALLED}/*/*/*") if p.is_dir()} == wheels
    assert not list(pex_root.glob(".unpacking-*"))


def crafted(entries: list[tarfile.TarInfo], path: Path) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for info in entries:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    "bad",
    [
        entry("installed_wheels/3/../../../escaped"),
        entry("/tmp/escaped"),
        entry("installed_wheels/3/h/w.whl/link", tarfile.SYMTYPE, "/etc"),
        entry("installed_wheels/3/h/w.whl/hard", tarfile.LNKTYPE, "/etc/passwd"),
        entry("installed_wheels/3/h/w.whl/device", tarfile.CHRTYPE),
        entry("venvs/elsewhere"),
        entry("installed_wheels/3/h/w.whl/" + "a" * 5000),
    ],
    ids=["dot-dot", "absolute", "symlink", "hard link", "device", "outside installed_wheels", "a name too long"],
)
def test_an_unpacked_base_with_an_unsafe_entry_is_refused_even_with_its_record(
    unpacked: Unpacked, empty_cache: Path, tmp_path: Path, bad: tarfile.TarInfo
) -> None:
    """Its publisher, not only whoever changes its bytes, cannot write outside PEX_ROOT's installed wheels."""
    store = store_with(unpacked, tmp_path / "store")
    archive = crafted([entry("installed_wheels/3/h/w.whl/ok.py"), bad], tmp_path / "evil.tar")
    record = dataclasses.replace(unpacked.record, sha256=file_sha256(archive), size=archive.stat().st_size)
    store.put(record, archive, replace=True)
    cache = ArtifactCache(empty_cache, empty_cache / "pex_root", Interpreter.detect())
    with pytest.raises(IntegrityError, match="is not a plain file or folder under installed_wheels/"):
        cache.warm(store, unpacked.base)
    assert leftovers(empty_cache / "pex_root") == []
    assert not Path("/tmp/escaped").exists() and not (empty_cache / "escaped").exists()


def wheel_files(wheel: Path, files: dict[str, str]) -> None:
    """An installed wheel as pex lays it out: its files, their RECORD and pex's listing of the wheel's zip entries."""
    for name, text in files.items():
        (wheel / name).parent.mkdir(parents=True, exist_ok=True)
        (wheel / name).write_text(text)
    record = wheel / "pkg-1.0.dist-info" / "RECORD"
    record.parent.mkdir(parents=True)
    record.write_text("".join(f"{name},sha256=x,1\n" for name in files) + "pkg-1.0.dist-info/RECORD,,\n")
    listing = wheel / "pkg-1.0.pex-info" / "original-whl-info.json"
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps({"entries": [[name, [2026, 1, 1, 0, 0, 0], 0] for name in files], "filename": "w"}))


def test_the_unpacked_base_leaves_out_test_suites_that_no_module_names(tmp_path: Path) -> None:
    """Folders named tests or test inside a package go, unless another module imports them or names them in a
    string; the wheel's RECORD and pex's listing then list only what is there."""
    wheel = tmp_path / "pex_root" / INSTALLED / "3" / "h" / "pkg-1.0-py3-none-any.whl"
    wheel_files(
        wheel,
        {
            "pkg/__init__.py": "from pkg.testing import check\n",
            "pkg/testing/__init__.py": "check = 1\n",
            "pkg/tests/test_a.py": "import pkg\n",
            "pkg/sub/test/test_b.py": "import pkg\n",
            "pkg/kept/tests/helpers.py": "x = 1\n",
            "pkg/kept/mod.py": "from .tests import helpers\n",
            "pkg/dynamic/tests/x.py": "y = 1\n",
            "pkg/load.py": "import importlib\nimportlib.import_module('pkg.dynamic.tests.x')\n",
            "tests/top.py": "z = 1\n",
        },
    )
    left_out = pack_unpacked(tmp_path / "pex_root", tmp_path / "unpacked.tar")
    assert left_out == ["3/h/pkg-1.0-py3-none-any.whl/pkg/sub/test", "3/h/pkg-1.0-py3-none-any.whl/pkg/tests"]
    with tarfile.open(tmp_path / "unpacked.tar") as tar:
        names = {m.name.split("pkg-1.0-py3-none-any.whl/")[-1] for m in tar if m.isreg()}
        record = tar.extractfile(next(m for m in tar if m.name.endswith("RECORD")))
        listing = tar.extractfile(next(m for m in tar if m.name.endswith("original-whl-info.json")))
        assert record is not None and listing is not None
        listed = {line.split(",")[0] for line in record.read().decode().splitlines()}
        zipped = {entry[0] for entry in json.loads(listing.read())["entries"]}
    kept = {"pkg/__init__.py", "pkg/testing/__init__.py", "pkg/kept/tests/helpers.py", "pkg/kept/mod.py"}
    kept |= {"pkg/dynamic/tests/x.py", "pkg/load.py", "tests/top.py"}
    assert names == kept | {"pkg-1.0.dist-info/RECORD", "pkg-1.0.pex-info/original-whl-info.json"}
    assert listed == kept | {"pkg-1.0.dist-info/RECORD"}
    assert zipped == kept


def test_a_warm_venv_is_found_ready_and_never_made_again(
    store: LocalPexStore, session_base: SessionBase, model_builds: ModelBuilds
) -> None:
    """Once warm, a model's venv is taken as it is: the second `warm` neither runs pex nor compiles (its record
    untouched), and the venv it records is the real folder, never pex's short symlink to it (mode 0777, so never
    "private": a venv recorded by that link was made again on every model start)."""
    folder = cache_folder("modelpex-test-ready-")
    try:
        cache = ArtifactCache(folder, folder / "pex_root", Interpreter.detect())
        base, model = session_base.build.record, model_builds.into(store, REPO / "model_packages" / "churn")
        venv = cache.warm(store, base, model)
        ready = folder / "artifacts" / f"{model.sha256}.ready"
        written = ready.stat().st_mtime_ns
        assert cache.warm(store, base, model) == venv and ready.stat().st_mtime_ns == written, "made again"
        assert not venv.is_symlink() and venv.is_relative_to((folder / "pex_root").resolve())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
