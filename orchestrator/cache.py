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
- The unpacked base: unpacking the base (620 MB of wheels out of a 186 MB zip) and compiling its bytecode took 16-18 s
  of a new host's first run. So the builder publishes it once more, unpacked and compiled: PEX_ROOT's
  ``installed_wheels/`` as a plain tar (`pack_unpacked`), filed under the base's key as an artifact of its own with
  its own sha256 (`orchestrator.store`), without the packages' own test suites (`_test_suites`: 45% of the files,
  which cost the most to create here). A host without the base streams that tar from the store into a private
  folder of PEX_ROOT, extracting it as it arrives with a reader of our own (regular files and folders only, relative
  names that stay inside, each file created new, modes set here) while every byte is hashed, and fetches the base
  and model pex meanwhile; only once the digest matches the record is each wheel renamed into PEX_ROOT
  (`ArtifactCache.base_wheels`). pex then builds a model's venv on those wheels, already compiled; the
  base's own venv is made only when asked for (``modelpex warm``). A store without it (an older one) falls back to
  pex's own unpacking. Uncompressed on purpose: gzip (level 1) cut its 750 MB to 250 MB, but extracting it took 5x
  as long here, and on this machine the bytes are cheaper than the CPU.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from filelock import FileLock

from orchestrator.errors import IntegrityError, ModelpexWarning, RecordError, SandboxError, StoreError
from orchestrator.files import owned_dir, staged, write_atomic
from orchestrator.platforms import Interpreter, check_runs_here
from orchestrator.store import BASE_NAME, COPY_CHUNK, ArtifactRecord, PexStore

__all__ = ["ArtifactCache", "Prepared", "VerifiedCopies", "pack_unpacked", "startup_hooks"]

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
_PEX_INTERNALS = (".bootstrap/", "__pex__/", ".layout.json")
_HOOK_MODULES = ("sitecustomize", "usercustomize")
_PREFIX = "import sys; print(sys.prefix)"
# N.B. What the unpacked base holds: pex's installed wheels, relocatable (relative names, no links out), unlike its
# venvs, whose scripts and pyvenv.cfg name the PEX_ROOT they were made in. pex builds the venv from them in 2 s.
INSTALLED = "installed_wheels"
_PEX_LOCK_SUFFIX = ".atomic_directory.lck"
_WHEEL_DEPTH = 3  # N.B. installed_wheels/<layout version>/<wheel sha256>/<wheel file name>/
_ZIP_INFO = "original-whl-info.json"  # N.B. pex's record of the wheel's zip entries, for re-packing it.
_PLAIN = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE)  # N.B. What the unpacked base holds: nothing else.
_LONGEST_NAME = 4096  # N.B. PATH_MAX: a longer GNU long name is refused, never read into memory.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


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


def _normalised(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """An entry as the unpacked base carries it, whoever packed it: no owner, and a mode from the execute bit."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = int(info.mtime)  # N.B. Whole seconds, as compiled modules record them: no pax header per entry.
    info.mode = 0o755 if info.isdir() or info.mode & 0o100 else 0o644
    return info


# N.B. Folders of packages' own test suites: 45% of the base's files, 15% of its bytes, never imported by the
# libraries they test at run time (`_test_suites` proves that for each one before leaving it out).
TEST_FOLDERS = frozenset({"tests", "test"})
_METADATA_SUFFIXES = (".dist-info", ".pex-info", ".data")
_MENTIONS_TESTS = re.compile(rb"\btests?\b")


def _imported(source: bytes, package: tuple[str, ...]) -> Iterator[str]:
    """Dotted names a module (in ``package``) imports, relative imports resolved, and every string it holds (a name
    passed to ``importlib.import_module``)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        yield from (word.decode() for word in re.findall(rb"[\w.]+", source))  # N.B. Unparseable: every word.
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            anchor = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join((*anchor, *([node.module] if node.module else [])))
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


def _test_suites(wheel: Path) -> set[Path]:
    """A wheel's test-suite folders (named ``tests`` or ``test``, in its packages) that no other module of it names
    in an import or a string: what the unpacked base leaves out."""
    found: dict[str, Path] = {}
    kept: list[Path] = []
    for folder, dirs, files in os.walk(wheel):
        here = Path(folder)
        if here.parent == wheel and here.name.endswith(_METADATA_SUFFIXES):
            dirs.clear()
            continue
        # N.B. Inside a package only: a wheel's top-level ``tests`` would be a package of its own name.
        for name in [d for d in dirs if d in TEST_FOLDERS and here != wheel]:
            dirs.remove(name)
            found[".".join((here / name).relative_to(wheel).parts)] = here / name
        kept += [here / name for name in files if name.endswith(".py")]
    for path in kept:
        source = path.read_bytes()
        if not found or not _MENTIONS_TESTS.search(source):
            continue
        package = path.parent.relative_to(wheel).parts
        for name in _imported(source, package):
            for module in [m for m in found if name == m or name.startswith(f"{m}.")]:
                found.pop(module)
    return set(found.values())


def _listing_without(data: bytes, name: str, dropped: tuple[str, ...]) -> bytes:
    """A wheel's list of its files (its RECORD, or pex's ``original-whl-info.json``) without those under ``dropped``
    (relative folder names ending in ``/``): pex then finds every file it lists, as in any install."""
    if name == _ZIP_INFO:
        info = json.loads(data)
        info["entries"] = [e for e in info["entries"] if not str(e[0]).startswith(dropped)]
        return json.dumps(info, sort_keys=True, separators=(",", ":")).encode()
    lines = data.decode().splitlines(keepends=True)
    return "".join(line for line in lines if not line.lstrip('"').startswith(dropped)).encode()


def _add_file(tar: tarfile.TarFile, path: Path, pex_root: Path) -> None:
    if path.name.endswith(_PEX_LOCK_SUFFIX):
        return  # N.B. pex's own lock files: it makes them again where it needs them.
    if path.is_symlink() or not path.is_file():
        raise SandboxError(f"cannot pack {path}: only regular files and folders go into the unpacked base")
    tar.add(path, arcname=str(path.relative_to(pex_root)), recursive=False, filter=_normalised)


def _add_wheel(tar: tarfile.TarFile, wheel: Path, pex_root: Path) -> list[str]:
    """Add one installed wheel to ``tar``, its test suites left out (`_test_suites`); return those left out."""
    suites = _test_suites(wheel)
    dropped = tuple(f"{suite.relative_to(wheel).as_posix()}/" for suite in suites)
    for folder, dirs, files in os.walk(wheel):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if here / d not in suites)
        tar.add(here, arcname=str(here.relative_to(pex_root)), recursive=False, filter=_normalised)
        for name in sorted(files):
            path = here / name
            if dropped and name in ("RECORD", _ZIP_INFO) and here.parent == wheel:
                data = _listing_without(path.read_bytes(), name, dropped)
                info = _normalised(tar.gettarinfo(path, arcname=str(path.relative_to(pex_root))))
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                _add_file(tar, path, pex_root)
    return sorted(str(suite.relative_to(pex_root / INSTALLED)) for suite in suites)


def pack_unpacked(pex_root: Path, destination: Path) -> list[str]:
    """Tar ``pex_root``'s installed wheels (the base unpacked and compiled) into ``destination``, in a stable order,
    without the packages' own test suites; return the test-suite folders left out.

    N.B. Modification times are kept: a compiled module is used only while its source's mtime is the one it records.
    """
    top = pex_root / INSTALLED
    left_out: list[str] = []
    # N.B. GNU's format: a long name costs one more block, where pax's headers cost a parse per entry (0.8 s of 4).
    with tarfile.open(destination, "w", format=tarfile.GNU_FORMAT) as tar:
        for folder, dirs, files in os.walk(top):
            here = Path(folder)
            if len(here.relative_to(top).parts) == _WHEEL_DEPTH:
                dirs.clear()
                left_out += _add_wheel(tar, here, pex_root)
                continue
            dirs.sort()
            tar.add(here, arcname=str(here.relative_to(pex_root)), recursive=False, filter=_normalised)
            for name in sorted(files):
                _add_file(tar, here / name, pex_root)
    return left_out


def _checked(info: tarfile.TarInfo, record: ArtifactRecord) -> tarfile.TarInfo:
    """An entry of the unpacked base, checked: a regular file or folder under ``installed_wheels/``, whose name cannot
    leave the folder it is extracted into; its owner and mode are set here, not by the archive."""
    parts = info.name.split("/")
    unsafe = info.name.startswith("/") or "\\" in info.name or any(p in ("", ".", "..") for p in parts)
    if unsafe or parts[0] != INSTALLED or info.type not in _PLAIN:
        raise IntegrityError(
            f"refusing {record.label} (key {record.key}, sha256 {record.sha256}): its entry {info.name!r} is not "
            f"a plain file or folder under {INSTALLED}/; rebuild it with `{record.rebuild}`"
        )
    return _normalised(info)


def _read(pipe: BinaryIO, size: int, record: ArtifactRecord) -> bytes:
    """Exactly ``size`` bytes of the archive, or `IntegrityError` if it ends first."""
    data = pipe.read(size)
    if len(data) != size:
        raise IntegrityError(
            f"refusing {record.label} (key {record.key}, sha256 {record.sha256}): it ends inside an entry; rebuild it "
            f"with `{record.rebuild}`"
        )
    return data


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _entries(pipe: BinaryIO, record: ArtifactRecord) -> Iterator[tarfile.TarInfo]:
    """The entries of the tar arriving on ``pipe``, checked (`_checked`), GNU long names applied; the caller reads each
    file's data, padded to whole blocks, before asking for the next entry."""
    long_name: str | None = None
    while (block := _read(pipe, tarfile.BLOCKSIZE, record)) != tarfile.NUL * tarfile.BLOCKSIZE:
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise IntegrityError(
                f"refusing {record.label} (key {record.key}, sha256 {record.sha256}): a header that is not a tar "
                f"header ({exc}); rebuild it with `{record.rebuild}`"
            ) from exc
        if info.type == tarfile.GNUTYPE_LONGNAME and long_name is None and info.size <= _LONGEST_NAME:
            long_name = _read(pipe, _padded(info.size), record)[: info.size].split(b"\0")[0].decode(errors="replace")
            continue
        if long_name is not None:
            info.name, long_name = long_name, None
        if info.type == tarfile.DIRTYPE:
            info.name = info.name.rstrip("/")
        yield _checked(info, record)


def _write(pipe: BinaryIO, target: Path, info: tarfile.TarInfo, record: ArtifactRecord) -> None:
    """Write one file of the archive, as it arrives, to ``target`` (new: never through a link), with its mode and
    modification time."""
    try:
        fd = os.open(target, _NEW_FILE, 0o600)
    except FileNotFoundError:
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)  # N.B. A folder the archive does not list.
        fd = os.open(target, _NEW_FILE, 0o600)
    try:
        if info.size <= COPY_CHUNK:  # N.B. Most files: one read, padding included, and one write.
            _write_all(fd, memoryview(_read(pipe, _padded(info.size), record))[: info.size])
        else:
            remaining = info.size
            while remaining:
                chunk = _read(pipe, min(remaining, COPY_CHUNK), record)
                _write_all(fd, memoryview(chunk))
                remaining -= len(chunk)
            _read(pipe, _padded(info.size) - info.size, record)
        os.fchmod(fd, info.mode)
        os.utime(fd, (info.mtime, info.mtime))
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _extract(pipe: BinaryIO, stage: Path, record: ArtifactRecord) -> None:
    """Extract the tar arriving on ``pipe`` into ``stage``, entry by entry as checked; then read the pipe to its end
    (whatever happened), so that the writer hashes every byte and ends.

    N.B. Our own reader of the two entry types the unpacked base holds, not `tarfile`'s extraction: that one copied
    in 16 KiB pieces and changed each file's owner, mode and time by name (0.6 s of CPU for 6,000 files here).
    Anything else (links, devices, pax headers, sparse files) is refused, and a file is only ever created new.
    """
    try:
        for info in _entries(pipe, record):
            target = stage.joinpath(*info.name.split("/"))
            if info.isdir():
                target.mkdir(mode=0o755, parents=True, exist_ok=True)
                target.chmod(info.mode)
            else:
                _write(pipe, target, info, record)
    finally:
        while pipe.read(COPY_CHUNK):
            pass


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
        """Compile the venv's bytecode now, as its owner: model processes cannot write it later.

        N.B. In parallel (``-j 0``) only when nothing was compiled before (a base pex unpacked here): compileall starts
        a pool of processes, through a fork server, for each folder it is given, which took 0.7-2 s for the forty
        small folders of a model's venv on the base's compiled wheels, against 0.07 s in one process.
        """
        targets = sorted(set(_site_entries(venv)) - skip)
        if targets:
            jobs = "1" if skip else "0"
            subprocess.run(
                [str(venv / "bin" / "python"), "-I", "-m", "compileall", "-q", "-j", jobs, *map(str, targets)],
                capture_output=True,
                umask=0o022,
                check=False,
            )

    def _unpacked_record(self, store: PexStore, base: ArtifactRecord) -> ArtifactRecord | None:
        """The store's unpacked form of exactly ``base``, or ``None`` (an older store, or one we cannot trust)."""
        try:
            record = store.record("unpacked", BASE_NAME, base.key)
        except RecordError as exc:
            warnings.warn(f"unpacking the base itself: {exc}", ModelpexWarning, stacklevel=3)
            return None
        if record is None or record.details.get("base_sha256") != base.sha256:
            return None  # N.B. Made from other bytes under this key (a forced rebuild): the pex itself is the truth.
        return record

    def _extract_verified(self, store: PexStore, record: ArtifactRecord, stage: Path) -> None:
        """Stream the unpacked base from the store into ``stage`` (private), extracting it as it arrives; raise
        `IntegrityError` when its bytes, all of them hashed on the way, are not the recorded ones.

        N.B. Streamed, not downloaded first: writing 750 MB to a file and reading it back cost 2-3 s of a 5 s
        install here. Nothing in ``stage`` is used before the digest is checked, and only we can write it.
        """
        reader, writer = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(writer, _F_SETPIPE_SZ, COPY_CHUNK)  # N.B. Linux: a megabyte in flight, not 64 KiB.
        failed: list[BaseException] = []

        def extract() -> None:
            try:
                with open(reader, "rb") as pipe:
                    _extract(pipe, stage, record)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, after the digest's verdict
                failed.append(exc)

        thread = threading.Thread(target=extract, name="modelpex-unpacked", daemon=True)
        thread.start()
        try:
            with open(writer, "wb") as sink:
                store.stream(record, sink)
        finally:
            thread.join()
        if failed:
            error = failed[0]
            if isinstance(error, IntegrityError):
                raise error
            raise SandboxError(
                f"cannot install {record.label} (key {record.key}, sha256 {record.sha256}) into {self.pex_root}: "
                f"{error}; free space there, or rebuild it with `{record.rebuild}`"
            ) from error

    def _install_unpacked(self, store: PexStore, record: ArtifactRecord) -> list[Path]:
        """Fetch the unpacked base, verified, into a private folder and rename its wheels into PEX_ROOT; return them.

        N.B. Each wheel appears by one rename, whole, as pex's own installs do (pex takes an existing folder as
        finished): a wheel already there (pex, or another host's orchestrator on a shared PEX_ROOT) is kept.
        """
        installed = self.pex_root / INSTALLED
        owned_dir(installed, 0o755)
        # N.B. Private (mode 0700), and on PEX_ROOT's file system so that a rename puts each wheel in place.
        with tempfile.TemporaryDirectory(dir=self.pex_root, prefix=".unpacking-") as tmp:
            stage = Path(tmp)
            self._extract_verified(store, record, stage)
            wheels = []
            for wheel in sorted((stage / INSTALLED).glob("*/*/*")):
                if not wheel.is_dir():
                    continue
                target = installed / wheel.relative_to(stage / INSTALLED)
                for folder in (target.parent.parent, target.parent):
                    folder.mkdir(mode=0o755, exist_ok=True)
                try:
                    os.rename(wheel, target)
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.is_dir():
                        raise
                wheels.append(target)
        return wheels

    def _ready(self, target: ArtifactRecord) -> Path | None:
        """The venv made for ``target`` here before, when its record of it is ours and it is still there."""
        ready = self.artifacts / f"{target.sha256}.ready"
        if ready.is_file() and _private(ready):
            # N.B. Resolved: pex reports a venv by its short symlink (venvs/<v>/s/<hash>/venv, mode 0777 as every
            # link is), which is never "private" itself; its target is what must be ours. Unresolved, no venv was
            # ever found ready, and every model start made it and compiled it again (2-3 s per `modelpex run`).
            venv = Path(ready.read_text()).resolve()
            if venv.is_relative_to(self.pex_root.resolve()) and (venv / "bin" / "python").exists() and _private(venv):
                return venv
        return None

    def _installed(self, memo: Path) -> list[Path] | None:
        """The wheels an earlier install of the unpacked base put in PEX_ROOT (its memo is ours), or ``None``."""
        try:
            names = json.loads(memo.read_text()) if memo.is_file() and _private(memo) else None
        except ValueError:
            return None
        if not isinstance(names, list) or not all(isinstance(n, str) and ".." not in n.split("/") for n in names):
            return None
        wheels = [self.pex_root / INSTALLED / name for name in names]
        return wheels if all(wheel.is_dir() for wheel in wheels) else None

    def base_wheels(self, store: PexStore, base: ArtifactRecord) -> list[Path] | None:
        """The base's wheels in PEX_ROOT, compiled, from its unpacked artifact (installed once); ``None`` when the
        store has none, or pex has unpacked the base here already (then its venv is the one to build on)."""
        memo = self.artifacts / f"{base.sha256}.wheels"
        if (wheels := self._installed(memo)) is not None:
            return wheels
        if self._ready(base) is not None or (record := self._unpacked_record(store, base)) is None:
            return None
        with self._lock(f"wheels-{base.sha256}"):
            if (wheels := self._installed(memo)) is not None:
                return wheels  # N.B. Another process installed them while we waited.
            wheels = self._install_unpacked(store, record)
            write_atomic(memo, json.dumps([str(w.relative_to(self.pex_root / INSTALLED)) for w in wheels]))
        return wheels

    def _wheels_while_fetching(
        self, store: PexStore, base: ArtifactRecord, model: ArtifactRecord | None
    ) -> list[Path] | None:
        """`base_wheels`, while the verified copies of the base and the model are fetched beside it.

        N.B. A new host's download of both (0.6 s here) then overlaps the stream of the unpacked base, which waits on
        the disk more than on the network; each is still verified before any use (`VerifiedCopies.get`).
        """
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelpex-fetch") as pool:
            fetched = [pool.submit(self.artifact, store, record) for record in (base, model) if record is not None]
            wheels = self.base_wheels(store, base)
            for future in fetched:
                future.result()
        return wheels

    def warm(
        self, store: PexStore, base: ArtifactRecord, model: ArtifactRecord | None = None, *, unpacked: bool = True
    ) -> Path:
        """The venv of ``model`` (or of the base alone), created and compiled once; returns its prefix.

        ``unpacked``: take the base's wheels from its unpacked artifact when the store has one (the builder, which
        makes that artifact, unpacks the pex itself). Then a model's venv is built on those wheels directly: the
        base's own venv (2-3 s more) is made only when asked for (``modelpex warm``, an image).
        """
        target = model or base
        check_runs_here(base, target, self.interpreter)
        if (venv := self._ready(target)) is not None:
            return venv
        wheels = self._wheels_while_fetching(store, base, model) if unpacked else None
        base_venv = None if model is None or wheels is not None else self.warm(store, base, unpacked=unpacked)
        with self._lock(f"warm-{target.sha256}"), tempfile.TemporaryDirectory(prefix="modelpex-warm-") as tmp:
            if (venv := self._ready(target)) is not None:
                return venv  # N.B. Another process made it while we waited.
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
            done = set() if base_venv is None else set(_site_entries(base_venv))
            # N.B. The unpacked base was compiled before it was packed.
            done |= {e for e in _site_entries(venv) if any(e.is_relative_to(wheel) for wheel in wheels or ())}
            self._compile(venv, done)
            venv = venv.resolve()
            write_atomic(self.artifacts / f"{target.sha256}.ready", str(venv))
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
