"""Catalog: every model version that exists, from the working tree, the per-model git tags and the store's release
records, with its digest.

Definitions, the redeploy sensor and ``modelpex build --all`` all need "which versions exist and what is their
content". The store is the registry of releases: a version published into it (`modelpex build`, which CI runs on a
release tag) is known to every host that reads the store, with or without git. Tags stay the source where they can
be read, and a tag and a release record of one version with different content is an error naming both.

Released tags are immutable, so a tag's digest is cached by its git tree id: loading the catalog of a hundred models
costs a couple of git calls and the hashing of the working trees, not an export of every tag.
A tag whose folder is not a valid model of that version, or a working-tree folder that is not a valid model, is
skipped with a warning, not fatal to every definition.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from packaging.version import Version

from orchestrator.errors import ModelpexWarning, SpecError
from orchestrator.specs import (
    ModelRef,
    ModelSpec,
    PredictionContract,
    scan_models,
    tree_digest,
    validate_name,
    validate_version,
    warn_broken,
)
from orchestrator.store import PexStore, ReleaseRecord
from orchestrator.versions import ModelSource, resolve_source, tag_name

__all__ = [
    "LATEST",
    "Catalog",
    "ModelVersion",
    "Published",
    "has_history",
    "published_versions",
    "read_released",
    "release_record",
    "released_json",
]

LATEST = "latest"
# N.B. Part of each cache key: entries of an older format (a bare digest) are recomputed, not misread.
_CACHE_FORMAT = "v2"
_STATE_FORMAT = "modelpex-released-v1"


@dataclass(frozen=True)
class ModelVersion:
    """One version of one model, the digest of its folder's content, and what it promises about its predictions."""

    name: str
    version: str
    digest: str
    origin: Literal["tag", "working tree", "store"]
    predictions: PredictionContract = PredictionContract()
    description: str = ""
    commit: str | None = None  # the commit it was published from, when the store says

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.version)

    @property
    def slug(self) -> str:
        """The version as a Dagster asset key part: ``1.2.0`` -> ``v1_2_0``."""
        return "v" + "".join(c if c.isalnum() else "_" for c in self.version)


def _tag_trees(project: Path, models_dir: Path) -> dict[tuple[str, str], str]:
    """(model, version) -> git tree id of ``model_packages/<model>`` at tag ``<model>/v<version>``."""
    try:
        relative = models_dir.resolve().relative_to(project.resolve()).as_posix()
        out = subprocess.run(
            ["git", "-C", str(project), "for-each-ref", "refs/tags", "--format=%(refname:strip=2)"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.split()
    except (ValueError, OSError, subprocess.SubprocessError):
        return {}
    tags = []
    for tag in out:
        name, sep, version = tag.partition("/v")
        if sep and (models_dir / name).is_dir():
            try:
                tags.append((name, validate_version(version, model=name)))
            except SpecError:
                continue
    if not tags:
        return {}
    paths = [f"refs/tags/{name}/v{version}^{{commit}}:{relative}/{name}" for name, version in tags]
    done = subprocess.run(["git", "-C", str(project), "rev-parse", *paths], capture_output=True, text=True, timeout=60)
    trees = done.stdout.split()
    if done.returncode != 0 or len(trees) != len(tags):  # N.B. A tag without the folder: resolve one by one.
        return {t: tree for t, p in zip(tags, paths, strict=True) if (tree := _rev_parse(project, p))}
    return dict(zip(tags, trees, strict=True))


def _rev_parse(project: Path, spec: str) -> str | None:
    done = subprocess.run(["git", "-C", str(project), "rev-parse", spec], capture_output=True, text=True, timeout=60)
    return done.stdout.strip() if done.returncode == 0 else None


NO_HISTORY = (
    "so released versions come from the store (publish one with `modelpex build MODEL@VERSION` where its tag is) or "
    "the component's state (`dg utils refresh-defs-state` where the tags are)"
)


@dataclass(frozen=True)
class Published:
    """A model version as the store's release record describes it, and where that record is (for messages)."""

    version: ModelVersion
    where: str


def published_versions(store: PexStore) -> list[Published]:
    """Every version published into ``store``; a record that cannot be trusted is skipped with a warning naming it."""
    scan = store.releases()
    for problem in scan.problems.values():
        warnings.warn(f"ignoring a release record: {problem}", ModelpexWarning, stacklevel=2)
    found = []
    for record, where in scan.records:
        try:
            contract = PredictionContract.from_json(record.predictions)
        except (SpecError, ValueError, TypeError, KeyError, AttributeError) as exc:
            message = f"ignoring release record {where}: its predictions are not valid ({exc})"
            warnings.warn(message, ModelpexWarning, stacklevel=2)
            continue
        version = ModelVersion(
            record.name, record.version, record.digest, "store", contract, record.description, record.git_commit
        )
        found.append(Published(version, where))
    return found


def release_record(spec: ModelSpec, source: Literal["tag", "working tree"], commit: str | None) -> ReleaseRecord:
    """The release record of a model version whose source is at hand (a tag's export or the working tree)."""
    return ReleaseRecord(
        name=spec.name,
        version=spec.version,
        digest=tree_digest(spec.folder),
        predictions=spec.predictions.to_json(),
        description=spec.description,
        git_commit=commit,
        source=source,
    )


def has_history(project: Path) -> bool:
    done = subprocess.run(["git", "-C", str(project), "rev-parse", "--git-dir"], capture_output=True, timeout=60)
    return done.returncode == 0


def released_json(versions: Sequence[ModelVersion]) -> str:
    """The released versions as the component's state: enough to declare their assets and to find their pexes in
    the store by key, where the tags cannot be read."""
    entries = [
        {"name": v.name, "version": v.version, "digest": v.digest, "predictions": v.predictions.to_json()}
        for v in versions
    ]
    return json.dumps({"format": _STATE_FORMAT, "released": entries}, indent=1, sort_keys=True)


def read_released(text: str, where: str) -> list[ModelVersion]:
    """Released versions from ``released_json``, each validated: a bad state is refused whole, naming ``where``."""
    fix = "write it again with `dg utils refresh-defs-state`"
    try:
        data = json.loads(text)
        if data.get("format") != _STATE_FORMAT:
            raise SpecError(f"format {data.get('format')!r} is not {_STATE_FORMAT!r}")
        versions = []
        for entry in data["released"]:
            name = validate_name(str(entry["name"]))
            version = validate_version(str(entry["version"]), model=name)
            digest = str(entry["digest"])
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise SpecError(f"{name}@{version}: digest {digest!r} is not a sha256")
            contract = PredictionContract.from_json(entry["predictions"])
            versions.append(ModelVersion(name, version, digest, "tag", contract))
        return versions
    except (SpecError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SpecError(f"modelpex state {where} is not valid ({exc}): {fix}") from None


class Catalog:
    """Model name -> version -> `ModelVersion`; the working tree describes its own version, tags the others."""

    def __init__(
        self,
        project: Path,
        models_dir: Path,
        cache_file: Path | None = None,
        released: Sequence[ModelVersion] = (),
        published: Sequence[Published] = (),
        store_url: str = "",
    ) -> None:
        """``published``: the store's release records, known to every host; ``released``: versions recorded where
        the tags were readable (the component's state). Both stand in for tags this checkout lacks, such as an
        image without ``.git``; a tag read here wins, and must have the content its release record says."""
        self.project, self.models_dir, self.cache_file, self.store_url = project, models_dir, cache_file, store_url
        specs, broken = scan_models(models_dir)
        warn_broken(broken)
        self.specs: dict[str, ModelSpec] = {spec.name: spec for spec in specs}
        # N.B. Folder name -> why it is not a model: skipped here, and gc keeps whatever the store holds of them.
        self.broken: dict[str, SpecError] = {folder.name: exc for folder, exc in broken.items()}
        self.versions: dict[str, dict[str, ModelVersion]] = {name: {} for name in self.specs}
        for (name, version), (digest, contract) in self._tag_versions().items():
            self.versions[name][version] = ModelVersion(name, version, digest, "tag", contract)
        for p in published:
            v = p.version
            if v.name not in self.specs or v.version == self.specs[v.name].version:
                continue  # N.B. The working tree describes its own version (the development head).
            tagged = self.versions[v.name].get(v.version)
            if tagged is not None and tagged.digest != v.digest:
                raise SpecError(
                    f"{v.name}@{v.version}: git tag {tag_name(v.name, v.version)} has content digest "
                    f"{tagged.digest[:12]} but the store's release record {p.where} has {v.digest[:12]} (commit "
                    f"{v.commit or 'unknown'}): publish the tag's content with `modelpex build {v.name}@{v.version} "
                    "--force`, or release the other content as a new version"
                )
            self.versions[v.name].setdefault(v.version, v)
        for v in released:
            if v.name in self.specs and v.version != self.specs[v.name].version:
                self.versions[v.name].setdefault(v.version, v)
        for name, spec in self.specs.items():
            self.versions[name][spec.version] = ModelVersion(
                name, spec.version, tree_digest(spec.folder), "working tree", spec.predictions
            )

    def _tag_versions(self) -> dict[tuple[str, str], tuple[str, PredictionContract]]:
        """(model, version) -> (digest, prediction contract) of every valid release tag, cached by git tree id."""
        trees = _tag_trees(self.project, self.models_dir)
        cache = {key: entry for key, entry in self._read_cache().items() if key.endswith(f" {_CACHE_FORMAT}")}
        found = {}
        for (name, version), tree in trees.items():
            if name not in self.specs or self.specs[name].version == version:
                continue  # N.B. The working tree describes its own version; a broken one is skipped whole.
            key = f"{tree} {version} {_CACHE_FORMAT}"
            if key not in cache:
                cache[key] = self._tag_entry(name, version)
            if cache[key]:
                entry = cache[key]
                found[(name, version)] = (entry["digest"], PredictionContract.from_json(entry["predictions"]))
        self._write_cache(cache)
        return found

    def _tag_entry(self, name: str, version: str) -> dict[str, Any] | None:
        """A tag's digest and prediction contract; ``None`` (remembered, so warned about once) for an invalid tag."""
        with tempfile.TemporaryDirectory(prefix="modelpex-catalog-") as tmp:
            try:
                source = resolve_source(self.project, self.models_dir, ModelRef(name, version), Path(tmp))
            except SpecError as exc:
                warnings.warn(f"ignoring git tag {name}/v{version}: {exc}", ModelpexWarning, stacklevel=2)
                return None
            return {"digest": tree_digest(source.spec.folder), "predictions": source.spec.predictions.to_json()}

    def _read_cache(self) -> dict[str, Any]:
        try:
            return json.loads(self.cache_file.read_text()) if self.cache_file else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def _write_cache(self, cache: dict[str, Any]) -> None:
        if self.cache_file is None or cache == self._read_cache():
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        staged = self.cache_file.with_name(f".{self.cache_file.name}.{os.getpid()}")
        staged.write_text(json.dumps(cache, indent=1, sort_keys=True))
        staged.replace(self.cache_file)

    def all(self) -> list[ModelVersion]:
        """Every version of every model, by model name then version order."""
        return [v for name in sorted(self.versions) for v in self.ordered(name)]

    def ordered(self, model: str) -> list[ModelVersion]:
        return sorted(self.versions.get(model, {}).values(), key=lambda v: Version(v.version))

    def newest(self, model: str) -> ModelVersion:
        versions = self.ordered(model)
        if not versions:
            raise SpecError(f"unknown model {model!r}: known models are {', '.join(sorted(self.versions)) or 'none'}")
        return versions[-1]

    def resolve(self, model: str, wanted: str) -> ModelVersion:
        """An exact version, or the newest for ``latest``; unknown ones name what exists."""
        if wanted == LATEST:
            return self.newest(model)
        found = self.versions.get(model, {}).get(wanted)
        if found is None:
            known = ", ".join(v.version for v in self.ordered(model)) or "none"
            store = f" nor the store {self.store_url}" if self.store_url else ""
            if has_history(self.project):
                hint = (
                    f"neither git{store} has it: release it with `git tag {tag_name(model, wanted)}` and publish it "
                    f"with `modelpex build {model}@{wanted}`"
                )
            else:
                hint = f"{self.project} has no git history, {NO_HISTORY.replace('MODEL@VERSION', f'{model}@{wanted}')}"
            raise SpecError(f"model {model!r} has no version {wanted!r}: known versions are {known}; {hint}")
        return found

    def released(self) -> list[ModelVersion]:
        """The versions that are git tags, as the component's state records them."""
        return [v for v in self.all() if v.origin == "tag"]

    def source(self, version: ModelVersion, export_root: Path) -> ModelSource:
        return resolve_source(self.project, self.models_dir, version.ref, export_root)
