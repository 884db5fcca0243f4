"""The artifact store's contract, run against every backend: atomic publication, verified fetches, a clear index."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.errors import IntegrityError, SpecError, StoreError
from orchestrator.store import ArtifactRecord, LocalPexStore, PexStore, open_store

KEY = "0123456789abcdef0123456789abcdef"
BASE_KEY = "fedcba9876543210fedcba9876543210"

BACKENDS: dict[str, Callable[[Path], PexStore]] = {
    "local-path": lambda root: open_store(root),
    "local-url": lambda root: open_store(root.as_uri()),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> PexStore:
    return BACKENDS[request.param](tmp_path / "store")


def artifact(
    tmp_path: Path, payload: bytes = b"#!/bin/sh\necho model\n", key: str = KEY
) -> tuple[ArtifactRecord, Path]:
    path = tmp_path / f"artifact-{key}.pex"
    path.write_bytes(payload)
    record = ArtifactRecord("model", "churn", "1.2.0", key, base_key=BASE_KEY, git_commit="abc")
    return record.finished(path), path


def test_put_then_fetch_round_trip(backend: PexStore, tmp_path: Path) -> None:
    record, path = artifact(tmp_path)
    assert not backend.exists("model", "churn", KEY)
    backend.put(record, path)
    assert backend.exists("model", "churn", KEY)
    assert backend.record("model", "churn", KEY) == record
    assert backend.records() == [record]
    assert backend.find("model", "churn", "1.2.0") == [record]
    fetched = backend.fetch(record)
    assert fetched.read_bytes() == path.read_bytes()
    assert stat.S_IMODE(fetched.stat().st_mode) & 0o222 == 0, "published read-only: no write bit for anyone"


def test_put_never_overwrites(backend: PexStore, tmp_path: Path) -> None:
    first, path = artifact(tmp_path)
    backend.put(first, path)
    (tmp_path / "again").mkdir()
    second, other = artifact(tmp_path / "again", b"different bytes")
    assert backend.put(second, other) == first
    assert backend.fetch(first).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "append"])
def test_tampered_artifact_is_refused(backend: PexStore, tmp_path: Path, damage: str) -> None:
    record, path = artifact(tmp_path)
    backend.put(record, path)
    local = backend.local_path(record)
    os.chmod(local, 0o644)
    data = bytearray(local.read_bytes())
    if damage == "flip a byte":
        data[3] ^= 0xFF
    elif damage == "truncate":
        data = data[:-5]
    else:
        data += b"rm -rf /\n"
    local.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"refusing to run churn@1.2.0: .* tampered with\. Rebuild it with"):
        backend.fetch(record)
    assert local.read_bytes() == bytes(data), "verification must not delete evidence"


def test_missing_file_is_reported(backend: PexStore, tmp_path: Path) -> None:
    record, path = artifact(tmp_path)
    backend.put(record, path)
    backend.local_path(record).unlink()
    with pytest.raises(IntegrityError, match="its file .* is missing"):
        backend.verify(record)


def test_delete_removes_record_and_bytes(backend: PexStore, tmp_path: Path) -> None:
    record, path = artifact(tmp_path)
    backend.put(record, path)
    backend.delete(record)
    assert backend.records() == [] and not backend.local_path(record).exists()


def test_put_refuses_bytes_that_changed_since_the_build(backend: PexStore, tmp_path: Path) -> None:
    record, path = artifact(tmp_path)
    path.write_bytes(b"swapped after hashing")
    with pytest.raises(IntegrityError, match="changed between its build and its publication"):
        backend.put(record, path)
    assert backend.records() == []


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"name": "../etc"}, SpecError),
        ({"version": "1.0/../../x"}, SpecError),
        ({"key": "../../../../tmp/x"}, StoreError),
        ({"base_key": "nothex"}, StoreError),
    ],
)
def test_records_with_path_tricks_are_refused(changes: dict[str, str], error: type[Exception]) -> None:
    fields = {"kind": "model", "name": "churn", "version": "1.0.0", "key": KEY, **changes}
    with pytest.raises(error):
        ArtifactRecord(**fields)  # type: ignore[arg-type]


def test_unknown_scheme_lists_what_exists() -> None:
    with pytest.raises(StoreError, match=r"no artifact store backend for 'gs://bucket'.*file://"):
        open_store("gs://bucket")


def test_unindexed_files_are_found(tmp_path: Path) -> None:
    store = LocalPexStore(tmp_path / "store")
    record, path = artifact(tmp_path)
    store.put(record, path)
    stray = store.root / "models" / "churn" / "churn-1.2.0-leftover.pex"
    stray.write_bytes(b"crash leftover")
    assert store.unindexed_files() == [stray]
