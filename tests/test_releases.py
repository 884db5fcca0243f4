"""model_packages/RELEASES lists exactly the release tags of this repository, and each entry is a real release:
its commit is in this branch's history and holds that model at that version.

N.B. .ci/setup recreates missing tags from RELEASES, so tags and list agreeing proves little alone; the commit's own
tree is the independent witness.
"""

from __future__ import annotations

import subprocess
import tomllib

from .conftest import REPO


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def releases() -> dict[str, str]:
    lines = (REPO / "model_packages" / "RELEASES").read_text().splitlines()
    return dict(line.split() for line in lines if line.strip() and not line.startswith("#"))


def test_release_list_matches_the_tags() -> None:
    listed = releases()
    assert set(listed) == {tag for tag in git("tag", "--list", "*/v*").split() if tag}
    for tag, commit in listed.items():
        assert git("rev-parse", f"{tag}^{{commit}}") == commit


def test_each_release_commit_holds_its_model_version() -> None:
    assert releases(), "at least one release: clients pin it"
    for tag, commit in releases().items():
        model, version = tag.split("/v")
        merged = subprocess.run(["git", "-C", str(REPO), "merge-base", "--is-ancestor", commit, "HEAD"], check=False)
        assert merged.returncode == 0, f"{tag}: {commit} is not in this branch's history"
        project = tomllib.loads(git("show", f"{commit}:model_packages/{model}/pyproject.toml"))["project"]
        assert (project["name"], project["version"]) == (model, version), tag
