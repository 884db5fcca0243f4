"""The artifact store's contract, run against every backend: atomic publication, verified fetches, a clear index."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.errors import IntegrityError, SpecError, StoreError
from orchestrator.store import ArtifactRecord, LocalPexStore, PexStore, open_store

KEY = "0123456789abcdef0123456789abcdef"
OTHER_KEY = "00000000000000000000000000000000"
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
        ({"kind": "plugin", "name": "../../outside"}, StoreError),
        ({"kind": "base", "name": "../outside"}, StoreError),
        ({"sha256": "../../../../tmp/x"}, StoreError),
        ({"size": "big"}, StoreError),
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


def write_raw_record(store: PexStore, location: str, data: bytes) -> None:
    """Put bytes where the index files the record at ``location`` (``<folder>/<key>``), as a hand edit would."""
    assert isinstance(store, LocalPexStore), "a new backend says here where its index entries live"
    path = store.root / "index" / f"{location}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _as(**changes: object) -> Callable[[dict], dict]:
    return lambda fields: {**fields, **changes}


@pytest.mark.parametrize(
    ("change", "listed"),
    [
        # N.B. Only asking for a version tells a copied record from a real one: the key does not spell the version.
        pytest.param(_as(version="1.0.0"), True, id="another version's record copied over this key"),
        pytest.param(_as(key=OTHER_KEY), False, id="another key's record"),
        pytest.param(_as(name="demand"), False, id="another model's record"),
        pytest.param(_as(kind="plugin", name="../../outside"), False, id="an unknown kind with a path for a name"),
        pytest.param(_as(kind="base", name="base"), False, id="a base filed as a model"),
    ],
)
def test_a_record_that_is_not_what_was_asked_is_refused(
    backend: PexStore, tmp_path: Path, change: Callable[[dict], dict], listed: bool
) -> None:
    record, path = artifact(tmp_path)
    backend.put(record, path)
    write_raw_record(backend, f"churn/{KEY}", json.dumps(change(json.loads(record.to_json()))).encode())
    fix = r"rebuild with `modelpex build churn@1\.2\.0 --force`"
    with pytest.raises(StoreError, match=rf"index record \S*churn/{KEY}\.json .*{fix}"):
        backend.record("model", "churn", KEY, "1.2.0")
    scan = backend.scan()
    assert len(scan.records) == listed and list(scan.problems) == ([] if listed else [f"churn/{KEY}"])


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda text: text[: len(text) // 2], id="truncated"),
        pytest.param(lambda text: b"", id="empty"),
        pytest.param(lambda text: b"\xff\xfe\x00", id="binary"),
        pytest.param(lambda text: b"[]", id="not an object"),
        pytest.param(lambda text: text.replace(b'"sha256"', b'"sha"'), id="without its sha256"),
        pytest.param(lambda text: json.dumps({**json.loads(text), "size": "21"}).encode(), id="a size that is text"),
    ],
)
def test_a_malformed_record_is_one_line_naming_its_file(
    backend: PexStore, tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    record, path = artifact(tmp_path)
    backend.put(record, path)
    (tmp_path / "other").mkdir()
    good, other = artifact(tmp_path / "other", b"another artifact", key=OTHER_KEY)
    backend.put(good, other)
    write_raw_record(backend, f"churn/{KEY}", damage(record.to_json().encode()))
    with pytest.raises(
        StoreError, match=rf"^index record \S*churn/{KEY}\.json [^\n]*: remove it, or rebuild"
    ) as raised:
        backend.record("model", "churn", KEY)
    assert "\n" not in str(raised.value)
    scan = backend.scan()
    assert scan.records == [good] and list(scan.problems) == [f"churn/{KEY}"], "the others stay usable"
