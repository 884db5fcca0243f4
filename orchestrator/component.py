"""modelpex as a Dagster Component: an existing Dagster project adds a model repository with one ``defs.yaml``.

    dg scaffold defs orchestrator.component.ModelpexComponent models --project ../model-repo

writes ``defs/models/defs.yaml``::

    type: orchestrator.component.ModelpexComponent
    attributes:
      project: ../model-repo          # the folder with base_env/, model_packages/ and deployments.yaml
      store: s3://bucket/prefix       # optional: MODELPEX_STORE, or <project>/pex_builds

The component builds exactly what `orchestrator.definitions.build_definitions` builds for that repository (the
code location in workspace.yaml uses the same function), so YAML and Python stay one product.

Released versions are the component's state (a `StateBackedComponent`): `dg utils refresh-defs-state` records each
release tag's version, content digest and prediction contract where the tags are (CI, a developer's clone), and
definitions load from that record where they are not, such as an image built without `.git`. There a client
pinned to a release runs the pex CI stored for it, found in the store by its content key. Where the tags can be
read they still win, so a release tagged after the last refresh appears at the next reload; `dg dev` and the other
`dg` commands refresh the state as they load (`defs_state: {refresh_if_dev: false}` turns that off).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import dagster as dg
from dagster.components import DefsStateConfig, DefsStateConfigArgs, ResolvedDefsStateConfig
from dagster.components.component_scaffolding import scaffold_component
from pydantic import BaseModel

from orchestrator.catalog import has_history, read_released, released_json
from orchestrator.definitions import build_definitions
from orchestrator.errors import SpecError
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


def _relative_to_yaml(context: dg.ResolutionContext, value: str | None) -> str | None:
    """A folder given relative to its defs.yaml, made absolute; a URL (s3://...) as it is."""
    if not value or "://" in value:
        return value
    return str(context.resolve_source_relative_path(value))


@dg.scaffold_with(ModelpexScaffolder)
@dataclass
class ModelpexComponent(dg.StateBackedComponent, dg.Resolvable):
    """Every model version, every client's deployment, their automation and sensors, from one model repository.

    Model versions come from the repository's working tree and its git tags (`<model>/v<version>`), and from the
    component's state where the tags cannot be read; which client runs which version, with which parameters, data
    and schedules, from its ``deployments.yaml``.
    """

    project: Annotated[
        str | None,
        dg.Resolver(
            _relative_to_yaml,
            model_field_type=str | None,
            description="The model repository (base_env/, model_packages/, deployments.yaml), relative to this "
            "defs.yaml or absolute; default MODELPEX_PROJECT, else the repository around the working directory.",
            examples=["../model-repo", "/srv/models"],
        ),
    ] = None
    store: Annotated[
        str | None,
        dg.Resolver(
            _relative_to_yaml,
            model_field_type=str | None,
            description="Artifact store URL or folder; default MODELPEX_STORE, else <project>/pex_builds.",
            examples=["pex_builds", "s3://bucket/modelpex"],
        ),
    ] = None
    defs_state: ResolvedDefsStateConfig = field(default_factory=DefsStateConfigArgs.local_filesystem)

    def settings(self) -> Settings:
        return Settings.from_env(project=self.project, store_url=self.store)

    @property
    def defs_state_config(self) -> DefsStateConfig:
        """N.B. The key does not depend on where the repository is: the state written in CI's clone is read in the
        image. A project with two model repositories gives each its own `defs_state: {key: ...}`."""
        return DefsStateConfig.from_args(self.defs_state, default_key="ModelpexComponent")

    def write_state_to_path(self, state_path: Path) -> None:
        """The released versions, read from the tags; refused where there are none to read, rather than written
        empty over the last good state."""
        settings = self.settings()
        if not has_history(settings.project):
            raise SpecError(
                f"cannot refresh modelpex's state: {settings.project} has no git history, so its release tags "
                "cannot be read: refresh where they are (CI, a clone) and ship the state with the code"
            )
        state_path.write_text(released_json(settings.catalog().released()))

    def build_defs_from_state(self, context: dg.ComponentLoadContext, state_path: Path | None) -> dg.Definitions:
        released = read_released(state_path.read_text(), str(state_path)) if state_path else []
        return build_definitions(self.settings(), released=released)
