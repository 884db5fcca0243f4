"""The store is the registry of releases: a version published into it (`modelpex build`, what CI runs on a release
tag) is known to every host that reads the store, with or without git, and it never disagrees silently with a tag.

The image ships a tree exported from git (`git archive`, as the Dockerfile's COPY sees it), with no `.git`: there,
every client of the repository's own deployments.yaml loads, and the client pinned to churn 1.0.0 (a release tag
only) runs the pex CI published for it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from dagster import AssetKey, AssetSelection, DagsterInstance

from orchestrator.catalog import Catalog, published_versions
from orchestrator.definitions import build_definitions
from orchestrator.deployments import load_deployments
from orchestrator.errors import ModelpexError, SpecError
from orchestrator.settings import Settings
from orchestrator.store import LocalPexStore, ReleaseRecord

from .conftest import REPO, Project
from .test_dagster import client, m_model, write_deployments


def exported_tree(destination: Path) -> Path:
    """The repository at HEAD as `git archive` exports it (what an image is built from): no `.git`."""
    destination.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", "HEAD"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive.stdout, check=True)
    assert not (destination / ".git").exists()
    return destination


def test_a_tree_without_git_loads_every_deployment_from_the_store_and_runs_a_pinned_client(
    store: LocalPexStore, cli, tmp_path: Path
) -> None:
    published = cli("build", "--all", env={"MODELPEX_PROJECT": str(REPO)}, timeout=900)
    assert published.returncode == 0, published.stderr
    versions = {(r.name, r.version) for r, _ in store.releases().records}
    assert ("churn", "1.0.0") in versions and ("churn", "1.1.0") in versions, versions

    tree = exported_tree(tmp_path / "image")
    settings = Settings.from_env(project=str(tree), store_url=str(store.root))
    catalog = settings.catalog()
    assert catalog.versions["churn"]["1.0.0"].origin == "store"
    assert catalog.versions["churn"]["1.0.0"].commit, "the record keeps the commit it was released from"
    deployments = load_deployments(tree / "deployments.yaml", catalog)
    defs = build_definitions(settings)
    keys = defs.resolve_asset_graph().get_all_asset_keys()
    for d in deployments.all():
        assert AssetKey([d.client, f"{d.client}_{d.model}_predictions"]) in keys, d.where
    assert AssetKey(["model", "churn", "churn_v1_0_0"]) in keys

    churn = AssetSelection.assets(
        ["acme", "customers"], ["acme", "acme_churn_state"], ["acme", "acme_churn_predictions"]
    )
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance, asset_selection=sorted(churn.resolve(defs.resolve_asset_graph()))
        )
        assert result.success
        event = instance.get_latest_materialization_event(AssetKey(["acme", "acme_churn_state"]))
        meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    assert meta["model_version"] == "1.0.0" and meta["pex"] == "fetched", meta


def _tagged_and_published(project: Project, store: LocalPexStore, cli) -> None:
    m_model(project, "1.0.0")
    project.commit_and_tag("m 1.0.0", "m/v1.0.0")
    m_model(project, "1.1.0")
    write_deployments(project, {"acme": client("1.0.0"), "globex": client("latest")})
    project.commit_and_tag("m 1.1.0 in the tree")
    built = cli("build", "m@1.0.0", "m")
    assert built.returncode == 0, built.stderr


def test_a_release_record_that_disagrees_with_its_tag_is_one_line_naming_both(
    project: Project, store: LocalPexStore, cli
) -> None:
    _tagged_and_published(project, store, cli)
    record = store.release("m", "1.0.0")
    assert record is not None and record.source == "tag"
    assert store.release("m", "1.1.0").source == "working tree"

    other = ReleaseRecord("m", "1.0.0", "0" * 64, record.predictions, git_commit="feedface")
    with pytest.raises(ModelpexError, match="never changes"):
        store.publish_release(other)  # N.B. Refused: a release does not change under anyone.
    store.publish_release(other, replace=True)

    done = cli("build", "--all")
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    where = str(store.root / "releases" / "m" / "1.0.0.json")
    assert "git tag m/v1.0.0" in lines[0] and where in lines[0] and "000000000000" in lines[0], lines[0]
    assert "modelpex build m@1.0.0 --force" in lines[0]

    fixed = cli("build", "m@1.0.0", "--force")
    assert fixed.returncode == 0, fixed.stderr
    assert store.release("m", "1.0.0").digest == record.digest
    assert cli("build", "--all").returncode == 0


def test_a_version_neither_git_nor_the_store_has_names_the_command_that_publishes_it(
    project: Project, store: LocalPexStore, cli, tmp_path: Path
) -> None:
    _tagged_and_published(project, store, cli)
    write_deployments(project, {"acme": client("1.0.0"), "initech": client("1.2.0")})
    settings = Settings.from_env(project=str(project.root), store_url=str(store.root))
    with pytest.raises(SpecError) as raised:
        build_definitions(settings)
    message = str(raised.value)
    assert "\n" not in message and "has no version '1.2.0'" in message, message
    assert "git tag m/v1.2.0" in message and "modelpex build m@1.2.0" in message, message

    subprocess.run(["rm", "-rf", str(project.root / ".git")], check=True)
    with pytest.raises(SpecError) as raised:
        build_definitions(settings)
    message = str(raised.value)
    assert "\n" not in message and "has no git history" in message and "modelpex build m@1.2.0" in message, message

    write_deployments(project, {"acme": client("1.0.0")})
    catalog = settings.catalog()
    assert catalog.versions["m"]["1.0.0"].origin == "store"
    assert [p.version.version for p in published_versions(store)] == ["1.0.0", "1.1.0"]
    assert isinstance(catalog, Catalog)
