"""model_packages/RELEASES lists exactly the release tags of this repository, at the commits they point to."""

from __future__ import annotations

import subprocess

from .conftest import REPO


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_release_list_matches_the_tags() -> None:
    lines = (REPO / "model_packages" / "RELEASES").read_text().splitlines()
    listed = dict(line.split() for line in lines if line.strip() and not line.startswith("#"))
    tags = {tag for tag in git("tag", "--list", "*/v*").split() if tag}
    assert set(listed) == tags
    for tag, commit in listed.items():
        assert git("rev-parse", f"{tag}^{{commit}}") == commit
