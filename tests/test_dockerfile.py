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
def test_the_documented_shm_size_runs_what_dockers_default_refuses_in_one_line(sized_model: dict) -> None:  # noqa: F811
    """The `docker run` the Dockerfile documents gives /dev/shm room for a call that Docker's default 64 MB refuses,
    and that refusal names the flag: each measured on a /dev/shm of the size in question (a private tmpfs)."""
    (documented,) = re.findall(r"^#\s+docker run .*--shm-size=(\S+)", (REPO / "Dockerfile").read_text(), re.M)
    call = {"in_mib": 48, "out_mib": 28}
    (refused, _) = in_small_shm("64m", sized_model, [call])
    assert refused.get("error") == "ShmSpaceError" and "--shm-size" in refused["message"], refused
    assert "\n" not in refused["message"]
    (ran, _) = in_small_shm(documented, sized_model, [call])
    assert ran.get("error") is None and ran["rows"] == 28 << 17, ran


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
