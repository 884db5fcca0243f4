"""modelpex as a Dagster Component: an existing Dagster project adds a model repository with one ``defs.yaml``.

    dg scaffold defs orchestrator.component.ModelpexComponent models --project ../model-repo

writes ``defs/models/defs.yaml``::

    type: orchestrator.component.ModelpexComponent
    attributes:
      project: ../model-repo          # the folder with base_env/, model_packages/ and deployments.yaml
      store: s3://bucket/prefix       # optional: MODELPEX_STORE, or <project>/pex_builds

The component builds exactly what `orchestrator.definitions.build_definitions` builds for that repository (the
code location in workspace.yaml uses the same function), so YAML and Python stay one product.

N.B. Not (yet) a `StateBackedComponent`. Its state would be the catalog: every model version with its content key,
from the working tree, the release tags and the store. Today the catalog is read from the repository at each load
(a few git calls; tag digests are cached by git tree id: 10 ms for this repository), which needs the model sources
and their tags wherever definitions load. That holds on a developer's machine and in CI; it does not in an image
without `.git`, where released versions that clients pin cannot be resolved. Building definitions from state written
by `dg utils refresh-defs-state` where git is (CI, the image build), with versions found in the store, is the fit for
that case and the next step. New versions still appear without a manual step: the redeploy sensor reloads the code
location when the tree changes (orchestrator/sensors.py).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import dagster as dg
from dagster.components.component_scaffolding import scaffold_component
from pydantic import BaseModel

from orchestrator.definitions import build_definitions
from orchestrator.settings import Settings

__all__ = ["ModelpexComponent"]


class ModelpexScaffoldParams(BaseModel):
    project: str | None = None  # the model repository, relative to the new defs folder


class ModelpexScaffolder(dg.Scaffolder[ModelpexScaffoldParams]):
    """``dg scaffold defs ... --project PATH``: a defs.yaml that points at an existing model repository."""

    @classmethod
    def get_scaffold_params(cls) -> type[ModelpexScaffoldParams]:
        return ModelpexScaffoldParams

    def scaffold(self, request: dg.ScaffoldRequest[ModelpexScaffoldParams]) -> None:
        scaffold_component(request, {"project": request.params.project or "."})


@dg.scaffold_with(ModelpexScaffolder)
@dataclass
class ModelpexComponent(dg.Component, dg.Resolvable):
    """Every model version, every client's deployment, their jobs, schedules and sensors, from one model repository.

    Model versions come from the repository's working tree and its git tags (`<model>/v<version>`); which client
    runs which version, with which parameters, data and schedules, from its ``deployments.yaml``.
    """

    project: Annotated[
        str | None,
        dg.Resolver.default(
            description="The model repository (base_env/, model_packages/, deployments.yaml), relative to this "
            "defs.yaml or absolute; default MODELPEX_PROJECT, else the repository around the working directory.",
            examples=["../model-repo", "/srv/models"],
        ),
    ] = None
    store: Annotated[
        str | None,
        dg.Resolver.default(
            description="Artifact store URL or folder; default MODELPEX_STORE, else <project>/pex_builds.",
            examples=["pex_builds", "s3://bucket/modelpex"],
        ),
    ] = None

    def settings(self, context: dg.ComponentLoadContext) -> Settings:
        folder = Path(context.path if context.path.is_dir() else context.path.parent)
        store = self.store
        if store and "://" not in store:
            store = str((folder / store).resolve())
        project = str((folder / self.project).resolve()) if self.project else None
        return Settings.from_env(project=project, store_url=store)

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return build_definitions(self.settings(context))
