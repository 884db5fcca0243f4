"""Store: where built pex files live, with an index of what each one is, verified before anything runs.

The interface is a handful of primitives (`put`, raw index entries by location, `_download`, `delete`) in the
manner of fsspec; `record`, `scan`, `find`, `verify`, `download` and `fetch` are built on them, so what a record may
say, whether it is the one that was asked for, and whether fetched bytes are the recorded ones, is checked once for
every backend. Backends are chosen by URL: the local directory (``pex_builds/``, any path or ``file://`` URL) is the
default; ``s3://bucket/prefix`` is an S3-compatible object store (`orchestrator.s3store`, imported only when chosen).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import urlparse

from filelock import FileLock

from orchestrator.errors import IntegrityError, ModelpexError, RecordError, StoreError
from orchestrator.files import staged, write_atomic
from orchestrator.leases import lease_dir
from orchestrator.specs import validate_name, validate_version

__all__ = [
    "ArtifactRecord",
    "IndexScan",
    "Leftover",
    "LocalPexStore",
    "PexStore",
    "ReleaseRecord",
    "ReleaseScan",
    "copy_hashing",
    "file_sha256",
    "index_location",
    "is_remote",
    "open_store",
    "referenced",
]

Kind = Literal["base", "model", "unpacked"]
KINDS: tuple[Kind, ...] = ("base", "model", "unpacked")
BASE_NAME = "base"
# N.B. The unpacked base (`orchestrator.cache`) is filed apart from the base under the base's key; a hyphen cannot
# start or occur in a model name, so no model's folder can be this one.
UNPACKED_FOLDER = "base-unpacked"
UNPACKED_SUFFIX = ".unpacked.tar"
BUILD_PREFIX = "build-"
_KEY_CHARS = set("0123456789abcdef")
# N.B. What a record file must hold, and the JSON types of every field: the index is files anyone who can write the
# store could edit, and its fields become paths, cache names and the pex that runs.
_REQUIRED = ("kind", "name", "version", "key", "sha256", "size")
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,),
    "name": (str,),
    "version": (str,),
    "key": (str,),
    "sha256": (str,),
    "size": (int,),
    "base_key": (str, type(None)),
    "git_commit": (str, type(None)),
    "built_at": (str,),
    "build_seconds": (int, float),
    "interpreter": (str,),
    "details": (dict,),
}


_RELEASE_REQUIRED = ("name", "version", "digest")
_RELEASE_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "version": (str,),
    "digest": (str,),
    "predictions": (dict,),
    "description": (str,),
    "git_commit": (str, type(None)),
    "source": (str,),
    "published_at": (str,),
}
RELEASE_SOURCES = ("tag", "working tree")

COPY_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed so a 200 MB base does not sit in memory twice."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def copy_hashing(source: Path, destination: Path) -> str:
    """Copy ``source`` to ``destination`` and return the sha256 of the bytes written, in one pass."""
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(destination, "wb") as writer:
        while chunk := reader.read(COPY_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
    return digest.hexdigest()


def _state_name(model: str, sha256: str) -> str:
    """``<model>/<sha256>``, where a fitted state is filed; both parts validated before any path is built."""
    if not isinstance(sha256, str) or not _is_hex(sha256, 64):
        raise StoreError(f"{sha256!r} is not a sha256 digest")
    return f"{validate_name(model)}/{sha256}"


def _frame_name(parts: Iterable[str]) -> str:
    """``a/b/c``: an asset key's parts as a path under ``frames/``, none of which may climb out of it."""
    parts = list(parts)
    if not parts or any(not p or p in (".", "..") or "/" in p or "\\" in p or "\0" in p for p in parts):
        raise StoreError(f"asset key {parts!r} cannot name a stored frame")
    return "/".join(parts)


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and set(text) <= _KEY_CHARS


def _validate_key(key: str) -> str:
    if not isinstance(key, str) or not _is_hex(key, 32):
        raise StoreError(f"artifact key {key!r} is not a 32-character hex content key")
    return key


def _check_types(values: dict[str, object], field_types: dict[str, tuple[type, ...]] = _FIELD_TYPES) -> None:
    """Every known field has its JSON type (``true`` is not a size): the rest of the record is checked on top."""
    for name, types in field_types.items():
        value = values.get(name)
        if name in values and (isinstance(value, bool) or not isinstance(value, types)):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise StoreError(f"field {name} = {value!r} is not {expected}")


def _from_json(cls: Any, text: str | bytes, required: Iterable[str]) -> Any:
    """A record dataclass from its JSON: a `StoreError` says what is wrong; fields ``cls`` does not know are ignored."""
    try:
        data = json.loads(text)
    except ValueError as exc:  # N.B. JSONDecodeError and UnicodeDecodeError, from a truncated or binary file.
        raise StoreError(f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise StoreError(f"is not a JSON object but {type(data).__name__}")
    missing = [name for name in required if name not in data]
    if missing:
        raise StoreError(f"lacks the field(s) {', '.join(missing)}")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except ModelpexError as exc:
        raise StoreError(f"is not valid ({exc})") from None


def index_location(kind: str, name: str, key: str) -> str:
    """Where the record of an artifact is filed: ``base/<key>``, ``base-unpacked/<key>`` or ``<model>/<key>``,
    validated before any use."""
    if kind not in KINDS:
        raise StoreError(f"artifact kind {kind!r} is not one of {', '.join(KINDS)}")
    folders = {"base": BASE_NAME, "unpacked": UNPACKED_FOLDER}
    folder = folders[kind] if kind in folders else validate_name(name)
    return f"{folder}/{_validate_key(key)}"


def _filed_as(location: str) -> tuple[Kind, str, str]:
    """The (kind, name, key) an index location stands for; `index_location` validates them."""
    folder, _, key = location.partition("/")
    if folder == UNPACKED_FOLDER:
        return "unpacked", BASE_NAME, key
    return ("base" if folder == BASE_NAME else "model"), folder, key


def _label(kind: str, name: str, version: str | None, unknown: str = "") -> str:
    if kind in ("base", "unpacked"):
        return BASE_NAME
    return f"{name}@{version or unknown}" if version or unknown else name


def _record_error(where: str, problem: str, fix: str) -> RecordError:
    error = RecordError(f"index record {where} {problem}: {fix}")
    error.where, error.problem = where, problem
    return error


@dataclass(frozen=True)
class ArtifactRecord:
    """One index entry: what an artifact is, where it came from and the bytes it must have."""

    kind: Kind
    name: str
    version: str
    key: str
    sha256: str = ""
    size: int = 0
    base_key: str | None = None
    git_commit: str | None = None
    built_at: str = ""
    build_seconds: float = 0.0
    interpreter: str = ""
    details: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_types(vars(self))
        if self.kind not in KINDS:
            raise StoreError(f"artifact kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind in ("base", "unpacked") and self.name != BASE_NAME:
            raise StoreError(f"a {self.kind} base artifact is named {BASE_NAME!r}, not {self.name!r}")
        if self.kind == "model":
            validate_name(self.name)
        validate_version(self.version, model=self.name)
        _validate_key(self.key)
        if self.base_key is not None:
            _validate_key(self.base_key)
        if self.sha256 and not _is_hex(self.sha256, 64):
            raise StoreError(f"sha256 {self.sha256!r} is not a 64-character hex digest")
        if self.size < 0:
            raise StoreError(f"size {self.size} is negative")

    @property
    def filename(self) -> str:
        """Content-named file name. N.B. model pexes find their base by this name: never rename a base."""
        if self.kind == "base":
            return f"base-{self.key}.pex"
        if self.kind == "unpacked":
            return f"base-{self.key}{UNPACKED_SUFFIX}"
        return f"{self.name}-{self.version}-{self.key}.pex"

    @property
    def label(self) -> str:
        return {"base": "base", "unpacked": "unpacked base"}.get(self.kind, f"{self.name}@{self.version}")

    @property
    def rebuild(self) -> str:
        """The command that publishes this artifact again, as error messages name it."""
        return f"modelpex build {'base' if self.kind != 'model' else self.label} --force"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ArtifactRecord:
        """Parse a published record; a `StoreError` says what is wrong ("is not valid JSON (...)", ...).

        N.B. Fields this version does not know are ignored, so an older orchestrator reads a newer index.
        """
        return _from_json(cls, text, _REQUIRED)

    def check_identity(self, kind: str, name: str, key: str, version: str | None = None) -> None:
        """Raise a `StoreError` unless this is the record of (kind, name, key[, version]).

        N.B. A record copied over another key's file, or one whose kind or name was edited, must not choose which
        pex runs or where its path points: it is checked against what was asked for before a path is built from it.
        """
        if (self.kind, self.name, self.key) == (kind, name, key) and version in (None, self.version):
            return
        wanted = f"{_label(kind, name, version)} key {key}"
        raise StoreError(
            f"holds {self.kind} {self.label} key {self.key}, not {wanted}: it was copied or edited by hand"
        )

    def finished(self, path: Path, **changes: object) -> ArtifactRecord:
        """This record with the size and sha256 of ``path`` and the build time filled in."""
        built_at = datetime.now(UTC).isoformat(timespec="seconds")
        return dataclasses.replace(
            self, sha256=file_sha256(path), size=path.stat().st_size, built_at=built_at, **changes
        )


def release_location(name: str, version: str) -> str:
    """Where a model version's release record is filed: ``<model>/<version>``, validated before any path is built."""
    return f"{validate_name(name)}/{validate_version(version, model=name)}"


@dataclass(frozen=True)
class ReleaseRecord:
    """A model version published into the store (``releases/<model>/<version>.json``): what any host needs to
    declare the version and find its pex by content key, with or without git.

    N.B. ``digest`` is the model folder's content digest (`tree_digest`), from which a pex's key derives for any
    base: the record outlives a change of base, and a host whose base differs finds that its pex is not built yet.
    """

    name: str
    version: str
    digest: str
    predictions: dict[str, object] = field(default_factory=dict)
    description: str = ""
    git_commit: str | None = None
    source: str = "tag"  # where it was published from: a release "tag" or the "working tree"
    published_at: str = ""

    def __post_init__(self) -> None:
        _check_types(vars(self), _RELEASE_TYPES)
        release_location(self.name, self.version)
        if not _is_hex(self.digest, 64):
            raise StoreError(f"digest {self.digest!r} is not a 64-character hex content digest")
        if self.source not in RELEASE_SOURCES:
            raise StoreError(f"source {self.source!r} is not one of {', '.join(RELEASE_SOURCES)}")

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def location(self) -> str:
        return release_location(self.name, self.version)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ReleaseRecord:
        """Parse a release record; a `StoreError` says what is wrong. Unknown fields are ignored (a newer writer)."""
        return _from_json(cls, text, _RELEASE_REQUIRED)


@dataclass(frozen=True)
class ReleaseScan:
    """Every release record that can be trusted, with where it is filed; and the ones that cannot (warned about)."""

    records: list[tuple[ReleaseRecord, str]]  # (record, its file or URL)
    problems: dict[str, RecordError]


@dataclass(frozen=True)
class IndexScan:
    """The whole index: the records that can be trusted, and the entries that cannot (reported, never acted on)."""

    records: list[ArtifactRecord]
    problems: dict[str, RecordError]  # index location (``<folder>/<key>``) -> why it is not trusted


@dataclass(frozen=True)
class Leftover:
    """Bytes in the store that no record points at: an artifact or a fitted state a crash or a lost race left."""

    where: str  # its file or URL, as messages name it
    kind: Literal["base", "model", "unpacked", "state"]
    key: str  # the artifact key, or the state's sha256
    modified: float  # seconds since the epoch


class PexStore(ABC):
    """Artifacts by (kind, name, key), each with an index record; a fetched artifact is always verified.

    Backends provide raw primitives (index entries as bytes by location, artifact bytes, locks). What a record may
    say, whether it is the record that was asked for, and whether downloaded bytes are the recorded ones, is checked
    here, once for every backend.
    """

    url: str

    @abstractmethod
    def put(self, record: ArtifactRecord, path: Path, *, replace: bool = False) -> ArtifactRecord:
        """Publish ``path`` as ``record`` atomically: readers see the whole artifact or none of it.

        An existing record of the key wins (and is returned) unless ``replace``: then the old artifact stays in place
        and usable until the new one is wholly there, so a crash during a forced rebuild loses nothing. Two
        publishers of one key cannot overwrite each other's record: one wins, the other gets the winner's record.
        """

    @abstractmethod
    def _read_index(self, location: str) -> bytes | None:
        """The raw bytes filed at an index location (``<folder>/<key>``), or ``None`` when nothing is."""

    @abstractmethod
    def _index_locations(self) -> list[str]:
        """The location of every index entry, valid or not."""

    @abstractmethod
    def _where(self, location: str) -> str:
        """An index entry's file or URL, as messages name it."""

    @abstractmethod
    def _read_release(self, location: str) -> bytes | None:
        """The raw bytes of a release record (``<model>/<version>``), or ``None`` when there is none."""

    @abstractmethod
    def _write_release(self, location: str, data: bytes, *, replace: bool) -> bool:
        """File a release record whole; unless ``replace``, only when none is filed there (``False`` if one is)."""

    @abstractmethod
    def _release_locations(self) -> list[str]:
        """The location of every release record, valid or not."""

    @abstractmethod
    def _release_where(self, location: str) -> str:
        """A release record's file or URL, as messages name it."""

    @abstractmethod
    def check_writable(self, purpose: str) -> None:
        """Raise one `StoreError` line naming the store and ``purpose`` when the store cannot be written."""

    @abstractmethod
    def local_path(self, record: ArtifactRecord) -> Path:
        """Where the artifact's bytes are, or will be once fetched, on this machine."""

    @abstractmethod
    def _download(self, record: ArtifactRecord, destination: Path) -> str | None:
        """Write the artifact's bytes to ``destination``; return their sha256 when it was computed on the way.

        A missing artifact is an `IntegrityError` naming it (its record exists: something removed the bytes).
        """

    @abstractmethod
    def _stream(self, record: ArtifactRecord, sink: BinaryIO) -> tuple[int, str]:
        """Write the artifact's bytes to ``sink`` in order; return their size and sha256, computed on the way."""

    @abstractmethod
    def fetch(self, record: ArtifactRecord) -> Path:
        """The artifact on local disk, verified; nothing unverified is ever returned."""

    @abstractmethod
    def delete(self, record: ArtifactRecord) -> None:
        """Remove the record first, then the bytes, so a reader never finds a record without its file."""

    @abstractmethod
    def put_state(self, model: str, sha256: str, payload: bytes, record: str) -> None:
        """Publish a fitted state's bytes, then its record (JSON text): whole or not at all, record last."""

    @abstractmethod
    def state(self, model: str, sha256: str) -> tuple[str, bytes] | None:
        """A fitted state's record text and bytes, or ``None`` when there is no record."""

    @abstractmethod
    def state_records(self) -> list[tuple[str, str]]:
        """(model, record text) of every fitted state."""

    @abstractmethod
    def delete_state(self, model: str, sha256: str) -> None:
        """Remove a state's record first, then its bytes."""

    @abstractmethod
    def put_frame(self, parts: Iterable[str], source: Path) -> str:
        """Publish a Parquet file as the frame of an asset key (its parts); return where it now is."""

    @abstractmethod
    def fetch_frame(self, parts: Iterable[str], destination: Path) -> bool:
        """Write an asset's stored frame to ``destination``; ``False`` when there is none."""

    @abstractmethod
    def unindexed(self) -> list[Leftover]:
        """Artifacts no record points at (a crash between upload and index, a lost race, a forced replacement)."""

    @abstractmethod
    def stray_states(self) -> list[Leftover]:
        """State bytes without a record: leftovers of a crash between the two writes."""

    @abstractmethod
    def remove(self, leftover: Leftover) -> None:
        """Remove a leftover that `unindexed` or `stray_states` reported."""

    @abstractmethod
    def lock(self, name: str) -> FileLock:
        """An inter-process lock for building ``name`` once even when two processes try at the same time.

        N.B. It spans the processes of one machine; publication itself settles races between machines.
        """

    @property
    @abstractmethod
    def work_root(self) -> Path:
        """The local folder builds happen in (`work_dir`), swept by `modelpex gc`."""

    @contextmanager
    def work_dir(self) -> Iterator[Path]:
        """A fresh folder to build into, leased while the build runs (gc removes it after its owner is gone)."""
        self.work_root.mkdir(parents=True, exist_ok=True)
        with lease_dir(self.work_root, BUILD_PREFIX) as folder:
            yield folder

    def record(self, kind: Kind, name: str, key: str, version: str | None = None) -> ArtifactRecord | None:
        """The index record of one artifact (of ``version``, when given), or ``None`` when it was never published.

        A record that cannot be read, or that is not the record of what was asked for, is a `RecordError` naming
        its file: it is never returned, so nothing builds a path or runs a pex from it. A store that cannot be
        reached at all is a plain `StoreError` (the record is not at fault).
        """
        location = index_location(kind, name, key)
        fix = f"remove it, or rebuild with `modelpex build {_label(kind, name, version, '<version>')} --force`"
        try:
            data = self._read_index(location)
        except OSError as exc:
            raise _record_error(self._where(location), f"cannot be read ({exc.strerror or exc})", fix) from None
        if data is None:
            return None
        try:
            record = ArtifactRecord.from_json(data)
            record.check_identity(kind, name, key, version)
        except StoreError as exc:
            raise _record_error(self._where(location), str(exc), fix) from None
        return record

    def release(self, name: str, version: str) -> ReleaseRecord | None:
        """The release record of ``name@version``, or ``None``; one that cannot be read is a `RecordError` naming its
        file (never a version anyone runs)."""
        location = release_location(name, version)
        where = self._release_where(location)
        fix = f"remove it, or publish it again with `modelpex build {name}@{version} --force`"
        try:
            data = self._read_release(location)
        except OSError as exc:
            raise _record_error(where, f"cannot be read ({exc.strerror or exc})", fix) from None
        if data is None:
            return None
        try:
            record = ReleaseRecord.from_json(data)
        except StoreError as exc:
            raise _record_error(where, str(exc), fix) from None
        if record.location != location:
            problem = f"holds {record.label}, not {name}@{version}: it was copied or edited by hand"
            raise _record_error(where, problem, fix)
        return record

    def releases(self) -> ReleaseScan:
        """Every model version published into this store, and the records that cannot be trusted."""
        records: list[tuple[ReleaseRecord, str]] = []
        problems: dict[str, RecordError] = {}
        for location in self._release_locations():
            name, _, version = location.partition("/")
            try:
                found = self.release(name, version)
            except ModelpexError as exc:
                problems[location] = (
                    exc
                    if isinstance(exc, RecordError)
                    else _record_error(self._release_where(location), "is not filed as <model>/<version>", "remove it")
                )
                continue
            if found is not None:
                records.append((found, self._release_where(location)))
        return ReleaseScan(records, problems)

    def publish_release(self, record: ReleaseRecord, *, replace: bool = False) -> ReleaseRecord:
        """File ``record`` as its version's release, the store's word to every host that the version exists.

        The same content published again keeps the first record. Another content under the same version is refused,
        naming both, unless ``replace`` (`build --force`) or both come from a working tree (a version in development,
        not yet tagged): a release is what every host runs for that version, and must not change under it silently.
        """
        existing = self.release(record.name, record.version)
        if existing is not None and existing.digest == record.digest:
            return existing
        # N.B. The working tree is the development head: what it last published of its own version is no release yet.
        replace = replace or (existing is not None and existing.source == record.source == "working tree")
        if existing is not None and not replace:
            raise self._release_conflict(existing, record)
        stamped = dataclasses.replace(record, published_at=datetime.now(UTC).isoformat(timespec="seconds"))
        if self._write_release(record.location, stamped.to_json().encode(), replace=existing is not None):
            return stamped
        winner = self.release(record.name, record.version)  # N.B. Another publisher filed it first.
        if winner is None or winner.digest != record.digest:
            raise self._release_conflict(winner or stamped, record)
        return winner

    def _release_conflict(self, existing: ReleaseRecord, record: ReleaseRecord) -> StoreError:
        return StoreError(
            f"{record.label}: the store's release record {self._release_where(record.location)} has content digest "
            f"{existing.digest[:12]} (from its {existing.source}, commit {existing.git_commit or 'unknown'}) but its "
            f"{record.source} has {record.digest[:12]}: a released version never changes, so release a new version "
            f"(or replace the record with `modelpex build {record.label} --force`)"
        )

    def scan(self) -> IndexScan:
        """Every record that can be trusted, and a `RecordError` for each index entry that cannot."""
        records: list[ArtifactRecord] = []
        problems: dict[str, RecordError] = {}
        for location in self._index_locations():
            kind, name, key = _filed_as(location)
            try:
                index_location(kind, name, key)
            except ModelpexError:
                where = self._where(location)
                problems[location] = _record_error(where, "is not filed as <model>/<key> or base/<key>", "remove it")
                continue
            try:
                found = self.record(kind, name, key)
            except RecordError as exc:
                problems[location] = exc
                continue
            if found is not None:
                records.append(found)
        return IndexScan(records, problems)

    def records(self) -> list[ArtifactRecord]:
        """Every record that can be trusted, in no particular order (`scan` also names the others)."""
        return self.scan().records

    def exists(self, kind: Kind, name: str, key: str) -> bool:
        return self.record(kind, name, key) is not None

    def find(self, kind: Kind, name: str, version: str | None = None) -> list[ArtifactRecord]:
        """Records of one base or model (optionally one version), newest build first."""
        found = [r for r in self.records() if r.kind == kind and r.name == name]
        if version is not None:
            found = [r for r in found if r.version == version]
        return sorted(found, key=lambda r: r.built_at, reverse=True)

    def verify(self, record: ArtifactRecord, path: Path | None = None) -> Path:
        """Check size and sha256 against the index; raise `IntegrityError` naming the artifact otherwise."""
        path = path or self.local_path(record)
        if not path.is_file():
            raise self._missing(record, str(path))
        size = path.stat().st_size
        actual = file_sha256(path) if size == record.size else None
        self._check_bytes(record, str(path), size, actual)
        return path

    def download(self, record: ArtifactRecord, destination: Path) -> Path:
        """Copy the artifact to ``destination`` and check the copy against the index, hashing it on the way where
        the backend can. Raises `IntegrityError` naming the artifact when the bytes are not the recorded ones.

        N.B. The copy is what is checked, not the source: what runs is the copy, and nobody else can write it.
        """
        digest = self._download(record, destination)
        size = destination.stat().st_size
        if digest is None and size == record.size:
            digest = file_sha256(destination)
        self._check_bytes(record, f"its copy from {self.url}", size, digest)
        return destination

    def stream(self, record: ArtifactRecord, sink: BinaryIO) -> None:
        """Write the artifact's bytes to ``sink`` as they arrive, hashed on the way; after the last one, raise
        `IntegrityError` naming the artifact when they are not the recorded ones.

        N.B. For a reader that makes nothing of the bytes visible before this returns (`orchestrator.cache`
        extracts the unpacked base into a private folder as it arrives): the bytes it consumed are the bytes
        hashed, and nobody else can change them on the way.
        """
        size, digest = self._stream(record, sink)
        self._check_bytes(record, f"its stream from {self.url}", size, digest)

    def _missing(self, record: ArtifactRecord, where: str) -> IntegrityError:
        return IntegrityError(
            f"{record.label} (key {record.key}) is in the index of {self.url} but its file {where} is "
            f"missing: rebuild it with `{record.rebuild}`"
        )

    @staticmethod
    def _check_bytes(record: ArtifactRecord, what: str, size: int, digest: str | None) -> None:
        if size == record.size and digest == record.sha256:
            return
        found = f"{size} bytes" if size != record.size or digest is None else f"sha256 {digest}"
        raise IntegrityError(
            f"refusing to run {record.label}: {what} has {found} but the index recorded {record.size} "
            f"bytes with sha256 {record.sha256}; it was truncated or tampered with. Rebuild it with "
            f"`{record.rebuild}`"
        )


class LocalPexStore(PexStore):
    """A directory: ``bases/``, ``models/<name>/``, ``index/<name>/<key>.json``, ``states/``, ``frames/``,
    ``locks/``, ``work/``.

    N.B. Files are moved into place with `os.replace` from ``work/`` on the same file system, and the index
    record is written last: a crash leaves at worst an unindexed file, which `modelpex gc` removes.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.url = self.root.as_uri()

    def _artifact_path(self, record: ArtifactRecord) -> Path:
        folder = self.root / "bases" if record.kind != "model" else self.root / "models" / record.name
        return folder / record.filename

    def _index_path(self, kind: Kind, name: str, key: str) -> Path:
        return self._index_file(index_location(kind, name, key))

    def _index_file(self, location: str) -> Path:
        return self.root / "index" / f"{location}.json"

    def _read_index(self, location: str) -> bytes | None:
        try:
            return self._index_file(location).read_bytes()
        except FileNotFoundError:
            return None

    def _index_locations(self) -> list[str]:
        return [f"{p.parent.name}/{p.stem}" for p in sorted((self.root / "index").glob("*/*.json"))]

    def _where(self, location: str) -> str:
        return str(self._index_file(location))

    def _release_file(self, location: str) -> Path:
        return self.root / "releases" / f"{location}.json"

    def _read_release(self, location: str) -> bytes | None:
        try:
            return self._release_file(location).read_bytes()
        except FileNotFoundError:
            return None

    def _write_release(self, location: str, data: bytes, *, replace: bool) -> bool:
        path = self._release_file(location)
        with self.lock(f"release-{location.replace('/', '-')}"):
            if not replace and path.exists():
                return False
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
        return True

    def _release_locations(self) -> list[str]:
        return [f"{p.parent.name}/{p.stem}" for p in sorted((self.root / "releases").glob("*/*.json"))]

    def _release_where(self, location: str) -> str:
        return str(self._release_file(location))

    def check_writable(self, purpose: str) -> None:
        """Create and remove a file in the store's folder: mode bits do not tell (root ignores them), this does."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".write-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StoreError(
                f"cannot {purpose}: the artifact store {self.root} is not writable ({exc.strerror or exc}); make "
                "it writable, or use another store (--store or MODELPEX_STORE)"
            ) from None

    @property
    def work_root(self) -> Path:
        return self.root / "work"

    def put(self, record: ArtifactRecord, path: Path, *, replace: bool = False) -> ArtifactRecord:
        existing = None if replace else self.record(record.kind, record.name, record.key)
        if existing is not None:
            return existing  # N.B. A concurrent builder published this key first; never overwrite an artifact.
        destination = self._artifact_path(record)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if file_sha256(path) != record.sha256:
            raise IntegrityError(f"{record.label}: {path} changed between its build and its publication")
        staged = destination.with_name(f".{destination.name}.{os.getpid()}.{id(path)}.tmp")
        try:
            if Path(path).resolve().is_relative_to(self.work_root):
                os.replace(path, staged)
            else:
                shutil.copyfile(path, staged)
            os.chmod(staged, 0o555)
            # N.B. Not the builder's lock (it may hold that one): this one covers publication alone, so two
            # publishers of one key (not built under one lock) cannot put one's bytes under the other's record.
            with self.lock(f"publish-{record.kind}-{record.key}"):
                existing = None if replace else self.record(record.kind, record.name, record.key)
                if existing is not None:
                    return existing
                # N.B. Replacing, the old artifact stays whole until this rename and its record follows at once; a
                # crash between the two leaves new bytes under the old record, which `verify` refuses, naming
                # `build --force`.
                os.replace(staged, destination)
                write_atomic(self._index_path(record.kind, record.name, record.key), record.to_json())
        finally:
            staged.unlink(missing_ok=True)
        return record

    def local_path(self, record: ArtifactRecord) -> Path:
        return self._artifact_path(record)

    def _download(self, record: ArtifactRecord, destination: Path) -> str:
        source = self._artifact_path(record)
        try:
            return copy_hashing(source, destination)
        except FileNotFoundError:
            raise self._missing(record, str(source)) from None

    def _stream(self, record: ArtifactRecord, sink: BinaryIO) -> tuple[int, str]:
        source = self._artifact_path(record)
        digest, size = hashlib.sha256(), 0
        try:
            with open(source, "rb") as reader:
                while chunk := reader.read(COPY_CHUNK):
                    digest.update(chunk)
                    sink.write(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise self._missing(record, str(source)) from None
        return size, digest.hexdigest()

    def fetch(self, record: ArtifactRecord) -> Path:
        """The artifact where it is, verified (the store is on this machine: nothing to copy)."""
        return self.verify(record)

    def delete(self, record: ArtifactRecord) -> None:
        self._index_path(record.kind, record.name, record.key).unlink(missing_ok=True)
        self._artifact_path(record).unlink(missing_ok=True)

    def unindexed_files(self) -> list[Path]:
        """Artifact files no record points at: leftovers of a crash between move and index write."""
        indexed = {self._artifact_path(r) for r in self.records()}
        files = [*self.root.glob("bases/*.pex"), *self.root.glob(f"bases/*{UNPACKED_SUFFIX}")]
        files += self.root.glob("models/*/*.pex")
        return sorted(p for p in files if p not in indexed)

    def unindexed(self) -> list[Leftover]:
        found = []
        for path in self.unindexed_files():
            unpacked = path.name.endswith(UNPACKED_SUFFIX)
            kind: Literal["base", "model", "unpacked"] = (
                "unpacked" if unpacked else "base" if path.parent.name == "bases" else "model"
            )
            key = path.name.removesuffix(UNPACKED_SUFFIX if unpacked else ".pex").rpartition("-")[2]
            found.append(Leftover(str(path), kind, key, path.stat().st_mtime))
        return found

    def _state_path(self, model: str, sha256: str, suffix: str) -> Path:
        return self.root / "states" / f"{_state_name(model, sha256)}{suffix}"

    def put_state(self, model: str, sha256: str, payload: bytes, record: str) -> None:
        folder = self._state_path(model, sha256, "").parent
        # N.B. States hold what was learnt from a client's data: readable by the orchestrator only.
        for directory in (folder.parent, folder):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self._state_path(model, sha256, ".state"), payload)
        write_atomic(self._state_path(model, sha256, ".json"), record)

    def state(self, model: str, sha256: str) -> tuple[str, bytes] | None:
        try:
            record = self._state_path(model, sha256, ".json").read_text(encoding="utf-8")
            return record, self._state_path(model, sha256, ".state").read_bytes()
        except FileNotFoundError:
            return None

    def state_records(self) -> list[tuple[str, str]]:
        return [(p.parent.name, p.read_text(encoding="utf-8")) for p in sorted(self.root.glob("states/*/*.json"))]

    def delete_state(self, model: str, sha256: str) -> None:
        self._state_path(model, sha256, ".json").unlink(missing_ok=True)
        self._state_path(model, sha256, ".state").unlink(missing_ok=True)

    def stray_states(self) -> list[Leftover]:
        return [
            Leftover(str(p), "state", p.stem, p.stat().st_mtime)
            for p in sorted(self.root.glob("states/*/*.state"))
            if not p.with_suffix(".json").exists()
        ]

    def remove(self, leftover: Leftover) -> None:
        Path(leftover.where).unlink(missing_ok=True)

    def _frame_path(self, parts: Iterable[str]) -> Path:
        return self.root / "frames" / f"{_frame_name(parts)}.parquet"

    def put_frame(self, parts: Iterable[str], source: Path) -> str:
        path = self._frame_path(parts)
        # N.B. Every client's data: readable by the orchestrator only.
        (self.root / "frames").mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        with staged(path) as temporary:
            shutil.copyfile(source, temporary)
        return str(path)

    def fetch_frame(self, parts: Iterable[str], destination: Path) -> bool:
        try:
            shutil.copyfile(self._frame_path(parts), destination)
        except FileNotFoundError:
            return False
        return True

    def lock(self, name: str) -> FileLock:
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / "locks" / f"{name}.lock")


def is_remote(url: str | os.PathLike[str]) -> bool:
    """Whether a store URL names an object store (``s3://``) rather than a folder on this machine."""
    return urlparse(os.fspath(url)).scheme not in ("", "file")


def _s3_store(url: str, cache: Path | None) -> PexStore:
    try:
        from orchestrator.s3store import S3PexStore
    except ImportError as exc:
        raise StoreError(
            f"the artifact store {url} needs boto3 ({exc}): install it with `pip install 'modelpex[s3]'`"
        ) from None
    return S3PexStore(url, cache=cache)


_BACKENDS: dict[str, Callable[[str, Path | None], PexStore]] = {
    "file": lambda url, cache: LocalPexStore(Path(urlparse(url).path)),
    "s3": _s3_store,
}


def open_store(url: str | os.PathLike[str], *, cache: Path | None = None) -> PexStore:
    """A store from a URL (``file:///abs/dir``, ``s3://bucket/prefix``) or a plain path; unknown schemes say what
    exists. ``cache`` is this machine's artifact cache (`orchestrator.cache`), where a remote store's artifacts are
    fetched to; default ``~/.cache/modelpex``.
    """
    text = os.fspath(url)
    scheme = urlparse(text).scheme
    if scheme in ("", "file") and not text.startswith("file:"):
        return LocalPexStore(Path(text))
    backend = _BACKENDS.get(scheme)
    if backend is None:
        raise StoreError(
            f"no artifact store backend for {text!r}: supported URL schemes are "
            f"{', '.join(f'{scheme}://' for scheme in sorted(_BACKENDS))} (or a plain directory path)"
        )
    return backend(text, cache)


def referenced(records: Iterable[ArtifactRecord], keep: Callable[[ArtifactRecord], bool]) -> set[str]:
    """Keys of the records ``keep`` selects plus the bases those models run on."""
    records = list(records)
    kept = {r.key for r in records if keep(r)}
    kept |= {r.base_key for r in records if r.key in kept and r.base_key}
    return kept
