"""What the servers the tests start (SeaweedFS, redis-server) share: a clean stop and a look at their logs."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

__all__ = ["log_tail", "terminate"]


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` of a server's log, for an error message; empty when it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def terminate(process: subprocess.Popen, seconds: float) -> bool:
    """SIGTERM, as a supervisor stops a server, and wait; killed if still there after ``seconds``.

    Returns whether it ended on its own (or had already).
    """
    if process.poll() is not None:
        return True
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False
    return True
