"""model_packages/RELEASES lists exactly the release tags of this repository, each entry is a real release (its
commit is in this branch's history and holds that model at that version), and a clone that did not receive the tags
gets them back from the list.

N.B. .ci/setup recreates missing tags from RELEASES (`.ci/release-tags`), so in a set-up clone every listed tag
exists by construction: what can still go wrong here is a tag nobody listed, or listed at another commit. Whether the
recreation works is tested on a clone made without tags; the commit's own tree is the independent witness of a
release.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from .conftest import REPO


def git(*args: str, repo: Path = REPO) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def releases(repo: Path = REPO) -> dict[str, str]:
    lines = (repo / "model_packages" / "RELEASES").read_text().splitlines()
    return dict(line.split() for line in lines if line.strip() and not line.startswith("#"))


def tags(repo: Path = REPO) -> dict[str, str]:
    """Every release-shaped tag of ``repo`` and the commit it points at."""
    return {
        tag: git("rev-parse", f"{tag}^{{commit}}", repo=repo) for tag in git("tag", "--list", "*/v*", repo=repo).split()
    }


def test_every_release_tag_is_listed_at_its_commit() -> None:
    assert tags() == releases(), "tag a release and list it in model_packages/RELEASES (tag commit), or neither"


def test_each_release_commit_holds_its_model_version() -> None:
    assert releases(), "at least one release: clients pin it"
    for tag, commit in releases().items():
        model, version = tag.split("/v")
        merged = subprocess.run(["git", "-C", str(REPO), "merge-base", "--is-ancestor", commit, "HEAD"], check=False)
        assert merged.returncode == 0, f"{tag}: {commit} is not in this branch's history"
        project = tomllib.loads(git("show", f"{commit}:model_packages/{model}/pyproject.toml"))["project"]
        assert (project["name"], project["version"]) == (model, version), tag


def test_a_clone_without_the_tags_gets_every_listed_release_back(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-tags", str(REPO), str(clone)], check=True)
    assert tags(clone) == {}, "a clone of the branch alone"
    done = subprocess.run([str(REPO / ".ci" / "release-tags"), str(clone)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert tags(clone) == releases(clone) != {}
