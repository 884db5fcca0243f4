"""A real Celery broker for tests: Debian's ``redis-server`` on loopback, a free port, nothing written to disk.

Celery's workers and Dagster's Celery executor reach it by URL alone (`url`), as modelpex's users do through
MODELPEX_CELERY_BROKER.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .conftest import free_port
from .servers import log_tail, spawn, stop, terminate
from .system import find

__all__ = ["RedisServer"]

START_SECONDS = 30.0
STOP_SECONDS = 30.0


@dataclass
class RedisServer:
    """One ``redis-server``, its working folder and log in ``folder``."""

    folder: Path
    port: int
    process: subprocess.Popen[bytes]

    def url(self, database: int = 0) -> str:
        """A broker URL on one of its numbered databases: workers on another database never see these tasks."""
        return f"redis://127.0.0.1:{self.port}/{database}"

    @classmethod
    def start(cls, folder: Path) -> RedisServer:
        binary = find("redis-server")
        if binary is None:
            raise RuntimeError("no redis-server: tests/system.py's requires('redis-server') should have skipped")
        port = free_port()
        # N.B. --save '' and --appendonly no: a throwaway broker writes no snapshot, at exit or ever.
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with open(folder / "redis.log", "wb") as log:
            process = spawn([*command, "--dir", str(folder)], stdout=log)
        server = cls(folder, port, process)
        try:
            server._wait_until_ready()
        except BaseException:
            server.stop(check=False)
            raise
        return server

    def _wait_until_ready(self) -> None:
        """Until it answers PING."""
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode} at start:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                    connection.sendall(b"PING\r\n")
                    if connection.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer in {START_SECONDS} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.folder / "redis.log", lines)

    def stop(self, *, check: bool = True) -> None:
        """SIGTERM, then wait for a clean exit; with ``check``, anything else is an error."""
        if check:
            stop(self.process, "redis-server", STOP_SECONDS, tail=self.log_tail)
        else:
            terminate(self.process, STOP_SECONDS)
