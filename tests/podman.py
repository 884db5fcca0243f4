"""Podman for the container tests: its settings for these machines, a Debian base image made without a registry,
the project's image built from the Dockerfile on it, and cleanup that leaves nothing behind.

N.B. Field notes, "Containers": Debian's podman runs real containers here as root with `runc` (crun refuses the
hybrid cgroup layout) and ulimits the VM can grant. A third setting: netavark (with aardvark-dns) as the network
backend, because Debian's CNI plugins resolve no container names (no dnsname plugin), and the containers find the
code location, the store and the instance by name. All three go in a file named by ``CONTAINERS_CONF``, so /etc
stays untouched; but every podman on the machine must then use netavark too: CNI's bridge (cni-podman0) and
netavark's (podman0) both take 10.88.0.0/16, and with both up, answers to a container's packets come back on the
other bridge (apt and pip inside a build hang on DNS).

No registry is reachable, so the base image is a debootstrap of Debian bookworm with Debian's Python, imported into
podman's storage under a tag that is its recipe's content hash: built once per machine (6 minutes on a loaded
machine), then found in a second by every later session.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from filelock import FileLock

__all__ = ["base_image", "env", "podman", "project_image"]

REPO = Path(__file__).resolve().parents[1]
STATE = Path(tempfile.gettempdir()) / "modelpex-podman"

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"

[network]
network_backend = "netavark"
"""

SUITE = "bookworm"
# N.B. python3-venv: the Dockerfile makes its venv with Debian's Python 3.11 (the host's interpreter too, so the base
# pex the host publishes has the key a container computes).
PACKAGES = ("python3", "python3-venv")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
EXTRA_CAS = Path("/usr/local/share/ca-certificates")
PIP_CONF = "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
PROJECT_IMAGE = "localhost/modelpex:test"


def env() -> dict[str, str]:
    """This process's environment with ``CONTAINERS_CONF`` naming the two settings podman needs here."""
    STATE.mkdir(parents=True, exist_ok=True)
    conf = STATE / "containers.conf"
    if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
        partial = conf.with_suffix(f".{os.getpid()}")
        partial.write_text(CONTAINERS_CONF)
        partial.replace(conf)
    return os.environ | {"CONTAINERS_CONF": str(conf)}


def podman(*args: str, timeout: float = 120, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess:
    """``podman ARGS`` with the settings of `env`; a failure raises, naming the command and its output."""
    done = subprocess.run(
        ["podman", *args],
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,  # type: ignore[arg-type]
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def mirror() -> str:
    """The Debian mirror apt already uses (deb822 ``URIs:`` or a one-line ``deb`` source naming bookworm)."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*")) + [Path("/etc/apt/sources.list")]
    for source in sources:
        text = source.read_text() if source.is_file() else ""
        for uri in re.findall(r"^URIs:\s*(\S+)", text, re.M) + re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M):
            if uri.rstrip("/").endswith("/debian"):
                return uri
    return "http://deb.debian.org/debian"


def _extra_cas() -> list[Path]:
    return sorted(EXTRA_CAS.glob("*.crt")) if EXTRA_CAS.is_dir() else []


def base_recipe() -> str:
    """Everything the base image is made of; its hash names the image, so a change to any of it makes a new one."""
    digest = hashlib.sha256()
    for part in (SUITE, mirror(), " ".join(PACKAGES), PIP_CONF, CA_BUNDLE.read_bytes().decode()):
        digest.update(part.encode() + b"\0")
    for ca in _extra_cas():
        digest.update(ca.name.encode() + b"\0" + ca.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def base_image() -> str:
    """``localhost/modelpex-base:<recipe hash>``: Debian bookworm (debootstrap, minbase) with Debian's Python 3.11
    and this machine's CA bundle, which pip inside a build needs (CERTIFICATE_VERIFY_FAILED without); made once per
    machine."""
    tag = f"localhost/modelpex-base:{base_recipe()}"
    STATE.mkdir(parents=True, exist_ok=True)
    with FileLock(STATE / "base.lock"):
        if podman("image", "exists", tag, check=False).returncode == 0:
            return tag
        with tempfile.TemporaryDirectory(prefix="modelpex-rootfs-", dir="/var/tmp") as work:
            rootfs = Path(work) / "rootfs"
            command = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(rootfs)]
            try:
                done = subprocess.run([*command, mirror()], capture_output=True, text=True, timeout=900)
            finally:
                _unmount_below(rootfs)
            if done.returncode != 0:
                raise RuntimeError(f"debootstrap exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr}")
            _add_cas(rootfs)
            shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            podman("import", "--change", 'CMD ["/bin/bash"]', "-", tag, stdin=tar.stdout, timeout=600)
            if tar.wait() != 0:
                raise RuntimeError(f"tar of {rootfs} exited with {tar.returncode}")
        return tag


def _unmount_below(rootfs: Path) -> None:
    """Unmount what a debootstrap that failed or timed out left mounted in ``rootfs`` (its /proc, /sys), so removing
    the folder cannot reach the host's."""
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{rootfs}/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)


def _add_cas(rootfs: Path) -> None:
    """The machine's CA bundle and extra CAs (kept by a later update-ca-certificates), and pip pointed at them."""
    (rootfs / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
    extra = rootfs / "usr/local/share/ca-certificates"
    extra.mkdir(parents=True, exist_ok=True)
    for ca in _extra_cas():
        shutil.copyfile(ca, extra / ca.name)
    (rootfs / "etc/pip.conf").write_text(PIP_CONF)


def project_image(tag: str = PROJECT_IMAGE) -> tuple[str, float]:
    """The project's Dockerfile built on `base_image` (its ``BASE`` argument) from this working tree, and the
    seconds it took: minutes cold, seconds when podman's layer cache holds it."""
    base = base_image()
    with FileLock(STATE / "project.lock"):
        started = time.monotonic()
        podman("build", "--build-arg", f"BASE={base}", "-t", tag, "-f", "Dockerfile", str(REPO), timeout=1800)
        return tag, time.monotonic() - started


def postgres_image() -> str:
    """Debian's PostgreSQL on `base_image`, initialised with a database ``dagster`` owned by ``modelpex`` that trusts
    every address (a throwaway server on a test's private network)."""
    base = base_image()
    containerfile = f"""\
FROM {base}
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 && rm -rf /var/lib/apt/lists/*
USER postgres
RUN /usr/lib/postgresql/15/bin/initdb -D /var/lib/postgresql/data -U modelpex --auth=trust \\
 && echo "host all all 0.0.0.0/0 trust" >> /var/lib/postgresql/data/pg_hba.conf \\
 && /usr/lib/postgresql/15/bin/pg_ctl -D /var/lib/postgresql/data -w start \\
 && /usr/lib/postgresql/15/bin/createdb -U modelpex dagster \\
 && /usr/lib/postgresql/15/bin/pg_ctl -D /var/lib/postgresql/data -w stop
EXPOSE 5432
CMD ["/usr/lib/postgresql/15/bin/postgres", "-D", "/var/lib/postgresql/data", "-c", "listen_addresses=*", \\
     "-c", "fsync=off", "-c", "dynamic_shared_memory_type=mmap"]
"""
    tag = f"localhost/modelpex-postgres:{hashlib.sha256(containerfile.encode()).hexdigest()[:16]}"
    with FileLock(STATE / "postgres.lock"):
        if podman("image", "exists", tag, check=False).returncode != 0:
            with tempfile.TemporaryDirectory(prefix="modelpex-pg-image-") as context:
                (Path(context) / "Containerfile").write_text(containerfile)
                podman("build", "-t", tag, context, timeout=900)
    return tag


def published_port(container: str, port: int) -> int:
    """The host port (on loopback) that ``container``'s ``port`` is published on."""
    out = podman("port", container, f"{port}/tcp").stdout.strip().splitlines()[0]
    return int(out.rsplit(":", 1)[1])


def inventory() -> dict[str, set[str]]:
    """Every container, network and volume podman holds: what a test must leave as it found."""
    return {
        "containers": set(podman("ps", "-a", "--format", "{{.ID}} {{.Names}}").stdout.split("\n")) - {""},
        "networks": set(podman("network", "ls", "--format", "{{.Name}}").stdout.split()),
        "volumes": set(podman("volume", "ls", "--format", "{{.Name}}").stdout.split()),
    }


def remove_labelled(label: str, networks: list[str], volumes: list[str]) -> None:
    """Remove, at once (kill, not stop), every container carrying ``label``, then ``networks`` and ``volumes``."""
    ids = podman("ps", "-a", "-q", "--filter", f"label={label}").stdout.split()
    if ids:
        podman("rm", "-f", "-t", "0", *ids, timeout=300)
    for network in networks:
        podman("network", "rm", "-f", network, check=False)
    for volume in volumes:
        podman("volume", "rm", "-f", volume, check=False)
