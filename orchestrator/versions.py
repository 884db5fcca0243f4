"""Versions: where a model version's source comes from, the working tree or its per-model git tag.

Releases are tags named ``<model>/v<version>`` whose tree holds ``model_packages/<model>``; the working tree is
the development head. ``<model>@<version>`` builds from the working tree when it declares that version (so an
edit there is what gets built and redeployed), otherwise from the version's tag.
"""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from packaging.version import Version

from orchestrator.errors import SpecError
from orchestrator.specs import ModelRef, ModelSpec, load_model_spec, validate_name, validate_version

__all__ = ["ModelSource", "WebRemote", "git_commit", "resolve_source", "tag_name", "tagged_versions", "web_remote"]


def tag_name(model: str, version: str) -> str:
    return f"{model}/v{version}"


@dataclass(frozen=True)
class ModelSource:
    """A model version's folder on disk, and the commit it came from (``None`` outside git)."""

    spec: ModelSpec
    commit: str | None


def _git(repo: Path, *args: str, binary: bool = False) -> str | bytes | None:
    """Run git in ``repo``; ``None`` when ``repo`` is not a git work tree or the command fails."""
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, check=False, text=not binary, timeout=60
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def tagged_versions(repo: Path, model: str) -> list[str]:
    """Versions of ``model`` released as git tags, oldest first; tags that are not valid versions are skipped."""
    out = _git(repo, "tag", "--list", f"{validate_name(model)}/v*")
    versions = []
    for line in str(out or "").splitlines():
        version = line.strip().removeprefix(f"{model}/v")
        try:
            versions.append(validate_version(version, model=model))
        except SpecError:
            continue
    return sorted(versions, key=Version)


@dataclass(frozen=True)
class WebRemote:
    """The web pages of the repository's ``origin`` (GitHub's URL layout; GitLab's when the host says gitlab)."""

    url: str  # https://host/owner/repo

    @property
    def _sep(self) -> str:
        return "/-/" if "gitlab" in urlsplit(self.url).netloc else "/"

    def commit_url(self, commit: str) -> str:
        return f"{self.url}{self._sep}commit/{commit}"

    def tree_url(self, ref: str, path: str) -> str:
        return f"{self.url}{self._sep}tree/{ref}/{path}"


_SCP_LIKE = re.compile(r"^(?:[\w.-]+@)?([\w.-]+):(?!//)(.+)$")


def web_remote(repo: Path) -> WebRemote | None:
    """``origin`` as web pages (``git@github.com:o/r.git`` -> ``https://github.com/o/r``); ``None`` without one.

    N.B. Credentials in an https remote are dropped: the address ends up in the UI.
    """
    remote = str(_git(repo, "remote", "get-url", "origin") or "").strip()
    if not remote:
        return None
    parts = urlsplit(remote)
    if parts.scheme in ("https", "http", "ssh", "git") and parts.hostname:
        host, path = parts.hostname, parts.path
    elif match := _SCP_LIKE.match(remote):
        host, path = match.group(1), "/" + match.group(2)
    else:
        return None  # N.B. A local path or file:// remote has no web pages.
    path = path.rstrip("/").removesuffix(".git")
    return WebRemote(f"https://{host}{path}") if path.strip("/") else None


def git_commit(folder: Path) -> str | None:
    """HEAD's commit, suffixed ``+dirty`` when ``folder`` has uncommitted changes; ``None`` outside git."""
    head = _git(folder, "rev-parse", "HEAD")
    if head is None:
        return None
    dirty = _git(folder, "status", "--porcelain", "--", ".")
    return str(head).strip() + ("+dirty" if dirty else "")


def resolve_source(repo: Path, models_dir: Path, ref: ModelRef, export_root: Path) -> ModelSource:
    """Find the folder that holds ``ref``: the working tree when it is that version, else its exported git tag."""
    folder = models_dir / ref.name
    if not folder.is_dir():
        raise SpecError(_unknown_model(ref.name, models_dir))
    spec = load_model_spec(folder)
    if ref.version is None or spec.version == ref.version:
        return ModelSource(spec, git_commit(folder))
    tag = tag_name(ref.name, ref.version)
    commit = _git(repo, "rev-list", "-n", "1", f"refs/tags/{tag}")
    if commit:
        return ModelSource(_export_tag(repo, models_dir, ref, export_root), str(commit).strip())
    known = sorted({*tagged_versions(repo, ref.name), spec.version}, key=Version)
    raise SpecError(
        f"model {ref.name!r} has no version {ref.version}: known versions are {', '.join(known)} "
        f"(release one with `git tag {tag}`)"
    )


def _unknown_model(name: str, models_dir: Path) -> str:
    known = (
        sorted(p.name for p in models_dir.iterdir() if (p / "pyproject.toml").is_file()) if models_dir.is_dir() else []
    )
    return f"unknown model {name!r}: no folder {models_dir / name} (known models: {', '.join(known) or 'none'})"


def _extract(tar: tarfile.TarFile, destination: Path, tag: str) -> None:
    """Extract with the "data" filter; Pythons before 3.11.4 lack it, so check the members ourselves there."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(destination, filter="data")
        return
    for member in tar.getmembers():
        name = Path(member.name)
        if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
            raise SpecError(f"git tag {tag} holds {member.name!r}, which is not a plain file or folder inside it")
    tar.extractall(destination)  # noqa: S202 - every member was checked above


def _export_tag(repo: Path, models_dir: Path, ref: ModelRef, export_root: Path) -> ModelSpec:
    tag = tag_name(ref.name, ref.version or "")
    top = _git(repo, "rev-parse", "--show-toplevel")
    relative = (models_dir / ref.name).resolve().relative_to(Path(str(top).strip()).resolve())
    archive = _git(repo, "archive", "--format=tar", f"refs/tags/{tag}:{relative.as_posix()}", binary=True)
    if not archive:
        raise SpecError(f"git tag {tag} has no folder {relative}: tag a commit that contains the model")
    destination = export_root / f"{ref.name}-v{ref.version}" / ref.name
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:  # type: ignore[arg-type]
        _extract(tar, destination, tag)
    spec = load_model_spec(destination)
    if spec.version != ref.version:
        raise SpecError(f"git tag {tag} holds {ref.name} version {spec.version}, not {ref.version}: fix the tag")
    return spec
