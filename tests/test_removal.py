"""Removal: the trees a hostile model can leave (100,000 deep, a million entries, symlinks out, odd names, read-only
folders) are removed by cleanup and by `modelpex gc`, and a tree that cannot be removed is one line while gc's other
sweeps still run.

N.B. The big trees are made on a tmpfs (/dev/shm): on this machine's shared disk a million file creations take many
minutes, on tmpfs about a minute under load, and the code under test does not care which file system it walks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.leases import lease_dir, sweep
from orchestrator.removal import RemovalError, remove_tree

from .conftest import CliResult

ODD_NAMES = [b"-rf", b" spaced ", b"new\nline", b"\xff\xfe not utf-8", b"...", b"*", b"a" * 253]


@pytest.fixture
def ram_dir() -> Iterator[Path]:
    """A folder on tmpfs, removed afterwards whatever the test left (`rm -rf`, which does not recurse in Python)."""
    folder = Path(tempfile.mkdtemp(prefix="modelpex-test-removal-", dir="/dev/shm"))
    yield folder
    subprocess.run(["chmod", "-R", "u+rwx", str(folder)], check=False, capture_output=True)
    subprocess.run(["rm", "-rf", str(folder)], check=False)


def _deep(root: Path, depth: int, every: int = 1000) -> None:
    """``depth`` nested folders under ``root`` (one descriptor at a time: the path is far beyond PATH_MAX), with a
    file every ``every`` levels and a read-only folder every ``every`` levels."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            if level % every == 0:
                os.mknod("f", dir_fd=inner)
                os.fchmod(inner, 0o500)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)


def _wide(root: Path, count: int) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    mknod = os.mknod
    try:
        for index in range(count):
            mknod(str(index), dir_fd=fd)
    finally:
        os.close(fd)


def _outside(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A folder outside the tree that symlinks point into; its files must survive."""
    target = tmp_path / "outside"
    target.mkdir()
    (target / "keep.txt").write_bytes(b"not the model's")
    (target / "sub").mkdir()
    (target / "sub" / "deeper.txt").write_bytes(b"nor this")
    return target, {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()}


def _hostile_tree(root: Path, outside: Path) -> None:
    """Odd names, read-only folders and files, symlinks to a folder and a file outside and to itself."""
    for name in ODD_NAMES:
        os.mknod(os.path.join(os.fsencode(root), name))
        os.mkdir(os.path.join(os.fsencode(root), name + b".d"))
    (root / "ro").mkdir()
    (root / "ro" / "file").write_text("x")
    (root / "ro" / "file").chmod(0)
    (root / "ro" / "closed").mkdir()
    (root / "ro" / "closed" / "inside").write_text("x")
    (root / "ro" / "closed").chmod(0)
    (root / "ro").chmod(0o500)
    (root / "to_dir").symlink_to(outside)
    (root / "to_file").symlink_to(outside / "keep.txt")
    (root / "loop").symlink_to(root)
    os.mkfifo(root / "fifo")


def test_a_deep_tree_with_read_only_folders_is_removed(ram_dir: Path) -> None:
    tree = ram_dir / "deep"
    tree.mkdir()
    _deep(tree, 100_000)
    remove_tree(tree)
    assert not tree.exists()


def test_a_million_entries_are_removed(ram_dir: Path) -> None:
    tree = ram_dir / "wide"
    tree.mkdir()
    _wide(tree, 1_000_000)
    (tree / "sub").mkdir()
    _wide(tree / "sub", 1000)
    remove_tree(tree)
    assert not tree.exists()


def test_symlinks_odd_names_and_modes_outside_untouched(ram_dir: Path, tmp_path: Path) -> None:
    outside, before = _outside(tmp_path)
    tree = ram_dir / "hostile"
    tree.mkdir()
    _hostile_tree(tree, outside)
    remove_tree(tree)
    assert not tree.exists() and not tree.is_symlink()
    after = {str(p.relative_to(outside)): p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    assert after == before, "a symlink's target was touched"


def test_a_symlink_given_as_the_tree_is_unlinked_not_followed(tmp_path: Path) -> None:
    outside, before = _outside(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(outside)
    remove_tree(link)
    assert not link.is_symlink() and (outside / "keep.txt").read_bytes() == before["keep.txt"]
    remove_tree(tmp_path / "never-was")  # N.B. Gone already is fine.


def _immutable(path: Path) -> Callable[[], None]:
    """Make ``path`` immutable (`chattr +i`: not even root may unlink it); the undo. Skips where it cannot."""
    if os.geteuid() != 0 or not shutil.which("chattr"):
        pytest.skip("an immutable file needs root and chattr (e2fsprogs)")
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this file system has no immutable flag: {done.stderr.strip()}")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_tree_that_cannot_be_removed_is_one_line_and_the_sweep_goes_on(tmp_path: Path, ram_dir: Path) -> None:
    stuck = tmp_path / "run-0-stuck"
    stuck.mkdir()
    (stuck / "pinned").write_text("immutable")
    undo = _immutable(stuck / "pinned")
    try:
        with pytest.raises(RemovalError, match=r"^cannot remove .*run-0-stuck at pinned: Operation not permitted"):
            remove_tree(stuck)
        deep = tmp_path / "run-1-deep"
        deep.mkdir()
        _deep(deep, 3000)
        reported: list[str] = []
        removed = sweep(tmp_path, "run-", 0, report=reported.append)
        assert removed == [deep] and not deep.exists()
        assert stuck.exists() and len(reported) == 1 and "\n" not in reported[0]
    finally:
        undo()


def test_a_private_folder_is_removed_whatever_it_holds(ram_dir: Path, tmp_path: Path) -> None:
    outside, before = _outside(tmp_path)
    with lease_dir(ram_dir, "run-") as folder:
        _deep(folder, 20_000)
        _hostile_tree(folder, outside)
    assert os.listdir(ram_dir) == [], "the folder and its lock file are gone"
    assert {str(p.relative_to(outside)): p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before


def test_gc_removes_deep_and_wide_trees_and_reports_what_it_cannot(
    cli: Callable[..., CliResult], ram_dir: Path, tmp_path: Path, store: object
) -> None:
    """Dead runs' folders (deep, wide, hostile) go; a build folder holding an immutable file is one warning, and the
    runs are still swept; gc then exits non-zero saying how many it could not remove."""
    outside, before = _outside(tmp_path)
    cache = ram_dir / "cache"
    runs = cache / "runs"
    runs.mkdir(parents=True)
    trees = [runs / "run-0-deep", runs / "run-0-wide", runs / "run-0-hostile"]
    for tree in trees:
        tree.mkdir()
    _deep(trees[0], 100_000)
    _wide(trees[1], 100_000)
    _hostile_tree(trees[2], outside)
    work = Path(store.root) / "work"  # type: ignore[attr-defined]
    work.mkdir(exist_ok=True)
    stuck = work / "build-0-stuck"
    stuck.mkdir()
    (stuck / "pinned").write_text("immutable")
    undo = _immutable(stuck / "pinned")
    old = time.time() - 7200
    for tree in [*trees, stuck]:
        os.utime(tree, (old, old))
    try:
        done = cli("gc", env={"MODELPEX_CACHE": str(cache), "MODELPEX_GC_GRACE": "60"}, timeout=600)
    finally:
        undo()
    assert done.returncode == 1, done.stderr
    assert not any(tree.exists() for tree in trees), done.stderr
    assert stuck.exists()
    lines = [line for line in done.stderr.splitlines() if "build-0-stuck" in line]
    assert len(lines) == 1 and "Operation not permitted" in lines[0], done.stderr
    assert "gc could not remove 1 thing(s)" in done.stderr
    assert "Traceback" not in done.stderr
    assert {str(p.relative_to(outside)): p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before
