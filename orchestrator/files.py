"""Files: every file modelpex writes appears whole or not at all.

Written beside its destination under a temporary name, flushed to disk, then renamed over it (a rename within one
file system is atomic): a crash, a kill or a full disk leaves the old file or none, never half of a new one. A file
whose readers stop trusting it after a crash anyway (a verified copy in the cache, `orchestrator.cache`) is written
without the flush (``durable=False``): the rename alone makes it appear whole to every process until the next boot.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.errors import ModelpexError

__all__ = ["owned_dir", "staged", "write_atomic"]


def owned_dir(path: Path, mode: int) -> Path:
    """A directory owned by this user with exactly ``mode``; refuse one that someone else could have planted."""
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise ModelpexError(
            f"{path} is not a directory owned by uid {os.geteuid()} (owner {info.st_uid}): remove it, or point "
            "MODELPEX_CACHE (or MODELPEX_PEX_ROOT) elsewhere"
        )
    if stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)
    return path


@contextmanager
def staged(path: Path, mode: int | None = None, *, durable: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed over ``path`` when the block succeeds, removed if not.

    ``durable``: flushed to disk before the rename, so that a crash cannot leave a torn file under ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        if durable:
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except OSError as exc:
        raise ModelpexError(f"cannot write {path}: {exc.strerror or exc}; nothing was written there") from None
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes, mode: int | None = None, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` whole or not at all (``durable``: see `staged`)."""
    with staged(path, mode, durable=durable) as temporary:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)
