"""States: fitted states in the store, each with a record signed by the orchestrator, verified before any use.

A training call hands back the state's bytes (`orchestrator.run.FittedState`); the orchestrator hashes them
itself, writes them to the store with a record (model, version, model key, client, training run, sha256, format)
and signs the record with HMAC-SHA256 under a key only it can read: not the model user, and not a file beside the
states. Before a state goes back to a model process for inference, its record's signature, then its bytes' digest,
then the model version it was trained by are checked. A state and its record replaced together are refused: whoever
replaced them did not hold the key.

A state is stored under its *state id*, a digest of its bytes and of who trained it (model version and client):
two clients, or two versions, whose training happens to produce the same bytes each keep their own record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from orchestrator.errors import IntegrityError, StoreError
from orchestrator.run import FittedState
from orchestrator.store import ArtifactRecord, PexStore

__all__ = ["StateKeeper", "StateRecord", "signing_key", "state_id"]

KEY_BYTES = 32


def signing_key(path: Path) -> bytes:
    """The orchestrator's signing key, created (mode 0600, in a mode-0700 folder) the first time it is needed."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return signing_key(path)  # N.B. Another process created it first: use theirs.
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(KEY_BYTES))
        key = path.read_bytes()
    if len(key) < KEY_BYTES:
        raise StoreError(f"the signing key {path} is shorter than {KEY_BYTES} bytes: remove it to make a new one")
    if path.stat().st_mode & 0o077:
        raise StoreError(f"the signing key {path} is readable by others: `chmod 600 {path}`, then rotate it")
    return key


def state_id(model: str, version: str, client: str, sha256: str) -> str:
    """Where a state is kept: its bytes' digest and its trainer, as one sha256 (the store's key for states)."""
    return hashlib.sha256(f"{model}@{version}\0{client}\0{sha256}".encode()).hexdigest()


@dataclass(frozen=True)
class StateRecord:
    """What a fitted state is and where it came from; ``signature`` covers every other field."""

    model: str
    version: str
    model_key: str
    client: str
    run_id: str
    sha256: str
    size: int
    format: str
    created_at: str
    signature: str = ""

    @property
    def label(self) -> str:
        return f"{self.model}@{self.version}" + (f" for {self.client}" if self.client else "")

    @property
    def state_id(self) -> str:
        return state_id(self.model, self.version, self.client, self.sha256)

    def payload(self) -> bytes:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "signature"}
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> StateRecord:
        try:
            data = json.loads(text)
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"the record of fitted state {where} is malformed ({exc}): train again") from None


class StateKeeper:
    """Saves and loads fitted states in one store, signing and verifying their records with one key."""

    def __init__(self, store: PexStore, key_path: Path) -> None:
        self.store = store
        self.key_path = key_path
        self._key: bytes | None = None

    def _sign(self, record: StateRecord) -> str:
        if self._key is None:
            self._key = signing_key(self.key_path)
        return hmac.new(self._key, record.payload(), hashlib.sha256).hexdigest()

    def save(self, model: ArtifactRecord, client: str, run_id: str, state: FittedState) -> StateRecord:
        """Publish ``state`` with a signed record; the digest is computed here, never taken from the model."""
        record = StateRecord(
            model=model.name,
            version=model.version,
            model_key=model.key,
            client=client,
            run_id=run_id,
            sha256=hashlib.sha256(state.payload).hexdigest(),
            size=len(state.payload),
            format=state.format,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        record = dataclasses.replace(record, signature=self._sign(record))
        self.store.put_state(model.name, record.state_id, state.payload, record.to_json())
        return record

    def _verified(self, text: str, where: str) -> StateRecord:
        record = StateRecord.from_json(text, where)
        if not hmac.compare_digest(record.signature, self._sign(record)):
            raise IntegrityError(
                f"refusing fitted state {where}: its record's signature does not match, so it was not written by "
                f"this orchestrator (or the signing key {self.key_path} changed); train again"
            )
        return record

    def load(self, model: ArtifactRecord, sha256: str, client: str, payload: bytes | None = None) -> FittedState:
        """A state for ``model`` (and ``client``) after every check; ``payload`` is the bytes a user handed in."""
        where = f"{model.name}/{sha256[:12]}"
        found = self.store.state(model.name, state_id(model.name, model.version, client, sha256))
        if found is None:
            raise IntegrityError(
                f"fitted state {where} has no record in {self.store.url}: train {model.label} again (the CLI keeps "
                "states with --save-state)"
            )
        record = self._verified(found[0], where)
        data = found[1] if payload is None else payload
        actual = hashlib.sha256(data).hexdigest()
        if actual != record.sha256 or record.sha256 != sha256:
            raise IntegrityError(
                f"refusing fitted state {where}: its bytes hash to {actual[:12]}, not {record.sha256[:12]} as its "
                "signed record says; it was altered or replaced. Train again"
            )
        if (record.model, record.version) != (model.name, model.version) or record.client != client:
            raise IntegrityError(
                f"refusing fitted state {where}: it was trained by {record.label}, not {model.label}"
                + (f" for {client}" if client else "")
                + f"; train {model.label} first"
            )
        return FittedState(record.format, data)

    def records(self) -> list[StateRecord]:
        """Every state record that verifies; the others are reported by `invalid_records`."""
        found = []
        for model, text in self.store.state_records():
            try:
                found.append(self._verified(text, model))
            except IntegrityError:
                continue
        return found
