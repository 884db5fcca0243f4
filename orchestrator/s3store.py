"""S3 store: the artifact store on an S3-compatible object store, chosen by ``MODELPEX_STORE=s3://bucket/prefix``.

Credentials, endpoint and region come from boto3's own chain (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, the shared config files): modelpex has no names
of its own for them. Under the prefix:

    index/<folder>/<key>.json            one record per artifact, created only if absent (If-None-Match: *)
    bases/<key>/<sha256>.pex             artifact bytes, named by their digest
    bases/<key>/<sha256>.tar             the base unpacked (`orchestrator.cache`), filed under base-unpacked/<key>
    models/<name>/<key>/<sha256>.pex
    states/<model>/<sha256>.state|.json  fitted states and their signed records (`orchestrator.states`)
    frames/<asset key>.parquet           the frames between assets (`orchestrator.resources.FrameStore`)

Integrity: every upload carries SHA-256 checksums that the server verifies: of the whole object for a single PUT
(the digest the record holds, so bytes that changed since the build are refused by the server), of each part for a
multipart upload (the base), whose whole-file digest is computed while the file is read for upload and compared with
the record before the record is published. Every fetch hashes the bytes as they arrive, into this machine's artifact
cache (`orchestrator.cache.VerifiedCopies`), before anything runs.

Races between machines: artifact bytes are named by their digest, so two builders of one key never overwrite each
other's bytes, and the record is created only if absent, so exactly one of them wins; the other removes its own
bytes and gets the winner's record. Locks (`lock`) only span the processes of one machine.
"""

from __future__ import annotations

import base64
import hashlib
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Literal, NoReturn
from urllib.parse import urlparse

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from filelock import FileLock

from orchestrator.cache import VerifiedCopies
from orchestrator.errors import IntegrityError, StoreError
from orchestrator.store import (
    ArtifactRecord,
    Leftover,
    PexStore,
    _frame_name,
    _state_name,
    file_sha256,
    index_location,
)

__all__ = ["S3PexStore", "transfer_config"]

# N.B. Objects from this size up go in parts, uploaded and downloaded in parallel; below it, one request whose
# checksum is the recorded digest itself. Measured on loopback against SeaweedFS, the base (187 MB) moved about as fast
# with 8 or 16 MB parts and 8-10 threads; 16 MB keeps a 10,000-part object limit at 160 GB.
PART_BYTES = 16 << 20
CONCURRENCY = 8
# N.B. A leftover younger than this may be an upload whose record is being created right now: gc leaves it.
SETTLE_SECONDS = 900.0
_MISSING = ("NoSuchKey", "404", "NotFound")
_LOST = ("PreconditionFailed", "412")
_CONFLICT = ("ConditionalRequestConflict", "409")
_DENIED = ("AccessDenied", "AllAccessDisabled", "403", "Forbidden")
_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired")


def transfer_config(part_bytes: int = PART_BYTES, concurrency: int = CONCURRENCY) -> TransferConfig:
    """How large objects move: parts of ``part_bytes``, ``concurrency`` at a time, both ways."""
    return TransferConfig(
        multipart_threshold=part_bytes, multipart_chunksize=part_bytes, max_concurrency=concurrency, use_threads=True
    )


def _b64(hexdigest: str) -> str:
    """A hex sha256 as S3's ``x-amz-checksum-sha256`` wants it: base64 of the raw digest."""
    return base64.b64encode(bytes.fromhex(hexdigest)).decode()


def _code(exc: ClientError) -> str:
    return str(
        exc.response.get("Error", {}).get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    )


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class _HashingReader:
    """The file being uploaded, hashed as it is read.

    N.B. For a multipart upload of a seekable file object, s3transfer reads it front to back, one part at a time, in
    one thread (each part then goes out from memory): so the digest covers exactly the bytes sent. Any other access
    pattern clears ``sequential`` and the caller hashes the file itself.
    """

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._digest = hashlib.sha256()
        self._position = 0
        self.sequential = True

    def read(self, size: int = -1) -> bytes:
        if self._handle.tell() != self._position:
            self.sequential = False
        data = self._handle.read(size)
        self._digest.update(data)
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class _HashingWriter:
    """A download's destination that hashes what it writes, in a thread of its own; close it (``with``) in any case.

    N.B. It cannot seek, so s3transfer fetches parts in parallel but writes them here in order, from its one IO thread:
    the digest is the file's, computed on the way, with no second read. A thread of its own hashes what was written
    (hashlib lets go of the GIL), so writing and hashing overlap: the base was fetched in 0.32 s against 0.35 s when
    the IO thread hashed each chunk itself (boto3's own download_file: 0.24 s, unhashed).
    """

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._digest = hashlib.sha256()
        self.size = 0
        self._chunks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._hasher = threading.Thread(target=self._hash, name="modelpex-sha256", daemon=True)
        self._hasher.start()

    def _hash(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._digest.update(chunk)

    def write(self, data: bytes) -> int:
        chunk = bytes(data)  # N.B. Its own copy only if it is not bytes already: what was written is what is hashed.
        written = self._handle.write(chunk)
        self._chunks.put(chunk)
        self.size += len(chunk)
        return written

    def __enter__(self) -> _HashingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Hash what was written so far, and end the thread."""
        if self._hasher.is_alive():
            self._chunks.put(None)
            self._hasher.join()

    def hexdigest(self) -> str:
        self.close()
        return self._digest.hexdigest()


class _Missing(Exception):
    """The object asked for does not exist."""


class S3PexStore(PexStore):
    """Artifacts, their index, fitted states and frames in one bucket under one prefix.

    ``cache`` is this machine's artifact cache (`orchestrator.cache`): artifacts are fetched into it, once, verified.
    """

    def __init__(
        self,
        url: str,
        *,
        cache: Path | None = None,
        client: Any = None,
        transfer: TransferConfig | None = None,
        page_size: int = 1000,
        settle_seconds: float = SETTLE_SECONDS,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
            raise StoreError(f"{url!r} is not an S3 store URL: use s3://BUCKET or s3://BUCKET/PREFIX")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.cache = Path(cache) if cache else Path(os.path.expanduser("~/.cache/modelpex"))
        self.transfer = transfer or transfer_config()
        self.page_size = page_size
        self.settle_seconds = settle_seconds
        self._client = client
        self._copies: VerifiedCopies | None = None

    # -- the connection and its errors

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._errors(f"connect to {self.url}"):
                # N.B. A session of its own: boto3's default session is shared by every thread and is not safe to
                # create clients from concurrently; a client is.
                self._client = boto3.session.Session().client(
                    "s3", config=Config(max_pool_connections=self.transfer.max_request_concurrency + 2)
                )
        return self._client

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Every failure of boto3 as one `StoreError` line: what was being done, on which store, and the fix."""
        try:
            yield
        except ClientError as exc:
            self._raise_client_error(action, exc)
        except S3UploadFailedError as exc:
            if isinstance(exc.__context__, ClientError):
                self._raise_client_error(action, exc.__context__)
            raise StoreError(f"cannot {action}: {_one_line(exc)}") from None
        except (HTTPClientError, BotoConnectionError) as exc:
            # N.B. The exception's own text repeats the whole request URL: its kind says enough.
            raise StoreError(
                f"cannot {action}: the endpoint {self._endpoint_or_default()} does not answer "
                f"({type(exc).__name__}); check AWS_ENDPOINT_URL (or the profile's endpoint_url) and the network"
            ) from None
        except BotoCoreError as exc:
            # N.B. NoCredentialsError and its kin: nothing in the environment, profile or config files.
            hint = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            if "credential" not in str(exc).lower():
                hint = "check the AWS_* variables and the profile in ~/.aws/config"
            raise StoreError(f"cannot {action}: {_one_line(exc)}; {hint}") from None
        except ValueError as exc:  # N.B. botocore's own: an endpoint URL that is not one, for instance.
            raise StoreError(f"cannot {action}: {_one_line(exc)}; check AWS_ENDPOINT_URL") from None

    def _endpoint_or_default(self) -> str:
        return self.endpoint if self._client is not None else "AWS_ENDPOINT_URL (or the AWS default)"

    def _raise_client_error(self, action: str, exc: ClientError) -> NoReturn:
        code = _code(exc)
        message = _one_line(exc.response.get("Error", {}).get("Message") or exc)
        if code in _DENIED:
            raise StoreError(
                f"cannot {action}: {self.url} denies it to these credentials ({code}); grant them s3:GetObject, "
                "s3:PutObject, s3:DeleteObject and s3:ListBucket on it, or use another store (--store or "
                "MODELPEX_STORE)"
            ) from None
        if code in _CREDENTIALS:
            raise StoreError(
                f"cannot {action}: the server at {self.endpoint} refuses these credentials ({code}); check "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from None
        if code == "NoSuchBucket":
            raise StoreError(
                f"cannot {action}: the bucket {self.bucket} does not exist at {self.endpoint}; create it, or point "
                "MODELPEX_STORE at one that does"
            ) from None
        raise StoreError(f"cannot {action}: {code} from {self.endpoint} ({message})") from None

    # -- objects

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _url_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _key_of(self, url: str) -> str:
        head = f"s3://{self.bucket}/"
        if not url.startswith(head):
            raise StoreError(f"{url} is not in the store {self.url}")
        return url[len(head) :]

    def _artifact_key(self, record: ArtifactRecord) -> str:
        folder = "bases" if record.kind != "model" else f"models/{record.name}"
        suffix = ".tar" if record.kind == "unpacked" else ".pex"
        return self._key(folder, record.key, f"{record.sha256}{suffix}")

    def _index_key(self, location: str) -> str:
        return self._key("index", f"{location}.json")

    def _get(self, key: str, action: str) -> bytes | None:
        with self._errors(action):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return None
                raise

    def _put(self, key: str, data: bytes, action: str, *, create_only: bool = False) -> bool:
        """Write a small object whose checksum the server verifies; ``create_only``: only if absent (``False``
        when it exists, whoever wrote it)."""
        args = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": data,
            "ChecksumSHA256": _b64(hashlib.sha256(data).hexdigest()),
        }
        if create_only:
            args["IfNoneMatch"] = "*"
        with self._errors(action):
            for attempt in range(5):
                try:
                    self.client.put_object(**args)
                    return True
                except ClientError as exc:
                    if create_only and _code(exc) in _LOST:
                        return False
                    if not (create_only and _code(exc) in _CONFLICT) or attempt == 4:
                        raise
                    # N.B. AWS answers 409 while another conditional write of the key is in flight: ask again.
                    time.sleep(0.05 * 2**attempt)
        return False

    def _delete(self, *keys: str, action: str) -> None:
        with self._errors(action):
            for key in keys:
                self.client.delete_object(Bucket=self.bucket, Key=key)

    def _list(self, folder: str) -> Iterator[dict[str, Any]]:
        """Every object under ``<prefix>/<folder>/``, page by page."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(folder) + "/", PaginationConfig={"PageSize": self.page_size}
        )
        with self._errors(f"list {self._url_of(self._key(folder))}/"):
            for page in pages:
                yield from page.get("Contents", [])

    def _upload(self, source: Path, key: str, sha256: str, what: str) -> None:
        """Upload ``source``, whose sha256 must be ``sha256``, with checksums the server verifies.

        Raises `IntegrityError` when the bytes are not those: the server refuses a single PUT whose checksum is not
        the recorded digest (BadDigest); for a multipart upload each part is verified by the server and the whole
        is hashed here on the way, and an upload whose digest differs is removed again.
        """
        changed = f"{what}: {source} changed between its build and its publication"
        action = f"upload {what} to {self.url}"
        metadata = {"sha256": sha256}
        if source.stat().st_size < self.transfer.multipart_threshold:
            try:
                with self._errors(action):
                    self.client.put_object(
                        Bucket=self.bucket,
                        Key=key,
                        Body=source.read_bytes(),
                        ChecksumSHA256=_b64(sha256),
                        Metadata=metadata,
                    )
            except StoreError as exc:
                if "BadDigest" in str(exc):
                    raise IntegrityError(f"{changed} (the server refused its checksum: BadDigest)") from None
                raise
            return
        with open(source, "rb") as handle, self._errors(action):
            reader = _HashingReader(handle)
            self.client.upload_fileobj(
                reader,
                self.bucket,
                key,
                ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": metadata},
                Config=self.transfer,
            )
        if (reader.hexdigest() if reader.sequential else file_sha256(source)) != sha256:
            self._delete(key, action=f"remove the refused upload of {what} from")
            raise IntegrityError(changed)

    def _download_key(self, key: str, destination: Path, action: str) -> str:
        """Write an object to ``destination``; its sha256, computed on the way. `_Missing` when there is none."""
        with open(destination, "wb") as handle, self._errors(action), _HashingWriter(handle) as writer:
            try:
                self.client.download_fileobj(self.bucket, key, writer, Config=self.transfer)
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    raise _Missing(key) from None
                raise
        return writer.hexdigest()

    # -- the index and the artifacts

    def _read_index(self, location: str) -> bytes | None:
        return self._get(self._index_key(location), f"read the index of {self.url}")

    def _index_locations(self) -> list[str]:
        head = self._key("index") + "/"
        found = []
        for item in self._list("index"):
            relative = item["Key"][len(head) :]
            if relative.endswith(".json") and relative.count("/") == 1:
                found.append(relative.removesuffix(".json"))
        return sorted(found)

    def _where(self, location: str) -> str:
        return self._url_of(self._index_key(location))

    # -- release records: one small object per published model version

    def _release_key(self, location: str) -> str:
        return self._key("releases", f"{location}.json")

    def _read_release(self, location: str) -> bytes | None:
        return self._get(self._release_key(location), f"read the releases of {self.url}")

    def _write_release(self, location: str, data: bytes, *, replace: bool) -> bool:
        # N.B. Created only if absent unless replacing: of two publishers of one version, one wins.
        return self._put(
            self._release_key(location), data, f"publish {location} to {self.url}", create_only=not replace
        )

    def _release_locations(self) -> list[str]:
        head = self._key("releases") + "/"
        found = []
        for item in self._list("releases"):
            relative = item["Key"][len(head) :]
            if relative.endswith(".json") and relative.count("/") == 1:
                found.append(relative.removesuffix(".json"))
        return sorted(found)

    def _release_where(self, location: str) -> str:
        return self._url_of(self._release_key(location))

    def check_writable(self, purpose: str) -> None:
        """Write and remove a small object under the prefix: only the server knows what these credentials may do."""
        probe = self._key(".modelpex-write-probe", uuid.uuid4().hex)
        self._put(probe, b"", purpose)
        self._delete(probe, action=purpose)

    def put(self, record: ArtifactRecord, path: Path, *, replace: bool = False) -> ArtifactRecord:
        existing = None if replace else self.record(record.kind, record.name, record.key)
        if existing is not None:
            return existing
        path = Path(path)
        key = self._artifact_key(record)
        self._upload(path, key, record.sha256, record.label)
        data = record.to_json().encode()
        index = self._index_key(index_location(record.kind, record.name, record.key))
        # N.B. Forced, the record is replaced at once and the old bytes stay until gc: a reader holding the old
        # record still finds them. Otherwise the record is created only if absent: of two builders, one wins.
        if self._put(index, data, f"publish {record.label} to {self.url}", create_only=not replace):
            if path.resolve().is_relative_to(self.work_root.resolve()):
                self._verified_copies().adopt(record, path)  # N.B. Hashed on the way up: no download back.
            return record
        winner = self.record(record.kind, record.name, record.key)
        if winner is None:
            raise StoreError(
                f"cannot publish {record.label} to {self.url}: another builder's record of key {record.key} "
                "appeared and vanished again; build again"
            )
        if winner.sha256 != record.sha256:
            self._delete(key, action=f"remove {record.label}'s unpublished bytes from {self.url}")
        return winner

    def _verified_copies(self) -> VerifiedCopies:
        if self._copies is None:
            self._copies = VerifiedCopies(self.cache)
        return self._copies

    def local_path(self, record: ArtifactRecord) -> Path:
        return self._verified_copies().path(record)

    def _download(self, record: ArtifactRecord, destination: Path) -> str:
        key = self._artifact_key(record)
        try:
            return self._download_key(key, destination, f"fetch {record.label} from {self.url}")
        except _Missing:
            raise self._missing(record, self._url_of(key)) from None

    def _stream(self, record: ArtifactRecord, sink: BinaryIO) -> tuple[int, str]:
        key = self._artifact_key(record)
        with self._errors(f"fetch {record.label} from {self.url}"), _HashingWriter(sink) as writer:
            try:
                self.client.download_fileobj(self.bucket, key, writer, Config=self.transfer)
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    raise self._missing(record, self._url_of(key)) from None
                raise
        return writer.size, writer.hexdigest()

    def fetch(self, record: ArtifactRecord) -> Path:
        """The artifact in this machine's cache: downloaded and verified once, then trusted while unchanged."""
        return self._verified_copies().get(self, record)

    def delete(self, record: ArtifactRecord) -> None:
        index = self._index_key(index_location(record.kind, record.name, record.key))
        self._delete(index, self._artifact_key(record), action=f"remove {record.label} from {self.url}")

    def unindexed(self) -> list[Leftover]:
        indexed = {self._artifact_key(r) for r in self.records()}
        cutoff = time.time() - self.settle_seconds
        found = []
        for folder in ("bases", "models"):
            depth = 2 if folder == "bases" else 3
            for item in self._list(folder):
                parts = item["Key"][len(self._key(folder)) + 1 :].split("/")
                unpacked = folder == "bases" and parts[-1].endswith(".tar")
                if len(parts) != depth or not (parts[-1].endswith(".pex") or unpacked) or item["Key"] in indexed:
                    continue
                if item["LastModified"].timestamp() > cutoff:
                    continue
                kind: Literal["base", "model", "unpacked"] = (
                    "unpacked" if unpacked else "base" if folder == "bases" else "model"
                )
                found.append(Leftover(self._url_of(item["Key"]), kind, parts[-2], item["LastModified"].timestamp()))
        return found

    # -- fitted states

    def _state_key(self, model: str, sha256: str, suffix: str) -> str:
        return self._key("states", f"{_state_name(model, sha256)}{suffix}")

    def put_state(self, model: str, sha256: str, payload: bytes, record: str) -> None:
        action = f"store a fitted state of {model} in {self.url}"
        self._put(self._state_key(model, sha256, ".state"), payload, action)
        self._put(self._state_key(model, sha256, ".json"), record.encode(), action)

    def state(self, model: str, sha256: str) -> tuple[str, bytes] | None:
        action = f"read a fitted state of {model} from {self.url}"
        record = self._get(self._state_key(model, sha256, ".json"), action)
        if record is None:
            return None
        payload = self._get(self._state_key(model, sha256, ".state"), action)
        return None if payload is None else (record.decode("utf-8", errors="replace"), payload)

    def _state_objects(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """(model, file name, listing entry) of everything under ``states/``."""
        head = self._key("states") + "/"
        for item in self._list("states"):
            parts = item["Key"][len(head) :].split("/")
            if len(parts) == 2:
                yield parts[0], parts[1], item

    def state_records(self) -> list[tuple[str, str]]:
        found = []
        for model, name, item in self._state_objects():
            if name.endswith(".json"):
                text = self._get(item["Key"], f"read the fitted states of {self.url}")
                if text is not None:
                    found.append((model, text.decode("utf-8", errors="replace")))
        return found

    def delete_state(self, model: str, sha256: str) -> None:
        keys = (self._state_key(model, sha256, ".json"), self._state_key(model, sha256, ".state"))
        self._delete(*keys, action=f"remove a fitted state of {model} from {self.url}")

    def stray_states(self) -> list[Leftover]:
        objects = list(self._state_objects())
        records = {(model, name.removesuffix(".json")) for model, name, _ in objects if name.endswith(".json")}
        cutoff = time.time() - self.settle_seconds
        return [
            Leftover(self._url_of(item["Key"]), "state", name.removesuffix(".state"), item["LastModified"].timestamp())
            for model, name, item in objects
            if name.endswith(".state")
            and (model, name.removesuffix(".state")) not in records
            and item["LastModified"].timestamp() <= cutoff
        ]

    def remove(self, leftover: Leftover) -> None:
        self._delete(self._key_of(leftover.where), action=f"remove {leftover.where}")

    # -- frames

    def _frame_key(self, parts: Iterable[str]) -> str:
        return self._key("frames", f"{_frame_name(parts)}.parquet")

    def put_frame(self, parts: Iterable[str], source: Path) -> str:
        key = self._frame_key(parts)
        # N.B. Hashed first: the digest travels as the object's metadata, which the fetch checks the bytes against.
        self._upload(source, key, file_sha256(source), f"frame {_frame_name(parts)}")
        return self._url_of(key)

    def fetch_frame(self, parts: Iterable[str], destination: Path) -> bool:
        key = self._frame_key(parts)
        action = f"fetch frame {_frame_name(parts)} from {self.url}"
        with self._errors(action):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return False
                raise
        try:
            digest = self._download_key(key, destination, action)
        except _Missing:
            return False
        expected = head.get("Metadata", {}).get("sha256")
        if expected is None:
            raise IntegrityError(
                f"refusing frame {self._url_of(key)}: it carries no sha256, so modelpex did not write it. "
                "Materialise it again"
            )
        if digest != expected:
            raise IntegrityError(
                f"refusing frame {self._url_of(key)}: its bytes hash to {digest[:12]}, not {expected[:12]} as stored "
                "with it; it was altered in the store. Materialise it again"
            )
        return True

    # -- this machine

    @property
    def work_root(self) -> Path:
        return self.cache / "work"

    def lock(self, name: str) -> FileLock:
        store = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        return self._verified_copies().lock(f"store-{store}-{name}")
