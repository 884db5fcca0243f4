"""The Dockerfile: linted (Docker cannot run here), and its modelpex commands are the ones exercised for real."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from .conftest import REPO, CliResult
from .test_transport import in_small_shm, needs_mounts, sized_model  # noqa: F401 - a fixture

HADOLINT = shutil.which("hadolint") or str(Path(__import__("sys").executable).with_name("hadolint"))


def dockerfile_commands() -> list[list[str]]:
    """The ``modelpex ...`` commands of the Dockerfile's RUN instructions, in order."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if line.startswith("RUN "):
            for part in re.split(r"&&", line[4:]):
                words = [word for word in shlex.split(part) if not word.startswith("--mount=")]
                if words and words[0] == "modelpex":
                    commands.append(words[1:])
    return commands


def test_hadolint_passes() -> None:
    done = subprocess.run([HADOLINT, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_mounts
def test_dockers_default_dev_shm_runs_frames_larger_than_it(sized_model: dict) -> None:  # noqa: F811
    """The Dockerfile says frames never touch /dev/shm, so `docker run` needs no --shm-size for them: on a /dev/shm of
    Docker's default 64 MB (a private tmpfs), a call of 96 MiB in and 80 MiB out runs, and leaves nothing there."""
    assert "frames never touch /dev/shm" in (REPO / "Dockerfile").read_text()
    call = {"in_mib": 96, "out_mib": 80}
    (ran, closed) = in_small_shm("64m", sized_model, [call])
    assert ran.get("error") is None and ran["rows"] == 80 << 17, ran
    assert closed["used"] == 0, closed


def test_dockerfile_commands_build_and_unpack_the_base(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    commands = dockerfile_commands()
    assert commands == [["build", "base"], ["warm"]]
    pex_root = tmp_path / "pex_root"
    for command in commands:
        result = cli(*command, env={"MODELPEX_PEX_ROOT": str(pex_root)})
        assert result.returncode == 0, result.stderr
    assert "warmed base" in result.stdout
    assert list(pex_root.glob("installed_wheels/*/*/pandas-*")), "the base's wheels are unpacked into PEX_ROOT"
    assert list(pex_root.rglob("pandas/__pycache__/*.pyc")), "and their bytecode compiled"
