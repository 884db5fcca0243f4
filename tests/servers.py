"""What the servers and other long-lived processes the tests start share: they die with the test session however it
ends, every stop is checked, and their logs are at hand for an error message.

Each is started by `spawn`: in a session of its own (so that a stop reaches the children it started), with SIGKILL
as its parent-death signal (``setpriv --pdeathsig``: the kernel kills it the moment the test process is gone, kill -9
included), and registered with the session's reaper: a small process in a session of its own that holds the read end
of a pipe only the test process writes to. At that pipe's end-of-file (the test process ended, however it ended) it
kills every process left in the registered sessions, which catches the children a server started (dagster dev's
webserver and daemon, a Celery worker's pool), whom no parent-death signal reaches.
"""

from __future__ import annotations

import os
import pwd
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["log_tail", "services", "spawn", "stop", "terminate"]

ROOT = Path(__file__).resolve().parents[1]


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` of a server's log, for an error message; empty when it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def session_ids() -> dict[int, list[int]]:
    """Every process on the machine by its session id (field 6 of /proc/PID/stat)."""
    sessions: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            sessions.setdefault(int(fields[3]), []).append(int(entry))
    return sessions


def kill_sessions(sessions: set[int], seconds: float = 5.0) -> None:
    """SIGKILL every process in ``sessions`` until none is left (a process may fork while we look)."""
    deadline = time.monotonic() + seconds
    while sessions and time.monotonic() < deadline:
        found = [pid for sid, pids in session_ids().items() if sid in sessions for pid in pids]
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)


def _reap() -> None:
    """The reaper's main: "+SID" / "-SID" lines on stdin until end-of-file, then every registered session killed.

    N.B. A session left with no process is forgotten at once (every half second): its id is a process id, which the
    machine reuses (pid_max is 32768 here), and a later session of that id is someone else's.
    """
    sessions: set[int] = set()
    pending = b""
    while True:
        if select.select([0], [], [], 0.5)[0]:
            chunk = os.read(0, 4096)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                (sessions.add if line[:1] == b"+" else sessions.discard)(int(line[1:]))
        if sessions:
            sessions &= session_ids().keys()
    kill_sessions(sessions)


class _Reaper:
    """The session's reaper, started on first use. The pipe's write end is this process's alone: it is close-on-exec
    and every other child is started with its other descriptors closed."""

    process: subprocess.Popen[str] | None = None
    owner = 0
    live: set[int] = set()  # N.B. What `spawn` started and no `terminate` has ended yet.

    @classmethod
    def tell(cls, line: str) -> None:
        if cls.process is None or cls.owner != os.getpid():
            # N.B. A session of its own: a Ctrl-C or a kill of the test's process group must not take it along.
            code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.servers import _reap; _reap()"
            cls.process = subprocess.Popen(
                [sys.executable, "-c", code], stdin=subprocess.PIPE, text=True, start_new_session=True
            )
            cls.owner = os.getpid()
        assert cls.process.stdin is not None
        cls.process.stdin.write(line + "\n")
        cls.process.stdin.flush()
        (cls.live.add if line[0] == "+" else cls.live.discard)(int(line[1:]))


def services() -> set[int]:
    """The processes started by `spawn` and not yet ended by `terminate`, and the reaper: not leaks, while they run."""
    reaper = {_Reaper.process.pid} if _Reaper.process is not None and _Reaper.owner == os.getpid() else set()
    return _Reaper.live | reaper


def spawn(
    command: Sequence[str],
    *,
    user: str | None = None,
    stdout: IO[Any] | int | None = subprocess.DEVNULL,
    stderr: IO[Any] | int | None = subprocess.STDOUT,
    **kwargs: Any,
) -> subprocess.Popen:
    """Start ``command`` so that it cannot outlive the test session (see the module's docstring); as ``user`` (a
    name, which needs root) when given.

    N.B. setpriv switches users first and sets the parent-death signal after, when nothing clears it any more. The
    signal comes when the thread that started it ends: the test session's main thread, which starts every server.
    """
    wrapper = ["setpriv", "--pdeathsig", "KILL"]
    if user is not None:
        account = pwd.getpwnam(user)
        wrapper += ["--reuid", str(account.pw_uid), "--regid", str(account.pw_gid), "--init-groups"]
    process = subprocess.Popen(
        [*wrapper, "--", *command],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        **kwargs,
    )
    _Reaper.tell(f"+{process.pid}")
    return process


def terminate(process: subprocess.Popen, seconds: float, sig: int = signal.SIGTERM, *, group: bool = False) -> bool:
    """``sig`` (SIGTERM, as a supervisor stops a server; to its whole process group with ``group``) and wait; after
    ``seconds``, or once it has ended, whatever is left of its session is killed. Returns whether it ended on its own
    (or had already)."""
    ended = True
    if process.poll() is None:
        if group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            ended = False
    kill_sessions({process.pid})
    process.wait()
    _Reaper.tell(f"-{process.pid}")
    return ended


def stop(
    process: subprocess.Popen,
    what: str,
    seconds: float = 60,
    *,
    sig: int = signal.SIGTERM,
    group: bool = False,
    tail: Callable[[], str] = str,
) -> None:
    """Stop a server as a supervisor does (``sig``, then wait) and check that it ended cleanly: by itself, in time,
    with exit status 0 (or killed by ``sig``, for a program that does not catch it); otherwise an error naming it, with
    ``tail()`` (its log's end)."""
    name = signal.Signals(sig).name
    if not terminate(process, seconds, sig, group=group):
        raise AssertionError(f"{what} did not stop within {seconds:.0f} s of {name}:\n{tail()}")
    if process.returncode not in (0, -sig):
        raise AssertionError(f"{what} exited with {process.returncode} on {name}:\n{tail()}")
