"""Resources: the Dagster side of modelpex, a runner that builds-or-fetches and runs model pexes, and frame storage.

`ModelpexResource` is what assets and ops talk to: it resolves a deployment to a model version, builds or fetches
that version's pex (the same call behind the model-version asset and the ``build_or_fetch_model`` op), and runs
it through Dagster Pipes in its sandboxed model process (`orchestrator.runner`). Within one run, one process per
model version serves every call; the resource ends them all when the run's execution ends.
`ArrowParquetIOManager` stores frames between assets as Parquet (never pickle) and hands them back as Arrow tables,
which the transport writes into shared memory; with an object store (``s3://``) they live there, beside the states.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster import (
    AssetKey,
    ConfigurableIOManager,
    ConfigurableResource,
    InitResourceContext,
    InputContext,
    OutputContext,
    ResourceDefinition,
    resource,
)
from modelpex_runtime.transport import to_arrow
from pydantic import Field, PrivateAttr

from orchestrator.build import Builder
from orchestrator.catalog import Catalog, ModelVersion, read_released
from orchestrator.errors import ModelpexError, SpecError
from orchestrator.files import staged
from orchestrator.metadata import commit_link, human_duration, human_size
from orchestrator.pipes import dagster_link
from orchestrator.run import DEFAULT_ENV_ALLOW, Action, RunOutcome
from orchestrator.runner import Runner
from orchestrator.settings import Settings
from orchestrator.store import ArtifactRecord, PexStore, open_store
from orchestrator.versions import WebRemote, web_remote

__all__ = ["ArrowParquetIOManager", "Ensured", "FrameStore", "ModelpexResource", "StoredFrame", "set_at_load"]


@dataclass(frozen=True)
class Ensured:
    """A verified pex (the base or a model version), and whether this call built it or found (fetched) it."""

    record: ArtifactRecord
    built: bool
    seconds: float
    web: WebRemote | None = None  # the repository's web pages, for a link to the commit

    @property
    def action(self) -> str:
        return "built" if self.built else "fetched"

    @property
    def metadata(self) -> dict[str, Any]:
        r = self.record
        return {
            "model": r.name,
            "version": r.version,
            "key": r.key,
            "sha256": r.sha256,
            "pex_size": human_size(r.size),
            "base_key": r.base_key or "",
            "git_commit": commit_link(r.git_commit, self.web),
            "built_at": r.built_at,
            "action": self.action,
            "time": human_duration(self.seconds),
        }


class ModelpexResource(ConfigurableResource):
    """Builds or fetches model pexes and runs them as subprocesses against their base pex through Dagster Pipes."""

    project_dir: str = Field(
        default="", description="Repository with base_env/ and model_packages/; '' = MODELPEX_PROJECT or the cwd's."
    )
    store_url: str = Field(
        default="", description="Artifact store URL or folder; '' = MODELPEX_STORE or <project>/pex_builds."
    )
    python: str = Field(default="", description="Interpreter the pexes are built for and run with; '' = this Python.")
    pex_root: str = Field(
        default="", description="PEX_ROOT for model processes (unpacked bases, model venvs); '' = <cache>/pex_root."
    )
    timeout_seconds: float = Field(
        default=3600.0, description="A model process running longer is killed and the step fails."
    )
    env_allow: list[str] = Field(
        default=list(DEFAULT_ENV_ALLOW), description="Names copied from this process's environment into the model's."
    )
    env: dict[str, str] = Field(default={}, description="Explicit variables given to every model process.")
    released: str = Field(
        default="",
        description="Released model versions from the component's state (`dg utils refresh-defs-state`), for a "
        "checkout whose git tags cannot be read; '' = the tags alone.",
    )

    _settings: Settings | None = PrivateAttr(default=None)
    _builder: Builder | None = PrivateAttr(default=None)
    _runner: Runner | None = PrivateAttr(default=None)
    _web: tuple[WebRemote | None] | None = PrivateAttr(default=None)
    _catalog: Catalog | None = PrivateAttr(default=None)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            settings = Settings.from_env(
                project=self.project_dir or None, store_url=self.store_url or None, python=self.python or None
            )
            self._settings = dataclasses.replace(settings, pex_root=self.pex_root or settings.pex_root)
        return self._settings

    @property
    def runner(self) -> Runner:
        """This run's model processes, sandbox and state keeper: made on first use, ended with the run."""
        if self._runner is None:
            self._runner = Runner(
                self.settings,
                self.builder.interpreter,
                timeout=self.timeout_seconds,
                env_allow=self.env_allow,
                env=self.env,
            )
        return self._runner

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        self._catalog = None
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    @property
    def builder(self) -> Builder:
        if self._builder is None:
            settings = self.settings
            self._builder = settings.builder()
        return self._builder

    def catalog(self) -> Catalog:
        """The model versions as they are now (run time), not as they were when the definitions loaded."""
        released = read_released(self.released, "in the modelpex resource's config") if self.released else []
        return self.settings.catalog(released)

    def run_catalog(self) -> Catalog:
        """The model versions as this run found them first: read once per run, which has a step per model, and
        the same view for every step of it."""
        if self._catalog is None:
            self._catalog = self.catalog()
        return self._catalog

    @property
    def web(self) -> WebRemote | None:
        """The repository's web remote, looked up once per resource (one git call)."""
        if self._web is None:
            self._web = (web_remote(self.settings.project),)
        return self._web[0]

    def ensure_base(self) -> Ensured:
        """The base pex for the current base_env: built, or fetched and verified."""
        result = self.builder.base()
        self.builder.store.fetch(result.record)
        return Ensured(result.record, not result.cached, result.seconds, self.web)

    def ensure(self, version: ModelVersion, catalog: Catalog | None = None) -> Ensured:
        """Build the version's pex, or fetch and verify the one in the store when that exact key exists."""
        started = time.perf_counter()
        catalog = catalog or self.catalog()
        with tempfile.TemporaryDirectory(prefix="modelpex-export-") as exports:
            try:
                source = catalog.source(version, Path(exports))
            except SpecError as exc:
                record, built = self._stored(version, exc), False
            else:
                result = self.builder.model(source)
                record, built = result.record, not result.cached
        self.builder.store.fetch(record)
        return Ensured(record, built, time.perf_counter() - started, self.web)

    def _stored(self, version: ModelVersion, unreadable: SpecError) -> ArtifactRecord:
        """A version whose source cannot be read here (a release in a checkout without its tags): its pex as CI
        stored it, found by its content key, or an error that says where to build it."""
        key = self.builder.model_key(version.digest)
        record = self.builder.store.record("model", version.name, key, version.version)
        if record is None:
            raise ModelpexError(
                f"{version.name}@{version.version}: its source cannot be read here ({unreadable}) and the store "
                f"{self.settings.store_url} has no pex for it (key {key}): build it where its tag is, "
                f"`modelpex build {version.name}@{version.version}` with this store"
            ) from None
        return record

    def run(
        self,
        context: Any,
        record: ArtifactRecord,
        *,
        asset_key: AssetKey,
        action: Action,
        reported: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> RunOutcome:
        """One call of a model version in its model process: a Pipes session on ``context`` about ``asset_key``;
        metadata the model reports through Pipes is added to ``reported``; the model's lines name the client."""
        if self._runner is None:
            sandbox = self.runner.sandbox
            say = context.log.info if sandbox.switching and sandbox.bwrap else context.log.warning
            say(f"modelpex isolation: {sandbox.describe()}")
        return self.runner.call(
            record,
            lambda: dagster_link(context, asset_key, record.key, reported, client=kwargs.get("client") or None),
            action=action,
            **kwargs,
        )


@dataclass(frozen=True)
class StoredFrame:
    """Where a frame was written (a file, or a URL in the store) and its size in bytes."""

    where: str
    size: int


class FrameStore(ConfigurableResource):
    """Frames by asset key as Parquet files, written whole, read back memory-mapped as Arrow tables.

    In a folder on this machine by default; in the artifact store's ``frames/`` when that is an object store
    (``store_url``), so that a run on another host finds what a run on this host wrote.
    """

    base_dir: str = Field(default="", description="Folder for the Parquet files; '' = <project>/.dagster_home/frames.")
    store_url: str = Field(
        default="",
        description="An object-store URL (s3://bucket/prefix) whose frames/ holds the frames instead; '' = base_dir.",
    )

    _store: PexStore | None = PrivateAttr(default=None)

    @property
    def root(self) -> Path:
        return Path(self.base_dir) if self.base_dir else Settings.from_env().project / ".dagster_home" / "frames"

    @property
    def store(self) -> PexStore | None:
        """The object store frames live in, or ``None`` when they stay in ``root``."""
        if self.store_url and self._store is None:
            self._store = open_store(self.store_url)
        return self._store

    def path(self, key: AssetKey) -> Path:
        return self.root.joinpath(*key.path).with_suffix(".parquet")

    def save_table(self, key: AssetKey, table: pa.Table) -> StoredFrame:
        if self.store is not None:
            # N.B. A private folder: the file holds a client's data until it is uploaded.
            with tempfile.TemporaryDirectory(prefix="modelpex-frame-") as folder:
                path = Path(folder) / "frame.parquet"
                pq.write_table(table, path)
                return StoredFrame(self.store.put_frame(key.path, path), path.stat().st_size)
        path = self.path(key)
        # N.B. Every client's data: readable by the orchestrator only, never by a model process.
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)
        with staged(path) as temporary:
            pq.write_table(table, temporary)
        return StoredFrame(str(path), path.stat().st_size)

    def load_table(self, key: AssetKey) -> pa.Table:
        if self.store is not None:
            with tempfile.TemporaryDirectory(prefix="modelpex-frame-") as folder:
                path = Path(folder) / "frame.parquet"
                if not self.store.fetch_frame(key.path, path):
                    raise ModelpexError(
                        f"{key.to_user_string()} has no stored frame in {self.store.url}: materialise it first"
                    )
                # N.B. The mapping outlives the file's name: the folder can go at once.
                return pq.read_table(path, memory_map=True)
        path = self.path(key)
        if not path.is_file():
            raise ModelpexError(f"{key.to_user_string()} has no stored frame at {path}: materialise it first")
        return pq.read_table(path, memory_map=True)


class ArrowParquetIOManager(ConfigurableIOManager):
    """The IO manager over a `FrameStore`: assets return pandas, polars or Arrow frames; never pickled."""

    store: FrameStore

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        table = to_arrow(obj, context.asset_key.to_user_string())
        stored = self.store.save_table(context.asset_key, table)
        context.add_output_metadata({"path": stored.where, "parquet_size": human_size(stored.size)})

    def load_input(self, context: InputContext) -> pa.Table:
        return self.store.load_table(context.asset_key)


def set_at_load(configured: ConfigurableResource) -> ResourceDefinition:
    """``configured`` as a resource that takes no config at launch: its values are those the code location loaded.

    N.B. A configured `ConfigurableResource` offers every field in every launchpad, its value as the default, and the
    launchpad pre-fills them all: `build_model`'s opened on some twenty lines of absolute paths and environment names
    around the one choice a user makes. None of them is a per-run choice. This is Dagster's documented way to build a
    function-style resource from one (`from_resource_context_cm`), which keeps its set-up and teardown. Its schema
    is empty, not absent: a run config that still sets a field is refused, naming it, rather than ignored.
    """
    cls = type(configured)
    values = {name: getattr(configured, name) for name in cls.model_fields}

    @resource(config_schema={}, description=cls.__doc__)
    def _set_at_load(context: InitResourceContext) -> Iterator[Any]:
        with cls.from_resource_context_cm(context, nested_resources=values) as value:
            yield value

    return _set_at_load
