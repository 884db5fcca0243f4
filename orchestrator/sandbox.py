"""Sandbox: who a model process runs as, where it may write, and which guarantees hold where.

When the orchestrator can switch users (it runs as root, or holds CAP_SETUID, CAP_SETGID, CAP_CHOWN and CAP_KILL),
every model process runs as an unprivileged user of its own: a uid taken from the model user's subordinate range
in ``/etc/subuid`` (the model user's own uid when it has none), in the model user's group, with no supplementary
groups and umask 077. Two model processes then cannot signal, trace or read each other, and neither can touch the
orchestrator, its environment or its files. Its one writable folder is a private directory under the cache's
``runs/``, owned by that uid; the orchestrator holds a lock beside it while the process lives, so `modelpex gc`
removes only folders whose owner is gone, even from another PID namespace.

Where bubblewrap is installed (``MODELPEX_SANDBOX=auto``, the default, uses it when it works), the process also runs
in namespaces of its own: no network (not even loopback services such as the Dagster webserver), a read-only view
of the file system with private /tmp, /var/tmp, /dev/shm and /run, its own /proc in which the orchestrator does not
exist, and a PID namespace that dies with it, taking along any child that escaped its process group with setsid.

When it cannot switch users, the model runs as the orchestrator's own user and only the guarantees that do not
depend on a second user hold; `guarantees` says which, and the runner logs it.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from orchestrator.errors import ModelpexError, SandboxError
from orchestrator.files import owned_dir
from orchestrator.leases import lease_dir, try_lock
from orchestrator.limits import Limits

__all__ = ["RUN_PREFIX", "RUNS", "Identity", "Sandbox", "can_switch_users", "end_uid", "guarantees", "live_uids"]

log = logging.getLogger("modelpex")

# N.B. Capability bits (linux/capability.h): what switching users, handing over a folder and ending a process need.
_NEEDED_CAPS = {"CAP_CHOWN": 0, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7}
DEFAULT_MODEL_USER = "modelpex-model"
SUBUID_FILE = Path("/etc/subuid")
RUNS = "runs"
RUN_PREFIX = "run-"
# N.B. Uids are the host's, not one cache's: two orchestrators with different MODELPEX_CACHE (two projects, or every
# test with its own cache) must never lease one uid at once, nor take the other's live model for a dead run's.
HOST_UID_LEASES = Path(os.environ.get("MODELPEX_UID_LEASES", "/run/modelpex/uids"))
Mode = Literal["user", "none"]


def _effective_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def can_switch_users() -> bool:
    """Root, or an unprivileged process granted every capability a user switch needs."""
    if os.geteuid() == 0:
        return True
    caps = _effective_caps()
    return all(caps >> bit & 1 for bit in _NEEDED_CAPS.values())


def guarantees(mode: Mode, bwrap: bool, own_uids: bool) -> list[tuple[str, bool]]:
    """Each isolation guarantee and whether it holds: the runner logs the ones that do not, README lists them."""
    user = mode == "user"
    return [
        (
            "the model cannot read the orchestrator's environment, memory or descriptors (/proc/<pid>/...)",
            user or bwrap,
        ),
        ("the model cannot write the store, PEX_ROOT, the verified artifacts or the project", user),
        ("the model cannot open a shared-memory segment it was not handed (segments have no names)", True),
        ("the model cannot write its input segments", user),
        ("two model processes cannot signal, trace or read each other", user and (own_uids or bwrap)),
        ("the model cannot read the signing key, so it cannot forge a fitted state", user),
        ("the model can write nowhere but its private folder and private /tmp, /var/tmp, /dev/shm", bwrap),
        ("the model has no network, not even services on this host's loopback", bwrap),
        ("the model process and its children die with the orchestrator (lifeline) and after every call", True),
        ("a child that escapes its process group with setsid still dies with its model process", bwrap or own_uids),
    ]


@dataclass(frozen=True)
class Identity:
    """The uid and gid one model process runs as; ``lock`` holds its uid slot while the process lives."""

    uid: int
    gid: int
    lock: int | None = field(default=None, compare=False)


def _subuid_range(user: pwd.struct_passwd) -> range | None:
    """The model user's first subordinate uid range, if ``/etc/subuid`` grants one."""
    try:
        lines = SUBUID_FILE.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user.pw_name, str(user.pw_uid)) and parts[1].isdigit():
            start, count = int(parts[1]), int(parts[2])
            if count > 0 and start > 0:
                return range(start, start + count)
    return None


class Sandbox:
    """How this orchestrator starts model processes: as whom, in which folder, with which guarantees."""

    def __init__(
        self,
        cache: Path,
        mode: Mode,
        user: pwd.struct_passwd | None = None,
        bwrap: str | None = None,
        no_bwrap: str = "MODELPEX_SANDBOX=none",
    ) -> None:
        self.cache = cache
        self.mode = mode
        self.user = user
        self.bwrap = bwrap
        self.no_bwrap = no_bwrap  # N.B. Why there is no namespace sandbox, when there is none.
        self.uids = _subuid_range(user) if user is not None else None
        owned_dir(cache, 0o755)
        self.runs = owned_dir(cache / RUNS, 0o711)  # N.B. Traversable, not listable: a uid finds only its folder.
        self._uid_locks = owned_dir(cache / "uids", 0o700)
        self._host_uid_locks: Path | None = None
        if self.uids:
            self._host_uid_locks = _host_leases()

    @classmethod
    def create(
        cls, cache: Path, isolation: str = "auto", user: str = DEFAULT_MODEL_USER, sandbox: str = "auto"
    ) -> Sandbox:
        """``isolation``: ``user`` (switch users or fail), ``none`` (never), ``auto`` (switch when possible);
        ``sandbox``: ``bwrap`` (namespaces or fail), ``none``, ``auto`` (bubblewrap when it is installed and works)."""
        if isolation not in ("auto", "user", "none"):
            raise SandboxError(f"MODELPEX_ISOLATION={isolation!r} is not one of auto, user, none")
        if sandbox not in ("auto", "bwrap", "none"):
            raise SandboxError(f"MODELPEX_SANDBOX={sandbox!r} is not one of auto, bwrap, none")
        switch = isolation == "user" or (isolation == "auto" and can_switch_users())
        account = cls._model_user(user, isolation) if switch else None
        return cls(cache, "user" if switch else "none", account, *_bubblewrap(sandbox, account))

    @staticmethod
    def _model_user(user: str, isolation: str) -> pwd.struct_passwd:
        if not can_switch_users():
            raise SandboxError(
                f"MODELPEX_ISOLATION={isolation} but this process cannot switch users: run it as root, or grant "
                f"{', '.join(_NEEDED_CAPS)} (a Kubernetes securityContext or file capabilities)"
            )
        try:
            account = pwd.getpwnam(user)
        except KeyError:
            raise SandboxError(
                f"model user {user!r} does not exist: create it (`useradd --system --user-group --shell "
                f"/usr/sbin/nologin {user}`, which .ci/setup and the Dockerfile do), or set MODELPEX_MODEL_USER, "
                "or MODELPEX_ISOLATION=none to run models as this user"
            ) from None
        if account.pw_uid == 0 or account.pw_gid == 0:
            raise SandboxError(f"model user {user!r} is root or in group root: give models an unprivileged user")
        return account

    @property
    def switching(self) -> bool:
        return self.mode == "user"

    def describe(self) -> str:
        """One paragraph for the log: who models run as, and each guarantee that does not hold."""
        if self.switching:
            assert self.user is not None
            who = f"model processes run as user {self.user.pw_name!r}" + (
                f" with a uid of their own from {self.uids.start}-{self.uids.stop - 1}"
                if self.uids
                else " (one shared uid: add a range to /etc/subuid to give each process its own)"
            )
        else:
            who = f"model processes run as this process's own user (uid {os.geteuid()}): it cannot switch users"
        who += ", in a bubblewrap sandbox" if self.bwrap else f", without a namespace sandbox ({self.no_bwrap})"
        missing = [text for text, holds in guarantees(self.mode, bool(self.bwrap), bool(self.uids)) if not holds]
        return who + ("; these guarantees do NOT hold: " + "; ".join(missing) if missing else "")

    def check_reachable(self, path: Path, what: str) -> None:
        """Fail clearly when the model user could not reach ``path`` (a folder under a mode-0700 home, say)."""
        if not self.switching:
            return
        for folder in [*reversed(Path(path).parents), Path(path)]:
            info = folder.stat()
            if not info.st_mode & stat.S_IXOTH:
                raise SandboxError(
                    f"{what} {path} is out of the model user's reach: {folder} is mode "
                    f"{stat.S_IMODE(info.st_mode):o}. Use one outside it (an interpreter such as /usr/bin/python3, "
                    "or MODELPEX_PYTHON / MODELPEX_CACHE pointing elsewhere)"
                )

    @contextmanager
    def identity(self) -> Iterator[Identity]:
        """The identity of one model process, held until it ends."""
        if not self.switching:
            yield Identity(os.geteuid(), os.getegid())
            return
        assert self.user is not None
        if not self.uids:
            yield Identity(self.user.pw_uid, self.user.pw_gid)
            return
        offset = secrets.randbelow(len(self.uids))
        for index in range(len(self.uids)):
            uid = self.uids[(offset + index) % len(self.uids)]
            fds = self._lock_uid(uid)
            if fds is None:
                continue
            if not end_uid(uid, self.user.pw_gid):
                _close_all(fds)  # N.B. Something of a dead run still runs as this uid: never hand it out.
                log.warning(f"uid {uid} still has processes that survive SIGKILL; it is skipped")
                continue
            try:
                yield Identity(uid, self.user.pw_gid, fds[-1])
            finally:
                _close_all(fds)
            return
        raise SandboxError(f"every uid of {self.user.pw_name}'s range in {SUBUID_FILE} is in use: widen the range")

    def end_orphans(self) -> list[int]:
        """End the processes of every model uid whose lease is gone (its orchestrator was killed with -9 while a
        child that escaped the lifeline ran on); the uids they ran as. Nothing happens without uids of our own."""
        if not self.switching or not self.uids or self.user is None:
            return []
        ended = []
        for uid in sorted(uid for uid in live_uids() if uid in self.uids):
            fds = self._lock_uid(uid)
            if fds is None:
                continue  # N.B. Leased: a live orchestrator's model, of this cache or another, perhaps in a container.
            try:
                if not end_uid(uid, self.user.pw_gid):
                    log.warning(f"uid {uid} still has processes that survive SIGKILL")
                ended.append(uid)
            finally:
                _close_all(fds)
        return ended

    def _lock_uid(self, uid: int) -> list[int] | None:
        """The lease of ``uid``: its lock on this host (every orchestrator here) and in this cache (orchestrators
        in other containers that share the cache), both or none."""
        fds: list[int] = []
        for folder in (self._host_uid_locks, self._uid_locks):
            if folder is None:
                continue
            fd = try_lock(folder / str(uid))
            if fd is None:
                _close_all(fds)
                return None
            fds.append(fd)
        return fds

    def end_orphans_once(self) -> None:
        """`end_orphans` at the first model start of this sandbox (so of each command or Dagster run)."""
        if not getattr(self, "_orphans_ended", False):
            self._orphans_ended = True
            if ended := self.end_orphans():
                log.warning(f"ended processes a dead run left under model uids {', '.join(map(str, ended))}")

    def end_processes(self, identity: Identity) -> None:
        """Every process of ``identity``'s uid, when the uid is its own (a leased one): its model has ended."""
        if self.switching and identity.lock is not None and not end_uid(identity.uid, identity.gid):
            log.warning(f"uid {identity.uid} still has processes that survive SIGKILL")

    @contextmanager
    def workdir(self, identity: Identity) -> Iterator[Path]:
        """A private folder owned by ``identity``, leased while the process lives, removed afterwards."""
        with lease_dir(self.runs, RUN_PREFIX) as folder:
            if self.switching:
                os.chown(folder, identity.uid, identity.gid)
            yield folder

    def command(
        self, argv: list[str], workdir: Path, readable: Sequence[Path] = (), limits: Limits | None = None
    ) -> list[str]:
        """``argv`` as the sandbox runs it: inside bubblewrap's namespaces when there is one, where ``readable``
        stays visible (read-only) even under the private /tmp, /var/tmp or /run; with ``limits``, the private
        folder, /tmp, /var/tmp and /dev/shm are tmpfs of their sizes."""
        if not self.bwrap:
            return argv
        binds = [arg for path in readable for arg in ("--ro-bind", str(path), str(path))]
        return [self.bwrap, *_bwrap_args(workdir, binds, limits), "--", *argv]

    def popen_kwargs(self, identity: Identity) -> dict[str, object]:
        """What `subprocess.Popen` needs to start a process as ``identity``, in a session of its own."""
        kwargs: dict[str, object] = {"start_new_session": True, "umask": 0o077}
        if self.switching:
            kwargs.update(user=identity.uid, group=identity.gid, extra_groups=[])
        return kwargs


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


@functools.cache
def _host_leases() -> Path | None:
    """The host's folder of uid leases; None (said once) where it cannot be made, leaving only the cache's."""
    try:
        return owned_dir(HOST_UID_LEASES, 0o700)
    except (OSError, ModelpexError) as exc:
        log.warning(
            f"uid leases stay per cache: {HOST_UID_LEASES} cannot be used ({exc}); two orchestrators with different "
            "MODELPEX_CACHE on this host could then hand out one uid at once (set MODELPEX_UID_LEASES to a folder)"
        )
        return None


def _live_of(uid: int, me: int) -> bool:
    """Whether a process other than ``me`` runs (is not a zombie) with real uid ``uid``; raw reads, no imports: it
    runs in a forked child of a threaded process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            fd = os.open(f"/proc/{entry}/status", os.O_RDONLY)
        except OSError:
            continue
        try:
            status = os.read(fd, 4096)
        except OSError:
            continue
        finally:
            os.close(fd)
        state = status.partition(b"\nState:")[2].split(None, 1)[:1]
        real = status.partition(b"\nUid:")[2].split(None, 1)[:1]
        if real == [str(uid).encode()] and state not in ([b"Z"], [b"X"]):
            return True
    return False


def end_uid(uid: int, gid: int, timeout: float = 10.0) -> bool:
    """End every process of ``uid`` as process supervisors do: a helper running as that uid sends SIGKILL to every
    process it may signal (``kill(-1)``, which spares only itself), again and again until none remains alive, which
    also catches a fork chain's next generation and a child that escaped with setsid. False if some survive.

    N.B. ``kill(-1)`` reaches processes in every PID namespace below ours (bubblewrap's) and counts zombies as
    signalled, hence the check for one that still runs. A forked child of this (threaded) process runs only system
    calls and reads, nothing that takes a lock another thread could hold."""
    if uid in (0, os.getuid(), os.geteuid()):
        raise SandboxError(f"refusing to end every process of uid {uid}: it is root's or this process's own")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the helper
        code = 2
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            me, deadline, code = os.getpid(), time.monotonic() + timeout, 1
            while time.monotonic() < deadline:
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    code = 0
                    break
                if not _live_of(uid, me):
                    code = 0
                    break
                os.sched_yield()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def live_uids() -> set[int]:
    """Real uids of the processes now running (zombies aside), from /proc."""
    uids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields.get("State", "").split()[:1] not in (["Z"], ["X"]) and "Uid" in fields:
                uids.add(int(fields["Uid"].split()[0]))
    return uids


def _bwrap_args(workdir: Path, binds: Sequence[str] = (), limits: Limits | None = None) -> list[str]:
    """Every namespace; the file system read-only but for the private folder and fresh temporary mounts, each a
    tmpfs of its limit's size when there are limits (``--size`` applies to the ``--tmpfs`` after it)."""

    def sized(size: int | None) -> list[str]:
        return ["--size", str(size)] if size else []

    tmp, shm, folder = (limits.tmp, limits.shm, limits.folder) if limits else (None, None, None)
    own = [*sized(folder), "--tmpfs", str(workdir)] if folder else ["--bind", str(workdir), str(workdir)]
    return [
        "--unshare-all",
        "--die-with-parent",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        *(([*sized(shm), "--tmpfs", "/dev/shm"]) if shm else []),
        "--proc", "/proc",
        *sized(tmp), "--tmpfs", "/tmp",
        *sized(tmp), "--tmpfs", "/var/tmp",
        "--tmpfs", "/run",
        *binds,
        *own,
        "--chdir", str(workdir),
    ]  # fmt: skip


@functools.cache
def _bubblewrap(choice: str, account: pwd.struct_passwd | None) -> tuple[str | None, str]:
    """bubblewrap's path when the sandbox should and can use it (one trial run as the model user proves it), and
    otherwise why not.

    N.B. Nothing is logged here: the runner says it once, when a model process first starts (`Runner.call`), so that
    it never comes ahead of an error that has nothing to do with the sandbox."""
    if choice == "none":
        return None, "MODELPEX_SANDBOX=none"
    found = shutil.which("bwrap")
    if found is not None:
        user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []} if account else {}
        with tempfile.TemporaryDirectory() as tmp:
            os.chmod(tmp, 0o755)
            trial = subprocess.run(
                [found, *_bwrap_args(Path(tmp)), "--", "/bin/true"], capture_output=True, text=True, check=False, **user
            )
        if trial.returncode == 0:
            return found, ""
        problem = f"bubblewrap cannot start a sandbox here: {trial.stderr.strip()}"
    else:
        problem = "bubblewrap is not installed: Debian's apt-get install bubblewrap"
    if choice == "bwrap":
        raise SandboxError(f"MODELPEX_SANDBOX=bwrap but {problem}")
    return None, problem
