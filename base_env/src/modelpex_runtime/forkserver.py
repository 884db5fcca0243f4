"""Fork server: one warm process per model version that forks a fresh child per client, which serves that client.

The server is what ``python -m modelpex_runtime`` becomes. Before it has seen any client's data it:
- takes a user namespace of its own (the same uid inside and out), so that each child can mount places of its own;
- makes itself not dumpable, so that no other process of its uid (a child) can ptrace it or read its /proc files;
- imports the base libraries the model's source names (found with `ast`, never by importing the model), with the
  settings that keep them from starting threads (a forked child has only the thread that forked it).
Then it forks one child per request of the orchestrator. A child, before it imports the model:
- mounts fresh tmpfs over /tmp, /var/tmp, /dev/shm and its working folder (and /run in a bubblewrap sandbox), in a
  mount namespace of its own, so that what it writes there is seen by no sibling and vanishes with it (what it
  needs to read there is bound back in), and takes IPC (and, sandboxed, network) namespaces of its own;
- drops every capability (no_new_privs), stays not dumpable, and becomes the subreaper of whatever it starts, so
  that after every call every process it started can be found and ended.
The model is imported in the child, so what a model keeps in its modules lives and dies with one client's child.
"""

from __future__ import annotations

import ast
import ctypes
import importlib
import importlib.metadata
import importlib.util
import os
import re
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from modelpex_runtime.channel import Channel, ChannelClosed
from modelpex_runtime.containment import apply_limits
from modelpex_runtime.protocol import CallError

__all__ = [
    "PRIVATE_PLACES",
    "THREADLESS_ENV",
    "base_modules",
    "end_descendants",
    "named_base_imports",
    "serve_forks",
    "thread_count",
]

# N.B. What keeps the base libraries from starting threads at import: OpenBLAS (numpy) starts its pool at import,
# the jemalloc of pyarrow and of polars a background thread. A thread of the server would not exist in a child.
THREADLESS_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "JE_ARROW_MALLOC_CONF": "background_thread:false",
    "_RJEM_MALLOC_CONF": "background_thread:false",
}
# N.B. polars 2.1 starts its out-of-core cleaner thread at import, and nothing turns it off: the child imports it.
STARTS_THREADS_AT_IMPORT = frozenset({"polars"})
PRIVATE_PLACES = ("/tmp", "/var/tmp", "/dev/shm")
# N.B. What the runtime itself imports on a call's way, whatever the model: skops saves most fitted states, and its
# first import in a child took 0.4-0.6 s of every client's first train (benchmarks/calls.py, the 20-client redeploy).
RUNTIME_IMPORTS = ("skops.io",)

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 2, 4, 16384, 1 << 18
_PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS, _PR_SET_CHILD_SUBREAPER = 4, 38, 36
# N.B. open_tree and move_mount have one number on every architecture (the unified table, Linux 5.2+).
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT = 428, 429
_OPEN_TREE_CLONE, _AT_RECURSIVE, _MOVE_MOUNT_F_EMPTY_PATH = 1, 0x8000, 4
_CAP_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def thread_count() -> int:
    """Threads of this process, from /proc (what a fork would lose)."""
    return len(os.listdir("/proc/self/task"))


def not_dumpable() -> None:
    """No other process of this uid may ptrace this one or read its /proc files (these machines have no YAMA)."""
    _check(_libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE, 0)")


def own_user_namespace() -> bool:
    """A user namespace of our own, our uid and gid mapped to themselves: our children may then make mount
    namespaces of their own. False when the kernel refuses (no unprivileged user namespaces): children then share
    every writable place, and the orchestrator gives each client a server of its own instead."""
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(_CLONE_NEWUSER) != 0:
        return False
    # N.B. Written while we are still dumpable: a non-dumpable process's /proc files belong to root.
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)
    return True


# --- which base libraries to import before any client -------------------------------------------------------------


def base_modules() -> set[str]:
    """Top-level import names of the base's distributions: modelpex-base's requirements and theirs, transitively.

    N.B. Read from the venv's metadata, never by importing: a module of the model's own pex is not among them."""
    names = {_requirement_name(req) for req in importlib.metadata.requires("modelpex-base") or []}
    seen: set[str] = set()
    while names:
        name = _canonical(names.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        names |= {_requirement_name(r) for r in requires if "extra ==" not in r}
    modules = set()
    for module, dists in importlib.metadata.packages_distributions().items():
        if any(_canonical(dist) in seen for dist in dists):
            modules.add(module)
    return modules


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def named_base_imports(package: str, base: set[str]) -> list[str]:
    """Modules of the base that the model package's source imports (absolute imports, any depth), in a stable order.

    N.B. The package is located, not imported: `find_spec` of a top-level name runs none of its code."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        return []
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] or [Path(spec.origin or "")]
    found: set[str] = set()
    for root in roots:
        for path in [root] if root.is_file() else sorted(root.rglob("*.py")):
            found |= _imports_of(path)
    return sorted(name for name in found if name.split(".")[0] in base - STARTS_THREADS_AT_IMPORT)


def _imports_of(path: Path) -> set[str]:
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (OSError, SyntaxError, ValueError):
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def preload(entry: dict[str, Any]) -> list[str]:
    """Import the base libraries the model names, threadless; what failed to import is left to the child."""
    for name, value in THREADLESS_ENV.items():
        os.environ.setdefault(name, value)
    package = str(entry["train"]).split(":")[0].split(".")[0]
    loaded = []
    for module in [*named_base_imports(package, base_modules()), *RUNTIME_IMPORTS]:
        try:
            importlib.import_module(module)
            loaded.append(module)
        except Exception:  # noqa: BLE001 - the child imports it again and reports the model's own traceback
            continue
    return loaded


# --- a child's own places and powers -----------------------------------------------------------------------------


def private_places(workdir: str, keep: Iterable[str], sandboxed: bool, limits: dict[str, Any] | None = None) -> None:
    """Fresh tmpfs over /tmp, /var/tmp, /dev/shm and ``workdir``, in a mount namespace of our own, each of its
    limit's size (``tmp``, ``shm``, ``folder``); folders under them that we must still read (``keep``: the
    interpreter, PEX_ROOT, a cache under /tmp) are bound back in.

    Also an IPC namespace of our own (System V and POSIX queues, semaphores, shared memory: no sibling's). In a
    bubblewrap sandbox, which has no network anyway, a network namespace of our own too (abstract Unix sockets
    live there) and a private /run, which bubblewrap makes writable."""
    limits = limits or {}
    sizes = {
        "/tmp": limits.get("tmp"),
        "/var/tmp": limits.get("tmp"),
        "/run": limits.get("tmp"),
        "/dev/shm": limits.get("shm"),
    }
    flags = _CLONE_NEWNS | _CLONE_NEWIPC | (_CLONE_NEWNET if sandboxed else 0)
    _check(_libc.unshare(flags), "unshare(CLONE_NEWNS | CLONE_NEWIPC)")
    _check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "making / private")
    extra = ("/run",) if sandboxed else ()
    places = [p for p in (*PRIVATE_PLACES, *extra, workdir) if os.path.isdir(p)]
    for place in sorted(set(places), key=len):
        kept = _kept_under(place, keep, workdir)
        trees = [(path, _clone_tree(path)) for path in kept]
        mode = b"mode=0700" if place == workdir else b"mode=1777"
        size = limits.get("folder") if place == workdir else sizes.get(place)
        if size:
            mode += b",size=%d" % int(size)
        _check(
            _libc.mount(b"tmpfs", place.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, mode), f"mounting a private {place}"
        )
        for path, tree in trees:
            os.makedirs(path, exist_ok=True)
            _check(
                _libc.syscall(_SYS_MOVE_MOUNT, tree, b"", -100, path.encode(), _MOVE_MOUNT_F_EMPTY_PATH),
                f"binding {path} back",
            )
            os.close(tree)
        if os.path.commonpath([place, workdir]) == place and place != workdir:
            os.makedirs(workdir, mode=0o700, exist_ok=True)  # N.B. Our folder under a fresh /tmp: an empty one.
    os.chdir(workdir)


def _kept_under(place: str, keep: Iterable[str], workdir: str) -> list[str]:
    """The outermost folders of ``keep`` inside ``place`` (never the working folder, which starts empty)."""
    inside = sorted(
        {
            os.path.realpath(p)
            for p in keep
            if p and os.path.isdir(p) and os.path.commonpath([place, os.path.realpath(p)]) == place
        }
        - {place}
    )
    outer: list[str] = []
    for path in inside:
        if os.path.commonpath([workdir, path]) == path or os.path.commonpath([workdir, path]) == workdir:
            continue
        if not any(os.path.commonpath([o, path]) == o for o in outer):
            outer.append(path)
    return outer


def _clone_tree(path: str) -> int:
    flags = _OPEN_TREE_CLONE | _AT_RECURSIVE | os.O_CLOEXEC
    return _check(_libc.syscall(_SYS_OPEN_TREE, -100, path.encode(), flags), f"cloning the mounts at {path}")


def drop_powers() -> None:
    """No capability (the user namespace gave us all of them in it) and no way to gain one again."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(_libc.capset(ctypes.byref(Header(_CAP_VERSION_3, 0)), ctypes.byref((Data * 2)())), "capset")


def end_descendants() -> int:
    """Kill every process we started, and what they started (we are their subreaper, so orphans come back to us);
    returns how many were ended."""
    ended = 0
    for _ in range(1000):
        children = _children()
        if not children:
            break
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                ended += 1
            except ProcessLookupError:
                pass
        _reap(block=True)
    _reap(block=False)
    return ended


def _children() -> set[int]:
    """Our children, of every thread (a model may start processes from its own threads)."""
    found: set[int] = set()
    try:
        for task in os.listdir("/proc/self/task"):
            try:
                found |= {int(p) for p in Path(f"/proc/self/task/{task}/children").read_text().split()}
            except (FileNotFoundError, ProcessLookupError):
                continue
        return found
    except OSError:
        pass
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1] == me:
                found.add(int(entry))
        except (OSError, IndexError):
            continue
    return found


def _reap(block: bool, statuses: dict[int, int] | None = None) -> None:
    """Reap ended children (waiting for one when ``block``); their return codes (-signal when killed) go into
    ``statuses``."""
    try:
        while True:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            if pid == 0:
                return
            if statuses is not None:
                statuses[pid] = os.waitstatus_to_exitcode(status)
            block = False
    except ChildProcessError:
        return


def _end_child(pid: int, grace: float, statuses: dict[int, int]) -> int | None:
    """A child's return code: it is given up to ``grace`` seconds to end by itself (a crash being reported), then
    killed."""
    deadline = time.monotonic() + max(0.0, min(grace, 10.0))
    while pid not in statuses and time.monotonic() < deadline:
        _reap(block=False, statuses=statuses)
        time.sleep(0.005)
    if pid not in statuses:
        try:
            os.kill(pid, signal.SIGKILL)
            statuses[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        except (ProcessLookupError, ChildProcessError):
            pass
    return statuses.pop(pid, None)


# --- the server's loop -------------------------------------------------------------------------------------------


def serve_forks(
    control: Channel,
    *,
    private: bool,
    sandboxed: bool,
    child_main: Any,
    workdir: str,
    keep: Sequence[str],
    close_in_child: Sequence[int] = (),
) -> int:
    """Answer the orchestrator's requests until it closes the control channel: ``fork`` (with the child's channel,
    stdout and stderr as descriptors) starts a child that runs ``child_main(channel)``; ``end`` kills one."""
    statuses: dict[int, int] = {}
    children: set[int] = set()
    while True:
        try:
            message, fds = control.receive()
        except ChannelClosed:
            return 0
        _reap(block=False, statuses=statuses)
        kind, call_id = message.get("kind"), message.get("id")
        if kind == "fork" and len(fds) == 3:
            pid = os.fork()
            if pid == 0:
                limits = message.get("limits") if isinstance(message.get("limits"), dict) else {}
                _become_child(control, fds, private, sandboxed, child_main, workdir, keep, close_in_child, limits)
            children.add(pid)
            for fd in fds:
                os.close(fd)
            control.send({"kind": "forked", "id": call_id, "pid": pid})
            continue
        for fd in fds:
            os.close(fd)
        pid, grace = message.get("pid"), message.get("grace", 0.0)
        if kind == "end" and pid in children and isinstance(grace, (int, float)):
            children.discard(pid)
            control.send({"kind": "ended", "id": call_id, "returncode": _end_child(pid, float(grace), statuses)})
            continue
        raise CallError(f"expected fork, or end of a child of this server, on the fork server's channel, got {kind!r}")


def _become_child(
    control: Channel,
    fds: list[int],
    private: bool,
    sandboxed: bool,
    child_main: Any,
    workdir: str,
    keep: Sequence[str],
    close_in_child: Sequence[int],
    limits: dict[str, Any],
) -> None:
    """The child's start, then its life: never returns into the server's loop; its limits are applied before it
    imports the model (`modelpex_runtime.containment`)."""
    code = 1
    try:
        control.close()
        for fd in close_in_child:
            os.close(fd)
        channel_fd, out_fd, err_fd = fds
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        os.close(out_fd)
        os.close(err_fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        started = time.perf_counter()
        if private:
            private_places(workdir, keep, sandboxed, limits)
            drop_powers()
        apply_limits(limits)
        _check(_libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
        code = child_main(Channel.from_fd(channel_fd), private, started)
    except BaseException as exc:  # noqa: BLE001 - whatever happens, this process must never return to the server loop
        try:
            sys.stderr.write(f"modelpex: the fork server's child could not start: {type(exc).__name__}: {exc}\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
    finally:
        try:
            end_descendants()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
