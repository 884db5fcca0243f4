"""The S3 store on a real S3-compatible server (SeaweedFS): what the server verifies, how a lost race ends, one
download per machine, errors as one line, and the whole path (build, run, states, frames, Dagster) from another host.

The contract every backend keeps is in tests/test_store.py; these are what only an object store has.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import AssetKey, DagsterInstance

from orchestrator.errors import IntegrityError, StoreError
from orchestrator.resources import FrameStore
from orchestrator.run import FittedState
from orchestrator.s3store import S3PexStore, transfer_config
from orchestrator.states import StateKeeper
from orchestrator.store import ArtifactRecord, open_store

from .conftest import CliResult, Project, SessionBase, cache_folder, write_model
from .seaweed import SeaweedServer, free_ports
from .test_cli import assert_one_line_error, data_file
from .test_store import KEY, artifact

Cli = Callable[..., CliResult]
SMALL_PARTS = 5 << 20  # N.B. S3's smallest part: a 12 MB file goes up in three.


def s3_store(url: str, tmp_path: Path, name: str = "cache", **options: object) -> S3PexStore:
    return S3PexStore(url, cache=tmp_path / name, settle_seconds=0, **options)  # type: ignore[arg-type]


def test_open_store_picks_s3_from_the_url(s3_url: str, tmp_path: Path) -> None:
    store = open_store(s3_url + "/", cache=tmp_path / "cache")
    assert isinstance(store, S3PexStore) and store.url == s3_url and store.cache == tmp_path / "cache"
    assert store.endpoint == os.environ["AWS_ENDPOINT_URL"], "the endpoint comes from the standard AWS variables"


def test_the_server_refuses_an_upload_whose_checksum_is_not_the_recorded_one(s3_url: str, tmp_path: Path) -> None:
    store = s3_store(s3_url, tmp_path)
    record, path = artifact(tmp_path)
    path.write_bytes(b"#!/bin/sh\necho swapped\n")  # N.B. Same length, other bytes: only the digest tells.
    with pytest.raises(IntegrityError, match=r"changed between its build and its publication \(the server refused"):
        store.put(record, path)
    assert store.records() == [] and store._get(store._artifact_key(record), "test") is None


def test_multipart_upload_carries_part_checksums_and_is_checked_whole(s3_url: str, tmp_path: Path) -> None:
    store = s3_store(s3_url, tmp_path, transfer=transfer_config(SMALL_PARTS, 3))
    payload = os.urandom(12 << 20)
    record, path = artifact(tmp_path, payload)
    store.put(record, path)
    head = store.client.head_object(Bucket=store.bucket, Key=store._artifact_key(record), ChecksumMode="ENABLED")
    assert head["ETag"].endswith('-3"') and head["ChecksumSHA256"].endswith("-3"), "three parts, each checksummed"
    assert store.fetch(record).read_bytes() == payload
    # N.B. The whole file is hashed as it is read for upload: bytes that are not the recorded ones are refused and
    # removed from the server again, and nothing is published.
    other = s3_store(s3_url + "-other", tmp_path, "other-cache", transfer=transfer_config(SMALL_PARTS, 3))
    wrong = ArtifactRecord(**{**record.__dict__, "sha256": hashlib.sha256(b"not it").hexdigest()})
    with pytest.raises(IntegrityError, match="changed between its build and its publication"):
        other.put(wrong, path)
    assert other.records() == [] and list(other._list("models")) == []


def test_a_part_changed_on_its_way_to_the_server_is_refused_and_nothing_is_published(
    s3_url: str, tmp_path: Path
) -> None:
    """Each part goes with the checksum of the bytes the store read, and the server verifies it: a part whose bytes
    change after that (a faulty link, a proxy) is refused, the upload fails in one line, and neither the artifact,
    its record nor an unfinished multipart upload is left on the server."""
    store = s3_store(s3_url, tmp_path, transfer=transfer_config(SMALL_PARTS, 3))
    record, path = artifact(tmp_path, os.urandom(12 << 20))
    changed: list[int] = []

    def change_one_byte(request, **kwargs: object) -> None:  # noqa: ANN001 - botocore's AWSPreparedRequest
        body = request.body if isinstance(request.body, bytes) else request.body.read()
        if len(changed) == 0:
            body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]  # N.B. Same length: only a checksum tells.
            changed.append(len(body))
        request.body = body

    store.client.meta.events.register("before-send.s3.UploadPart", change_one_byte)
    with pytest.raises(StoreError, match=r"cannot upload .*BadDigest|cannot upload .*checksum") as raised:
        store.put(record, path)
    assert changed and "\n" not in str(raised.value), str(raised.value)
    assert store.records() == [] and store._get(store._artifact_key(record), "test") is None
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store._artifact_key(record))
    assert not uploads.get("Uploads"), "the unfinished upload was aborted"


def test_a_second_publisher_loses_the_conditional_create_cleanly(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two builders of one key on two machines: both saw no record, both upload; the record is created only if
    absent, so the second gets the first's record, and removes its own bytes."""
    first, second = s3_store(s3_url, tmp_path, "a"), s3_store(s3_url, tmp_path, "b")
    (tmp_path / "a").mkdir(exist_ok=True)
    (tmp_path / "b").mkdir(exist_ok=True)
    mine, my_path = artifact(tmp_path / "a", b"first build")
    theirs, their_path = artifact(tmp_path / "b", b"second build, other bytes")
    assert first.put(mine, my_path) == mine
    asked: list[str] = []
    real_record = second.record

    def not_yet_published(kind: str, name: str, key: str, version: str | None = None) -> ArtifactRecord | None:
        asked.append(key)
        return None if len(asked) == 1 else real_record(kind, name, key, version)  # N.B. As if it raced the first.

    monkeypatch.setattr(second, "record", not_yet_published)
    assert second.put(theirs, their_path) == mine
    assert len(asked) == 2, "checked before uploading, then read the winner's record"
    assert first.records() == [mine] and first.unindexed() == [], "no bytes of the loser are left"
    assert second.fetch(mine).read_bytes() == b"first build"


def test_concurrent_fetches_download_once(s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record, path = artifact(tmp_path, os.urandom(3 << 20))
    s3_store(s3_url, tmp_path, "builder").put(record, path)
    workers = [s3_store(s3_url, tmp_path, "worker") for _ in range(6)]  # N.B. One machine: one cache.
    downloads: list[str] = []
    real = S3PexStore._download

    def counted(self: S3PexStore, record: ArtifactRecord, destination: Path) -> str:
        downloads.append(record.sha256)
        return real(self, record, destination)

    monkeypatch.setattr(S3PexStore, "_download", counted)
    barrier = threading.Barrier(len(workers))
    paths: list[Path] = []

    def fetch(store: S3PexStore) -> None:
        barrier.wait()
        paths.append(store.fetch(record))

    threads = [threading.Thread(target=fetch, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(paths) == len(workers) and len(set(paths)) == 1 and paths[0].read_bytes() == path.read_bytes()
    assert downloads == [record.sha256], "one download, the others waited and trusted it"
    assert s3_store(s3_url, tmp_path, "worker").fetch(record) == paths[0] and len(downloads) == 1
    # N.B. A copy changed on disk is no longer trusted: it is downloaded and verified again.
    paths[0].chmod(0o644)
    paths[0].write_bytes(b"edited in the cache")
    assert s3_store(s3_url, tmp_path, "worker").fetch(record).read_bytes() == path.read_bytes()
    assert len(downloads) == 2


def test_a_copy_verified_during_another_boot_is_fetched_and_hashed_again(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copies are not flushed to disk: trust in one ends with the boot that hashed it, so a copy a crash tore never
    runs. After a reboot (another boot id) the copy is fetched again, and trusted again from then on."""
    import orchestrator.cache

    record, path = artifact(tmp_path, os.urandom(1 << 20))
    s3_store(s3_url, tmp_path, "builder").put(record, path)
    downloads: list[str] = []
    real = S3PexStore._download

    def counted(self: S3PexStore, record: ArtifactRecord, destination: Path) -> str:
        downloads.append(record.sha256)
        return real(self, record, destination)

    monkeypatch.setattr(S3PexStore, "_download", counted)
    s3_store(s3_url, tmp_path, "worker").fetch(record)
    s3_store(s3_url, tmp_path, "worker").fetch(record)
    assert len(downloads) == 1, "trusted again within the boot"
    monkeypatch.setattr(orchestrator.cache, "BOOT_ID", "another-boot")
    assert s3_store(s3_url, tmp_path, "worker").fetch(record).read_bytes() == path.read_bytes()
    s3_store(s3_url, tmp_path, "worker").fetch(record)
    assert len(downloads) == 2, "fetched once after the reboot, then trusted"


def test_a_failed_fetch_leaves_no_hashing_thread_behind(s3_url: str, tmp_path: Path) -> None:
    store = s3_store(s3_url, tmp_path)
    record, path = artifact(tmp_path, os.urandom(1 << 20))
    store.put(record, path)
    store._delete(store._artifact_key(record), action="test")
    with pytest.raises(IntegrityError, match="is missing"):
        s3_store(s3_url, tmp_path, "worker").fetch(record)
    assert [t for t in threading.enumerate() if t.name == "modelpex-sha256"] == []


def test_a_build_seeds_the_cache_it_uploaded_from(s3_url: str, tmp_path: Path) -> None:
    store = s3_store(s3_url, tmp_path)
    with store.work_dir() as work:
        record, path = artifact(work)
        store.put(record, path)
    assert store.local_path(record).read_bytes() == b"#!/bin/sh\necho model\n", "not downloaded back"


def test_permission_errors_are_one_line_naming_the_store_and_the_fix(
    s3_url: str, s3_server: SeaweedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record, path = artifact(tmp_path)
    s3_store(s3_url, tmp_path).put(record, path)
    for name, value in s3_server.env("reader").items():
        monkeypatch.setenv(name, value)
    reader = s3_store(s3_url, tmp_path, "reader-cache")
    assert reader.records() == [record] and reader.fetch(record).read_bytes() == path.read_bytes()
    with pytest.raises(StoreError) as raised:
        reader.check_writable("build churn@1.2.0")
    message = str(raised.value)
    assert message.startswith(f"cannot build churn@1.2.0: {s3_url} denies it to these credentials (AccessDenied)")
    assert "s3:PutObject" in message and "(--store or MODELPEX_STORE)" in message and "\n" not in message


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        pytest.param(
            {"AWS_ENDPOINT_URL": "http://127.0.0.1:{closed}"},
            ["does not answer", "check AWS_ENDPOINT_URL"],
            id="unreachable endpoint",
        ),
        pytest.param({"AWS_SECRET_ACCESS_KEY": "wrong"}, ["refuses these credentials"], id="wrong secret"),
        pytest.param({"AWS_ACCESS_KEY_ID": None}, ["set AWS_ACCESS_KEY_ID"], id="no credentials"),
        pytest.param({"bucket": "no-such-bucket"}, ["bucket no-such-bucket does not exist"], id="no bucket"),
    ],
)
def test_store_errors_are_one_line(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict, fragments: list[str]
) -> None:
    url = s3_url.replace("s3://modelpex/", f"s3://{change.pop('bucket')}/") if "bucket" in change else s3_url
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    for name, value in change.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value.format(closed=free_ports(1)[0]))
    with pytest.raises(StoreError) as raised:
        s3_store(url, tmp_path).records()
    message = str(raised.value)
    assert message.startswith("cannot ") and url in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_without_boto3_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "orchestrator.s3store", None)
    with pytest.raises(StoreError, match=r"s3://bucket/models needs boto3 .*pip install 'modelpex\[s3\]'"):
        open_store("s3://bucket/models")


def test_a_frame_written_on_one_host_is_read_on_another(s3_url: str) -> None:
    key = AssetKey(["acme", "churn", "predictions"])
    table = pa.table({"customer_id": [1, 2, 3], "score": [0.1, 0.5, 0.9]})
    stored = FrameStore(store_url=s3_url).save_table(key, table)
    assert stored.where == f"{s3_url}/frames/acme/churn/predictions.parquet" and stored.size > 0
    assert FrameStore(store_url=s3_url).load_table(key).equals(table)
    store, object_key = S3PexStore(s3_url), S3PexStore(s3_url)._key("frames/acme/churn/predictions.parquet")
    digest = store.client.head_object(Bucket=store.bucket, Key=object_key)["Metadata"]["sha256"]
    store.client.put_object(Bucket=store.bucket, Key=object_key, Body=b"x", Metadata={"sha256": digest})
    with pytest.raises(IntegrityError, match="it was altered in the store"):
        FrameStore(store_url=s3_url).load_table(key)
    store.client.put_object(Bucket=store.bucket, Key=object_key, Body=b"x")
    with pytest.raises(IntegrityError, match="it carries no sha256, so modelpex did not write it"):
        FrameStore(store_url=s3_url).load_table(key)
    with pytest.raises(Exception, match="has no stored frame in"):
        FrameStore(store_url=s3_url).load_table(AssetKey(["acme", "nothing"]))


def test_a_state_saved_on_one_host_loads_on_another(s3_url: str, tmp_path: Path) -> None:
    """Hosts share the store and the signing key (MODELPEX_SIGNING_KEY_FILE), nothing else."""
    model = ArtifactRecord("model", "churn", "1.2.0", KEY, sha256="a" * 64, size=1)
    key_file = tmp_path / "signing.key"
    keeper = StateKeeper(s3_store(s3_url, tmp_path, "a"), key_file)
    saved = keeper.save(model, "acme", "run-1", FittedState("json", b"{}"))
    loaded = StateKeeper(s3_store(s3_url, tmp_path, "b"), key_file).load(model, saved.sha256, "acme")
    assert loaded == FittedState("json", b"{}")
    store = s3_store(s3_url, tmp_path, "c")
    store.client.put_object(Bucket=store.bucket, Key=store._state_key("churn", saved.state_id, ".state"), Body=b"{1}")
    with pytest.raises(IntegrityError, match="altered or replaced"):
        StateKeeper(store, key_file).load(model, saved.sha256, "acme")


@pytest.fixture
def caches() -> Iterator[Callable[[], dict[str, str]]]:
    """Settings for empty artifact caches, one per simulated host, on the shared PEX_ROOT (see `fresh_cache`)."""
    made: list[Path] = []
    pex_root = os.environ["MODELPEX_PEX_ROOT"]

    def make() -> dict[str, str]:
        folder = cache_folder("modelpex-test-cache-")
        made.append(folder)
        return {"MODELPEX_CACHE": str(folder), "MODELPEX_PEX_ROOT": pex_root}

    yield make
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


def test_build_run_list_and_gc_from_the_command_line(
    cli: Cli,
    project: Project,
    s3_url: str,
    tmp_path: Path,
    caches: Callable[[], dict[str, str]],
    session_base: SessionBase,
) -> None:
    """The base goes up in parts, each checksummed (the session's: a second build of it would take a minute and test
    nothing more); `modelpex build --all` finds it there and builds and uploads both model versions; `run` on two
    hosts (two empty caches, no local store) fetches from S3, keeps the fitted state there and finds it from the other
    host."""
    folder = write_model(project.models, "m", version="1.0.0")
    project.commit_and_tag("m 1.0.0", "m/v1.0.0")
    pyproject = folder / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"1.0.0"', '"1.1.0"'))
    store = s3_store(s3_url, tmp_path)
    record = session_base.build.record
    store.put(record, session_base.store_root / "bases" / record.filename)
    builder = {"MODELPEX_STORE": s3_url, **caches()}
    built = cli("build", "--all", env=builder, timeout=900)
    assert built.returncode == 0, built.stderr
    assert [line.split()[:2] for line in built.stdout.splitlines()] == [
        ["cached", "base"],
        ["built", "unpacked"],  # N.B. The base's unpacked form, for hosts without it (`orchestrator.cache`).
        ["built", "m@1.0.0"],
        ["built", "m@1.1.0"],
    ]
    (base,) = store.find("base", "base")
    head = store.client.head_object(Bucket=store.bucket, Key=store._artifact_key(base), ChecksumMode="ENABLED")
    parts = -(-base.size // (16 << 20))
    assert head["ETag"].endswith(f'-{parts}"') and head["ChecksumSHA256"].endswith(f"-{parts}"), head
    assert cli("build", "--all", env=builder).stdout.count("cached") == 3
    assert store.record("unpacked", "base", base.key) is not None

    listing = cli("list", env={"MODELPEX_STORE": s3_url})
    assert listing.returncode == 0 and f"artifacts in {s3_url}" in listing.stdout, listing.stderr
    artifacts, releases = listing.stdout.split(f"releases in {s3_url}")
    assert artifacts.count(" m ") == 2 and "base" in artifacts and "│ unpacked │ base" in artifacts, listing.stdout
    assert releases.count(" m ") == 2 and "1.0.0" in releases and "1.1.0" in releases, listing.stdout

    args = ("--input", f"data={data_file(tmp_path)}", "--output", str(tmp_path / "out.parquet"))
    host_a, host_b = {"MODELPEX_STORE": s3_url, **caches()}, {"MODELPEX_STORE": s3_url, **caches()}
    state = tmp_path / "state.json"
    ran = cli("run", "m", *args, "--params", '{"offset": 1}', "--save-state", str(state), env=host_a)
    assert ran.returncode == 0, ran.stderr
    assert (Path(host_a["MODELPEX_CACHE"]) / "artifacts" / f"{base.sha256}.pex").is_file(), "fetched into the cache"
    again = cli("run", "m", *args, "--state", str(state), env=host_b)
    assert again.returncode == 0, again.stderr
    assert pq.read_table(tmp_path / "out.parquet")["y"].to_pylist() == [4.0, 5.0, 6.0, 9.0], "the stored mean"
    assert len(store.state_records()) == 1

    # N.B. 1.1.0's code changes: its old pex is garbage, found by paging through the index.
    (folder / "src" / "m" / "model.py").write_text((folder / "src" / "m" / "model.py").read_text() + "\n# edited\n")
    dry = cli("gc", "--dry-run", env=host_a)
    assert dry.returncode == 0 and "would remove m@1.1.0" in dry.stdout, dry.stdout + dry.stderr
    gc = cli("gc", env=host_a)
    assert gc.returncode == 0 and "removed m@1.1.0" in gc.stdout, gc.stdout + gc.stderr
    assert {r.version for r in store.find("model", "m")} == {"1.0.0"}


def test_command_line_errors_name_the_store_and_the_fix(
    cli: Cli, project: Project, s3_url: str, s3_server: SeaweedServer
) -> None:
    write_model(project.models, "m")
    reader = {"MODELPEX_STORE": s3_url, **s3_server.env("reader")}
    assert cli("list", env=reader).returncode == 0, "reading needs no write permission"
    assert_one_line_error(
        cli("build", "m", env=reader), f"cannot build base: {s3_url} denies it to these credentials", "s3:PutObject"
    )
    unreachable = {
        "MODELPEX_STORE": s3_url,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_ports(1)[0]}",
        "AWS_MAX_ATTEMPTS": "1",
    }
    assert_one_line_error(cli("list", env=unreachable), s3_url, "does not answer", "check AWS_ENDPOINT_URL")


def test_dagster_runs_on_two_hosts_share_frames_and_states_through_the_store(
    project: Project,
    session_base: SessionBase,
    s3_url: str,
    caches: Callable[[], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Host A materialises the dataset and trains; host B (its own cache, no local store, the same Dagster
    instance and signing key) predicts from the frame and the state host A left in the store."""
    from .test_dagster import client, defs_for_url, m_model, write_deployments

    m_model(project, "1.0.0")
    write_deployments(project, {"acme": client("1.0.0")})
    base = session_base.build.record
    S3PexStore(s3_url).put(base, session_base.store_root / "bases" / base.filename)
    keys = {name: AssetKey(["acme", *name.split("/")]) for name in ("data", "acme_m_state", "acme_m_predictions")}
    with DagsterInstance.ephemeral() as instance:
        for host, selection in (("a", ["data", "acme_m_state"]), ("b", ["acme_m_predictions"])):
            cache = caches()
            for name, value in cache.items():
                monkeypatch.setenv(name, value)
            defs = defs_for_url(project, s3_url)
            job = defs.resolve_implicit_global_asset_job_def()
            result = job.execute_in_process(instance=instance, asset_selection=[keys[k] for k in selection])
            assert result.success, host
            assert (Path(cache["MODELPEX_CACHE"]) / "artifacts" / f"{base.sha256}.pex").is_file(), host
    store = S3PexStore(s3_url)
    table = FrameStore(store_url=s3_url).load_table(keys["acme_m_predictions"])
    assert table.num_rows == 50 and set(table["version"].to_pylist()) == {"1.0.0"}
    assert FrameStore(store_url=s3_url).load_table(keys["data"]).num_rows == 50
    assert len(store.state_records()) == 1
    assert not (project.root / ".dagster_home" / "frames").exists(), "no frame stayed on a host"
