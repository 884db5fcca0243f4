"""Cache: verified copies of artifacts on this machine and their unpacked venvs, all a model process ever runs.

- Artifacts (`VerifiedCopies`): each one fetched from the store is copied, or downloaded from an object store, to
  ``<cache>/artifacts/<sha256>.pex`` (owned by the orchestrator, read-only) and hashed on the way, once per machine:
  concurrent fetches of one artifact wait on a per-digest file lock, and a copy appears by rename only once it is
  whole and verified. A copy is trusted again without re-hashing only while its inode, size, mtime and ctime are
  those recorded beside it when it was hashed, and only during the boot that hashed it: nobody can set a ctime back,
  so any change to the file forces a new hash. This takes hashing (and downloading) a 186 MB base off every call. A
  remote store fetches into the same folder (`orchestrator.s3store`), so a worker downloads each artifact once,
  whoever asks first.
- Durability: a copy is not flushed to disk before its rename (flushing the base took 0.05-0.1 s here, a fifth of
  its download from S3, and up to 0.4 s on a busy disk). It needs no flush: within one boot every process reads the
  bytes that were hashed, and after a crash (a new boot id) no copy is trusted until it is fetched and hashed again,
  so a copy the crash tore never runs. Where the kernel has no boot id, copies are flushed as before.
- Platforms: an artifact whose base was built for another platform than this interpreter's is refused before any
  of it is copied here (`orchestrator.platforms.check_runs_here`).
- Venvs: ``PEX_ROOT`` (``<cache>/pex_root`` by default) belongs to the orchestrator and is read-only to model
  processes, so a model cannot edit the code a later run executes. The orchestrator creates a model version's venv
  itself without running the model's code: a model pex carrying a startup hook (a ``.pth`` file or a
  ``sitecustomize`` module, which Python runs on start) is refused, and the venv is created by asking pex's own
  bootstrap for the venv's location. Bytecode is compiled once, then, so model processes never need to write it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from orchestrator.errors import SandboxError, StoreError
from orchestrator.files import owned_dir, staged, write_atomic
from orchestrator.platforms import Interpreter, check_runs_here
from orchestrator.store import ArtifactRecord, PexStore

__all__ = ["ArtifactCache", "Prepared", "VerifiedCopies", "startup_hooks"]

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
_PEX_INTERNALS = (".bootstrap/", "__pex__/", ".layout.json")
_HOOK_MODULES = ("sitecustomize", "usercustomize")
_PREFIX = "import sys; print(sys.prefix)"


@dataclass(frozen=True)
class Prepared:
    """A model version ready to start: its verified record, the venv interpreter, and what the pex declares."""

    record: ArtifactRecord
    python: Path
    entry: dict[str, Any]
    pex_root: Path  # N.B. The venv's wheels are links into it: the process must see all of it.

    @property
    def label(self) -> str:
        return self.record.label

    @property
    def reuse(self) -> bool:
        """A model that keeps data between calls declares ``reuse = false`` and gets a process per call."""
        return bool(self.entry.get("reuse", True))


def startup_hooks(names: list[str]) -> list[str]:
    """Entries of a model pex that Python would execute at start-up: ``.pth`` files and customize modules."""
    hooks = []
    for name in names:
        if name.startswith(_PEX_INTERNALS) or name.endswith("/"):
            continue
        parts = name.split("/")
        # N.B. Top level of the user code, or of a dependency's chroot (.deps/<wheel>/...): both land in site-packages.
        top = parts[2:] if parts[0] == ".deps" else parts
        if not top:
            continue
        if top[-1].endswith(".pth") or top[0].removesuffix(".py") in _HOOK_MODULES:
            hooks.append(name)
    return hooks


def _site_entries(venv: Path) -> list[Path]:
    """What a venv's site-packages holds, symlinks into PEX_ROOT's installed wheels resolved."""
    site = next(venv.glob("lib/python*/site-packages"))
    return [entry.resolve() for entry in site.iterdir()]


def _boot_id() -> str | None:
    """This boot's identity (Linux), or ``None`` where the kernel does not give one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


BOOT_ID = _boot_id()
# N.B. Trust in a copy ends with the boot that hashed it: its bytes need no flush to disk, unless there is no boot id.
_DURABLE = BOOT_ID is None


def _signature(path: Path) -> dict[str, int | str | None]:
    info = path.lstat()
    return {
        "dev": info.st_dev,
        "ino": info.st_ino,
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "ctime_ns": info.st_ctime_ns,
        "boot": BOOT_ID,
    }


def _private(path: Path) -> bool:
    """Owned by this user and writable by nobody else: a file only this orchestrator could have changed."""
    info = path.lstat()
    return info.st_uid == os.geteuid() and not info.st_mode & 0o022


class VerifiedCopies:
    """``<cache>/artifacts``: verified copies of artifacts by sha256, each fetched once per machine."""

    def __init__(self, root: Path) -> None:
        self.artifacts = root / "artifacts"
        self._locks = root / "locks"
        # N.B. Ours alone to write: what model processes read from here was verified by us.
        for folder, mode in ((self.artifacts, 0o755), (self._locks, 0o700)):
            owned_dir(folder, mode)
        self._verified: dict[str, dict[str, int | str | None]] = {}

    def lock(self, name: str) -> FileLock:
        return FileLock(self._locks / f"{name}.lock")

    def path(self, record: ArtifactRecord) -> Path:
        return self.artifacts / f"{record.sha256}.pex"

    def _memo(self, record: ArtifactRecord) -> Path:
        return self.artifacts / f"{record.sha256}.verified"

    def _trusted(self, record: ArtifactRecord) -> bool:
        path, memo = self.path(record), self._memo(record)
        try:
            if self._verified.get(record.sha256) == _signature(path):
                return True
            if not (_private(path) and _private(memo)):
                return False
            return json.loads(memo.read_text()) == _signature(path)
        except (OSError, ValueError):
            return False

    def _vouch(self, record: ArtifactRecord) -> None:
        signature = _signature(self.path(record))
        # N.B. Written after the copy it vouches for.
        write_atomic(self._memo(record), json.dumps(signature), durable=_DURABLE)
        self._verified[record.sha256] = signature

    def get(self, store: PexStore, record: ArtifactRecord) -> Path:
        """The artifact's verified local copy: fetched from the store and hashed only when it is not already here."""
        if not record.sha256:
            raise StoreError(f"{record.label} (key {record.key}) has no sha256 in the index: rebuild it")
        path = self.path(record)
        if self._trusted(record):
            return path
        with self.lock(record.sha256):
            if self._trusted(record):
                return path  # N.B. Another process fetched it while we waited.
            with staged(path, mode=0o444, durable=_DURABLE) as copy:
                store.download(record, copy)  # N.B. Hashed as it is written; a copy that differs is never renamed.
            self._vouch(record)
        return path

    def adopt(self, record: ArtifactRecord, source: Path) -> Path:
        """Take ``source``, whose bytes were just hashed as ``record``'s (an upload), as the verified copy.

        N.B. Only for a file that nobody else can write (a build folder of ours): it saves downloading back what
        this machine has just uploaded. A hard link when it can be, a copy otherwise.
        """
        path = self.path(record)
        with self.lock(record.sha256):
            if self._trusted(record):
                return path
            with staged(path, mode=0o444, durable=_DURABLE) as copy:
                copy.unlink()
                try:
                    os.link(source, copy)
                except OSError:
                    shutil.copyfile(source, copy)
            self._vouch(record)
        return path


class ArtifactCache:
    """Verified local copies of artifacts, and the venvs model processes run in."""

    def __init__(self, root: Path, pex_root: Path, interpreter: Interpreter) -> None:
        self.root = root
        self.pex_root = pex_root
        self.interpreter = interpreter
        self.copies = VerifiedCopies(root)
        self.artifacts = self.copies.artifacts
        owned_dir(pex_root, 0o755)
        self._prepared: dict[str, Prepared] = {}

    def _lock(self, name: str) -> FileLock:
        return self.copies.lock(name)

    def path(self, record: ArtifactRecord) -> Path:
        return self.copies.path(record)

    def artifact(self, store: PexStore, record: ArtifactRecord) -> Path:
        """The artifact's verified local copy (see `VerifiedCopies.get`)."""
        return self.copies.get(store, record)

    def _venv(self, pex: Path, workdir: Path) -> Path:
        """Create (or find) the venv of ``pex`` under PEX_ROOT through pex's own bootstrap; return its prefix."""
        env = {"PATH": SYSTEM_PATH, "PEX_ROOT": str(self.pex_root), "PEX_INTERPRETER": "1", "HOME": str(workdir)}
        done = subprocess.run(
            [self.interpreter.path, str(pex), "-c", _PREFIX],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            umask=0o022,  # N.B. Readable by model processes, whatever this process's own umask.
            check=False,
        )
        if done.returncode != 0:
            raise SandboxError(f"unpacking {pex.name} into {self.pex_root} failed:\n{done.stderr.strip()[-2000:]}")
        return Path(done.stdout.strip().splitlines()[-1])

    def _compile(self, venv: Path, skip: set[Path]) -> None:
        """Compile the venv's bytecode now, as its owner: model processes cannot write it later."""
        targets = sorted(set(_site_entries(venv)) - skip)
        if targets:
            subprocess.run(
                [str(venv / "bin" / "python"), "-I", "-m", "compileall", "-q", "-j", "0", *map(str, targets)],
                capture_output=True,
                umask=0o022,
                check=False,
            )

    def warm(self, store: PexStore, base: ArtifactRecord, model: ArtifactRecord | None = None) -> Path:
        """The venv of ``model`` (or of the base alone), created and compiled once; returns its prefix."""
        target = model or base
        check_runs_here(base, target, self.interpreter)
        ready = self.artifacts / f"{target.sha256}.ready"
        if ready.is_file() and _private(ready):
            venv = Path(ready.read_text())
            if venv.is_relative_to(self.pex_root) and (venv / "bin" / "python").exists() and _private(venv):
                return venv
        base_venv = None if model is None else self.warm(store, base)
        with self._lock(f"warm-{target.sha256}"), tempfile.TemporaryDirectory(prefix="modelpex-warm-") as tmp:
            workdir = Path(tmp)
            base_path = self.artifact(store, base)
            (workdir / base.filename).symlink_to(base_path)
            pex = base_path
            if model is not None:
                pex = self.artifact(store, model)
                with zipfile.ZipFile(pex) as archive:
                    hooks = startup_hooks(archive.namelist())
                if hooks:
                    raise SandboxError(
                        f"refusing to run {model.label}: its pex carries start-up hooks that Python would execute "
                        f"before any check ({', '.join(hooks[:5])}); remove them from the model or its dependencies"
                    )
            venv = self._venv(pex, workdir)
            self._compile(venv, set() if base_venv is None else set(_site_entries(base_venv)))
            write_atomic(ready, str(venv))
        return venv

    def prepare(self, store: PexStore, model: ArtifactRecord, base: ArtifactRecord) -> Prepared:
        """Everything a model process needs, verified: its venv interpreter and the entry its pex declares."""
        if (known := self._prepared.get(model.sha256)) is not None:
            return known
        venv = self.warm(store, base, model)
        with zipfile.ZipFile(self.artifact(store, model)) as archive:
            info = json.loads(archive.read("PEX-INFO"))
        try:
            entry = json.loads(info["inject_env"]["MODELPEX_MODEL"])
        except (KeyError, ValueError):
            raise SandboxError(f"{model.label}: its pex declares no MODELPEX_MODEL: rebuild it") from None
        prepared = self._prepared[model.sha256] = Prepared(model, venv / "bin" / "python", entry, self.pex_root)
        return prepared
