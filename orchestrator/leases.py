"""Leases: folders owned by a live process, proven by an flock on a file beside each one.

A model process's private folder and a build's work folder are each leased this way. The lock is the kernel's, so it
is released the moment its holder dies, kill -9 included, and it means the same thing from every PID namespace that
shares the folder (another container on the same volume), where a pid would not. `sweep` removes only what it can
lock, and only after a grace period.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.removal import RemovalError, remove_tree

__all__ = ["lease_dir", "sweep", "try_lock"]

LOCK_SUFFIX = ".lock"
log = logging.getLogger("modelpex")


def try_lock(path: Path) -> int | None:
    """An exclusive flock on ``path`` (created if missing), held by the returned descriptor; None if held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def lease_dir(parent: Path, prefix: str, mode: int = 0o700) -> Iterator[Path]:
    """A new folder under ``parent``, locked while the block runs, then removed with its lock.

    N.B. A folder that cannot be removed keeps its lock file (the lock itself ends with us): `sweep` tries again."""
    name = f"{prefix}{int(time.time())}-{secrets.token_hex(6)}"
    lock_path = parent / f"{name}{LOCK_SUFFIX}"
    fd = try_lock(lock_path)
    assert fd is not None, "a fresh lock file cannot be held by anyone else"
    folder = parent / name
    try:
        folder.mkdir(mode=mode)
        yield folder
    finally:
        try:
            remove_tree(folder)
            lock_path.unlink(missing_ok=True)
        except RemovalError as exc:
            log.warning(f"{exc}; `modelpex gc` tries again")
        finally:
            os.close(fd)


def sweep(
    parent: Path,
    prefix: str,
    grace_seconds: float,
    *,
    dry_run: bool = False,
    report: Callable[[str], None] = log.warning,
) -> list[Path]:
    """Remove leased folders under ``parent`` whose holder is gone and that are older than ``grace_seconds``; one
    that cannot be removed is reported in one line (``report``) and kept with its lock file, and the rest go on."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    cutoff = time.time() - grace_seconds
    for entry in sorted(parent.glob(f"{prefix}*")):
        folder = entry.with_suffix("") if entry.suffix == LOCK_SUFFIX else entry
        if entry.suffix == LOCK_SUFFIX and folder.exists():
            continue  # N.B. Judged with its folder.
        lock_path = folder.with_name(folder.name + LOCK_SUFFIX)
        try:
            if entry.lstat().st_mtime > cutoff:
                continue
        except FileNotFoundError:
            continue
        fd = try_lock(lock_path)
        if fd is None:
            continue  # N.B. Its holder is alive, perhaps in another container sharing this folder.
        try:
            if not dry_run:
                remove_tree(folder)
                lock_path.unlink(missing_ok=True)
            removed.append(folder)
        except RemovalError as exc:
            report(str(exc))
        finally:
            os.close(fd)
    return removed
