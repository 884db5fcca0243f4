"""Removal: delete any tree a model (or a killed build) can leave, without recursion and without following links.

A model writes what it likes into its private folder: a folder 100,000 deep, a million entries in one folder,
symlinks to anything on the host, names that are not UTF-8, folders it made read-only. `shutil.rmtree` recurses
(a deep tree ends it with RecursionError) and builds paths longer than PATH_MAX; `remove_tree` instead walks with
one open directory at a time, descending with ``openat(name, O_NOFOLLOW)`` and climbing back with ``..`` checked
against the device and inode it came from, so the depth costs memory for one name per level and nothing else. A
symlink is unlinked, never followed: its target stays untouched wherever it is. A folder it cannot list or empty
is given mode 0700 first (it is ours to remove).

A failure is one `RemovalError` naming the tree and the cause; `sweep_each` runs a list of sweeps so that one that
fails is reported in one line and the others still run (`modelpex gc`).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from orchestrator.errors import ModelpexError

__all__ = ["RemovalError", "remove_tree", "sweep_each"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class RemovalError(ModelpexError):
    """A tree could not be removed whole; the message names it and why."""


def _open_dir(name: str | bytes, dir_fd: int) -> int:
    """``name`` under ``dir_fd`` opened as a directory, never through a symlink; mode 0700 first if it refuses us."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        # N.B. chmod cannot refuse to follow a link, but the caller saw a directory here (no link) a moment ago,
        # and O_NOFOLLOW below re-checks it.
        os.chmod(name, 0o700, dir_fd=dir_fd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    info = os.fstat(fd)
    if stat.S_IMODE(info.st_mode) & 0o700 != 0o700:
        try:
            os.fchmod(fd, 0o700)  # N.B. Entries of a read-only folder cannot be unlinked (root excepted).
        except PermissionError:
            pass  # N.B. Not ours (a model uid's, and we are root): root needs no mode to empty it.
    return fd


def _first_subdir(fd: int) -> bytes | None:
    """Unlink every non-directory in the folder ``fd``; the name of one sub-folder left, or None when it is empty."""
    with os.scandir(fd) as entries:
        for entry in entries:
            name = os.fsencode(entry.name)
            if entry.is_dir(follow_symlinks=False):
                return name
            try:
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                pass
    return None


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _empty(top: int) -> None:
    """Remove everything inside the open folder ``top``, depth first, one open folder at a time."""
    fd, names, seen = top, [], [_identity(top)]
    try:
        while True:
            child = _first_subdir(fd)
            if child is not None:
                inner = _open_dir(child, fd)
                if fd != top:
                    os.close(fd)
                fd = inner
                names.append(child)
                seen.append(_identity(fd))
                continue
            if not names:
                return
            if len(names) == 1:
                parent = top
            else:
                parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
                if _identity(parent) != seen[-2]:
                    os.close(parent)
                    raise OSError(errno.ESTALE, "a folder was moved while it was being removed")
            os.close(fd)
            fd = parent
            seen.pop()
            try:
                os.rmdir(names.pop(), dir_fd=fd)
            except FileNotFoundError:
                pass
    finally:
        if fd != top:
            os.close(fd)


def remove_tree(path: Path | str) -> None:
    """Remove ``path`` and everything under it (a file or a symlink is unlinked); gone already is fine."""
    path = Path(path)
    try:
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode):
            path.unlink()
            return
        parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            top = _open_dir(path.name, parent)
            try:
                _empty(top)
            finally:
                os.close(top)
            os.rmdir(path.name, dir_fd=parent)
        finally:
            os.close(parent)
    except FileNotFoundError:
        return
    except OSError as exc:
        where = f" at {os.fsdecode(exc.filename)}" if exc.filename else ""
        raise RemovalError(f"cannot remove {path}{where}: {exc.strerror or exc}; remove it by hand") from None


def sweep_each(sweeps: Iterable[tuple[str, Callable[[], object]]], report: Callable[[str], None]) -> int:
    """Run every sweep; one that fails is reported in one line (``report``) and the rest still run. The failures."""
    failures = 0
    for what, sweep in sweeps:
        try:
            sweep()
        except (OSError, ModelpexError) as exc:
            failures += 1
            report(f"could not {what}: {exc}")
    return failures
