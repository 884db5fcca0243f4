"""The artifact store's contract, run against every backend (a local folder, by path and by URL, and S3 on a real
SeaweedFS server): atomic publication, one winner among publishers of a key, verified fetches, a clear index,
fitted states and frames."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.errors import IntegrityError, SpecError, StoreError
from orchestrator.store import ArtifactRecord, LocalPexStore, PexStore, ReleaseRecord, open_store

KEY = "0123456789abcdef0123456789abcdef"
OTHER_KEY = "00000000000000000000000000000000"
BASE_KEY = "fedcba9876543210fedcba9876543210"


def s3_backend(request: pytest.FixtureRequest, tmp_path: Path) -> PexStore:
    from orchestrator.s3store import S3PexStore

    # N.B. Two entries a page: every listing in these tests goes through the paginator.
    return S3PexStore(request.getfixturevalue("s3_url"), cache=tmp_path / "cache", page_size=2, settle_seconds=0)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], PexStore]] = {
    "local-path": lambda request, tmp_path: open_store(tmp_path / "store"),
    "local-url": lambda request, tmp_path: open_store((tmp_path / "store").as_uri()),
    "s3": s3_backend,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> PexStore:
    return BACKENDS[request.param](request, tmp_path)


def another_host(store: PexStore, tmp_path: Path) -> PexStore:
    """The same store as seen from another machine: another object, and for S3 another cache."""
    if isinstance(store, LocalPexStore):
        return LocalPexStore(store.root)
    from orchestrator.s3store import S3PexStore

    assert isinstance(store, S3PexStore)
    cache = tmp_path / f"cache-{os.urandom(4).hex()}"
    return S3PexStore(store.url, cache=cache, page_size=store.page_size, settle_seconds=store.settle_seconds)


def stored_bytes(store: PexStore, record: ArtifactRecord) -> bytes | None:
    """The artifact's bytes where the store keeps them (not a fetched copy), or ``None``."""
    if isinstance(store, LocalPexStore):
        path = store.local_path(record)
        return path.read_bytes() if path.exists() else None
    found = store._get(store._artifact_key(record), "test")  # type: ignore[attr-defined]
    return found


def replace_stored_bytes(store: PexStore, record: ArtifactRecord, data: bytes | None) -> None:
    """Change (or with ``None`` remove) the artifact's bytes behind the store's back, as a tamperer or a failing
    disk would; on S3, on the server itself."""
    if isinstance(store, LocalPexStore):
        path = store.local_path(record)
        if data is None:
            path.unlink()
        else:
            os.chmod(path, 0o644)
            path.write_bytes(data)
        return
    key = store._artifact_key(record)  # type: ignore[attr-defined]
    if data is None:
        store.client.delete_object(Bucket=store.bucket, Key=key)  # type: ignore[attr-defined]
    else:
        store.client.put_object(Bucket=store.bucket, Key=key, Body=data)  # type: ignore[attr-defined]


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
    elsewhere = another_host(backend, tmp_path)
    assert elsewhere.records() == [record] and elsewhere.fetch(record).read_bytes() == path.read_bytes()


def test_listings_cover_every_page(backend: PexStore, tmp_path: Path) -> None:
    records = []
    for n in range(5):
        (tmp_path / str(n)).mkdir()
        record, path = artifact(tmp_path / str(n), f"artifact {n}".encode(), key=f"{n:032x}")
        records.append(backend.put(record, path))
    assert sorted(backend.records(), key=lambda r: r.key) == records
    for n in range(3):
        backend.put_state("churn", f"{n:064x}", b"state", json.dumps({"n": n}))
    assert sorted(json.loads(text)["n"] for _, text in backend.state_records()) == [0, 1, 2]


def test_publishers_of_one_key_agree_on_one_winner(backend: PexStore, tmp_path: Path) -> None:
    """Eight builders of one key, each with other bytes, publish at once: one record wins, every builder gets it,
    and the bytes are the winner's."""
    builders = []
    for n in range(8):
        (tmp_path / f"b{n}").mkdir()
        builders.append((another_host(backend, tmp_path), *artifact(tmp_path / f"b{n}", f"build {n}".encode())))
    barrier = threading.Barrier(len(builders))
    results: list[ArtifactRecord | BaseException] = [None] * len(builders)  # type: ignore[list-item]

    def publish(n: int) -> None:
        store, record, path = builders[n]
        barrier.wait()
        try:
            results[n] = store.put(record, path)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[n] = exc

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(len(builders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winner = results[0]
    assert isinstance(winner, ArtifactRecord), winner
    assert all(result == winner for result in results), results
    assert backend.record("model", "churn", KEY) == winner
    assert backend.fetch(winner).read_bytes() == stored_bytes(backend, winner)
    assert hashlib.sha256(stored_bytes(backend, winner) or b"").hexdigest() == winner.sha256
    assert backend.unindexed() == [], "the losers left no bytes behind"


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
    data = bytearray(stored_bytes(backend, record) or b"")
    if damage == "flip a byte":
        data[3] ^= 0xFF
    elif damage == "truncate":
        data = data[:-5]
    else:
        data += b"rm -rf /\n"
    replace_stored_bytes(backend, record, bytes(data))
    with pytest.raises(IntegrityError, match=r"refusing to run churn@1.2.0: .* tampered with\. Rebuild it with"):
        backend.fetch(record)
    assert stored_bytes(backend, record) == bytes(data), "verification must not delete evidence"
    if not isinstance(backend, LocalPexStore):
        assert not backend.local_path(record).exists(), "a copy that failed its check is never kept"


def test_missing_file_is_reported(backend: PexStore, tmp_path: Path) -> None:
    record, path = artifact(tmp_path)
    backend.put(record, path)
    replace_stored_bytes(backend, record, None)
    with pytest.raises(IntegrityError, match="its file .* is missing: rebuild it"):
        backend.fetch(record)


def test_delete_removes_record_and_bytes(backend: PexStore, tmp_path: Path) -> None:
    record, path = artifact(tmp_path)
    backend.put(record, path)
    backend.delete(record)
    assert backend.records() == [] and stored_bytes(backend, record) is None


def test_fitted_states_round_trip(backend: PexStore, tmp_path: Path) -> None:
    sha = hashlib.sha256(b"fitted").hexdigest()
    assert backend.state("churn", sha) is None
    backend.put_state("churn", sha, b"fitted", '{"signed": true}')
    elsewhere = another_host(backend, tmp_path)
    assert elsewhere.state("churn", sha) == ('{"signed": true}', b"fitted")
    assert elsewhere.state_records() == [("churn", '{"signed": true}')]
    assert backend.stray_states() == []
    backend.delete_state("churn", sha)
    assert elsewhere.state("churn", sha) is None and elsewhere.state_records() == []
    with pytest.raises(StoreError, match="is not a sha256 digest"):
        backend.put_state("churn", "../../escape", b"", "{}")


def test_frames_round_trip(backend: PexStore, tmp_path: Path) -> None:
    source = tmp_path / "frame.parquet"
    source.write_bytes(b"PAR1 not really parquet PAR1")
    assert not backend.fetch_frame(("acme", "churn", "predictions"), tmp_path / "none")
    backend.put_frame(("acme", "churn", "predictions"), source)
    copy = tmp_path / "copy.parquet"
    assert another_host(backend, tmp_path).fetch_frame(("acme", "churn", "predictions"), copy)
    assert copy.read_bytes() == source.read_bytes()
    with pytest.raises(StoreError, match="cannot name a stored frame"):
        backend.put_frame(("acme", "..", "escape"), source)


def test_unindexed_artifacts_are_found_and_removed(backend: PexStore, tmp_path: Path) -> None:
    record, path = artifact(tmp_path)
    backend.put(record, path)
    assert backend.unindexed() == []
    # N.B. As a crash between the bytes and the record would leave it: bytes without a record.
    if isinstance(backend, LocalPexStore):
        (backend.root / "index" / "churn" / f"{KEY}.json").unlink()
    else:
        index = backend._index_key(f"churn/{KEY}")  # type: ignore[attr-defined]
        backend.client.delete_object(Bucket=backend.bucket, Key=index)  # type: ignore[attr-defined]
    (leftover,) = backend.unindexed()
    assert (leftover.kind, leftover.key) == ("model", KEY)
    backend.remove(leftover)
    assert backend.unindexed() == [] and stored_bytes(backend, record) is None


def test_the_unpacked_base_is_filed_apart_streamed_verified_and_collected(backend: PexStore, tmp_path: Path) -> None:
    """The base's unpacked form (`orchestrator.cache`) under the base's key: not a base, streamed with every byte
    hashed (a tampered one refused after the last byte, naming it and its digest), its orphan bytes found by gc."""
    import io

    path = tmp_path / "unpacked.tar"
    path.write_bytes(b"installed wheels" * 4096)
    record = ArtifactRecord("unpacked", "base", "0.1.0", BASE_KEY, base_key=BASE_KEY).finished(path)
    backend.put(record, path)
    assert backend.record("unpacked", "base", BASE_KEY) == record
    assert backend.find("base", "base") == [] and backend.scan().problems == {}
    sink = io.BytesIO()
    backend.stream(record, sink)
    assert sink.getvalue() == path.read_bytes()
    replace_stored_bytes(backend, record, b"installed wheelz" + path.read_bytes()[16:])
    with pytest.raises(IntegrityError) as refused:
        backend.stream(record, io.BytesIO())
    assert "unpacked base" in str(refused.value) and record.sha256 in str(refused.value)
    if isinstance(backend, LocalPexStore):
        (backend.root / "index" / "base-unpacked" / f"{BASE_KEY}.json").unlink()
    else:
        index = backend._index_key(f"base-unpacked/{BASE_KEY}")  # type: ignore[attr-defined]
        backend.client.delete_object(Bucket=backend.bucket, Key=index)  # type: ignore[attr-defined]
    (leftover,) = backend.unindexed()
    assert (leftover.kind, leftover.key) == ("unpacked", BASE_KEY)


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
    with pytest.raises(StoreError, match=r"no artifact store backend for 'gs://bucket'.*file://, s3://"):
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
    if isinstance(store, LocalPexStore):
        path = store.root / "index" / f"{location}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    from orchestrator.s3store import S3PexStore

    assert isinstance(store, S3PexStore), "a new backend says here where its index entries live"
    store.client.put_object(Bucket=store.bucket, Key=store._index_key(location), Body=data)


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


def test_release_records_round_trip_and_never_change_silently(backend: PexStore, tmp_path: Path) -> None:
    """A published version is seen from another host; the same content again keeps the first record; other content
    under a released version is refused naming both, and replaced only when asked; a working tree's version in
    development is replaced by its next publish; a record filed under another version is refused naming its file."""
    released = ReleaseRecord("churn", "1.0.0", "a" * 64, {"columns": []}, "Churn.", "c0ffee", "tag")
    published = backend.publish_release(released)
    elsewhere = another_host(backend, tmp_path)
    assert elsewhere.release("churn", "1.0.0") == published and published.published_at
    assert [(r, where) for r, where in elsewhere.releases().records] == [
        (published, backend._release_where("churn/1.0.0"))
    ]
    assert backend.publish_release(released) == published, "the same content keeps the first record"

    other = ReleaseRecord("churn", "1.0.0", "b" * 64, source="working tree")
    with pytest.raises(
        StoreError,
        match=r"churn@1\.0\.0: the store's release record .*1\.0\.0\.json has content "
        r"digest aaaaaaaaaaaa .* but its working tree has bbbbbbbbbbbb",
    ):
        backend.publish_release(other)
    assert backend.release("churn", "1.0.0") == published
    assert backend.publish_release(other, replace=True).digest == "b" * 64

    develop = ReleaseRecord("churn", "1.1.0", "c" * 64, source="working tree")
    backend.publish_release(develop)
    assert backend.publish_release(dataclasses.replace(develop, digest="d" * 64)).digest == "d" * 64

    backend._write_release("churn/9.0.0", published.to_json().encode(), replace=False)
    scan = backend.releases()
    assert sorted(r.version for r, _ in scan.records) == ["1.0.0", "1.1.0"]
    assert list(scan.problems) == ["churn/9.0.0"] and "holds churn@1.0.0, not churn@9.0.0" in str(
        scan.problems["churn/9.0.0"]
    )
