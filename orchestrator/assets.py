"""Assets: factories that turn the catalog and deployments.yaml into Dagster assets, and the build-or-fetch op.

- ``modelpex/base``: the base pex (code version: its content key).
- ``model/<name>/v<version>``: one per model version that exists; materialising builds it or fetches it.
- ``<client>/<dataset>``: a client's input data, small and replaceable.
- ``<client>/<model>/state`` and ``<client>/<model>/predictions``: training at run time, then inference; one
  subsettable multi-asset per client, so a client's step runs exactly the models selected.
"""

import time
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetObservation,
    AssetsDefinition,
    AssetSpec,
    Config,
    MaterializeResult,
    MetadataValue,
    OpExecutionContext,
    Output,
    asset,
    multi_asset,
    op,
)

from orchestrator.catalog import ModelVersion
from orchestrator.datasets import load_dataset
from orchestrator.deployments import ClientDeployment, DatasetSource, ModelDeployment
from orchestrator.errors import ModelpexError
from orchestrator.resources import Ensured, FrameStore, ModelpexResource
from orchestrator.run import RunOutcome

__all__ = [
    "BASE_KEY",
    "ModelRunFailures",
    "base_asset",
    "build_or_fetch_model",
    "client_asset",
    "dataset_asset",
    "dataset_key",
    "model_version_asset",
    "model_version_key",
    "predictions_key",
    "state_key",
]

BASE_GROUP, VERSIONS_GROUP, VERSIONS_PREFIX = "modelpex", "models", "model"  # N.B. RESERVED_CLIENT_NAMES
BASE_KEY = AssetKey([BASE_GROUP, "base"])
PREVIEW_ROWS = 5
MAX_ERROR_CHARS = 4000


def model_version_key(version: ModelVersion) -> AssetKey:
    return AssetKey([VERSIONS_PREFIX, version.name, version.slug])


def dataset_key(client: str, dataset: str) -> AssetKey:
    return AssetKey([client, dataset])


def state_key(deployment: ModelDeployment) -> AssetKey:
    return AssetKey([deployment.client, deployment.model, "state"])


def predictions_key(deployment: ModelDeployment) -> AssetKey:
    return AssetKey([deployment.client, deployment.model, "predictions"])


def preview(table: pa.Table, rows: int = PREVIEW_ROWS) -> MetadataValue:
    """The first rows as a Markdown table, for the materialisation page."""
    head = table.slice(0, rows).to_pylist()
    lines = ["| " + " | ".join(table.column_names) + " |", "|" + " --- |" * table.num_columns]
    lines += [
        "| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |" for row in head
    ]
    return MetadataValue.md("\n".join(lines))


def _run_metadata(outcome: RunOutcome, ensured: Ensured, started: float) -> dict[str, Any]:
    """What a call did; ``orchestrator_seconds`` is the step's own time for it: everything but the model's code
    and, on the call that started it, the model process's start (its imports)."""
    model_seconds = sum(outcome.model_seconds.values())
    return {
        "model": ensured.record.name,
        "model_version": ensured.record.version,
        "model_key": ensured.record.key,
        "pex": ensured.metadata["action"],
        "rows_in": sum(outcome.rows_in.values()),
        "rows_out": sum(outcome.rows_out.values()),
        "bytes_moved": outcome.bytes_moved,
        "transport_seconds": round(outcome.transport_seconds, 4),
        "model_seconds": round(model_seconds, 4),
        "wall_seconds": round(outcome.wall_seconds, 3),
        "orchestrator_seconds": round(time.perf_counter() - started - model_seconds - outcome.start_seconds, 4),
        "process_start_seconds": round(outcome.start_seconds, 3),
    }


def base_asset(base_key: str) -> AssetsDefinition:
    @asset(key=BASE_KEY, code_version=base_key, group_name=BASE_GROUP, kinds={"pex"})
    def _base(modelpex: ModelpexResource) -> MaterializeResult:
        """The shared base pex (numpy, pandas, polars, pyarrow, scikit-learn, dagster-pipes, the runtime)."""
        ensured = modelpex.ensure_base()
        return MaterializeResult(metadata={**ensured.metadata, "interpreter": ensured.record.interpreter})

    return _base


def model_version_asset(version: ModelVersion, code_version: str) -> AssetsDefinition:
    @asset(
        key=model_version_key(version),
        deps=[BASE_KEY],
        code_version=code_version,
        group_name=VERSIONS_GROUP,
        kinds={"pex"},
        tags={"model": version.name, "version": version.version},
        description=f"The pex of {version.name} {version.version} (from its {version.origin}).",
    )
    def _model_version(modelpex: ModelpexResource) -> MaterializeResult:
        return MaterializeResult(metadata=modelpex.ensure(version).metadata)

    return _model_version


class ModelVersionConfig(Config):
    model: str
    version: str = "latest"


@op(description="Build a model version's pex, or fetch and verify it when that exact key is in the store.")
def build_or_fetch_model(
    context: OpExecutionContext, config: ModelVersionConfig, modelpex: ModelpexResource
) -> dict[str, Any]:
    catalog = modelpex.catalog()
    ensured = modelpex.ensure(catalog.resolve(config.model, config.version), catalog)
    context.log.info(f"{ensured.metadata['action']} {ensured.record.label} (key {ensured.record.key})")
    return ensured.metadata


def dataset_asset(source: DatasetSource) -> AssetsDefinition:
    origin = f"generated ({source.generate})" if source.generate else f"read from {source.path}"

    @asset(
        key=dataset_key(source.client, source.name),
        group_name=source.client,
        io_manager_key="frames",
        kinds={"parquet"},
        tags={"client": source.client},
        description=f"{source.client}'s {source.name}, {origin}. Replace it to point at real data.",
    )
    def _dataset() -> Output[pa.Table]:
        table = load_dataset(source.generate, source.path, dict(source.options))
        return Output(
            table, metadata={"rows": table.num_rows, "columns": table.column_names, "preview": preview(table)}
        )

    return _dataset


def _tags(deployment: ModelDeployment, version: ModelVersion) -> dict[str, str]:
    return {
        "client": deployment.client,
        "model": deployment.model,
        "version": version.version,
        "follows": "latest" if deployment.follows_latest else "pinned",
    }


def _deps(deployment: ModelDeployment) -> list[AssetKey]:
    return [dataset_key(deployment.client, dataset) for dataset in deployment.inputs.values()]


class ModelRunFailures(ModelpexError):
    """Several models of one client failed in one step; each one's own error is listed."""


def _trained_state(context: AssetExecutionContext, deployment: ModelDeployment) -> tuple[str, str]:
    """(version, sha256) of the latest training materialisation, from Dagster's event log."""
    event = context.instance.get_latest_materialization_event(state_key(deployment))
    where = deployment.where
    if event is None or event.asset_materialization is None:
        raise ModelpexError(f"{where}: no fitted state yet: materialise {where}/state first")
    meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    if "state_sha256" not in meta or "model_version" not in meta:
        raise ModelpexError(f"{where}: its last training left no state record: materialise {where}/state again")
    return str(meta["model_version"]), str(meta["state_sha256"])


class ClientRun:
    """One step of one client: trains, then predicts, the selected models, each in its own model process."""

    def __init__(self, context: AssetExecutionContext, modelpex: ModelpexResource, frame_store: FrameStore) -> None:
        self.context, self.modelpex, self.frame_store = context, modelpex, frame_store
        self.catalog = modelpex.catalog()

    def _inputs(self, d: ModelDeployment) -> dict[str, pa.Table]:
        return {name: self.frame_store.load_table(dataset_key(d.client, ds)) for name, ds in d.inputs.items()}

    def train(self, d: ModelDeployment) -> MaterializeResult:
        started = time.perf_counter()
        running = self.catalog.resolve(d.model, d.version)  # N.B. Now, not at load: follows `latest`.
        ensured = self.modelpex.ensure(running, self.catalog)
        outcome = self.modelpex.run(
            self.context, ensured.record, action="train", inputs=self._inputs(d), params=d.params, keep_state=True
        )
        if outcome.state is None:
            raise ModelpexError(f"{d.where}: training reported no fitted state")
        record = self.modelpex.runner.states.save(ensured.record, d.client, self.context.run.run_id, outcome.state)
        return MaterializeResult(
            asset_key=state_key(d),
            metadata={
                **_run_metadata(outcome, ensured, started),
                "state_sha256": record.sha256,  # N.B. Computed and signed here: the digest predictions trust.
                "state_format": record.format,
                "state_bytes": record.size,
            },
        )

    def predict(self, d: ModelDeployment) -> Output[pa.Table]:
        started = time.perf_counter()
        running = self.catalog.resolve(d.model, d.version)
        trained_version, sha256 = _trained_state(self.context, d)
        if trained_version != running.version:
            raise ModelpexError(
                f"{d.where} now runs {d.model}@{running.version} but its state was trained by "
                f"{trained_version}: materialise {d.where}/state first"
            )
        ensured = self.modelpex.ensure(running, self.catalog)
        state = self.modelpex.runner.states.load(ensured.record, sha256, d.client)
        outcome = self.modelpex.run(
            self.context, ensured.record, action="predict", inputs=self._inputs(d), params=d.params, state_in=state
        )
        table = outcome.outputs["predictions"]
        metadata = {**_run_metadata(outcome, ensured, started), "state_sha256": sha256, "preview": preview(table)}
        return Output(table, output_name=predictions_key(d).to_python_identifier(), metadata=metadata)

    def _record_failure(self, d: ModelDeployment, key: AssetKey, exc: ModelpexError) -> None:
        self.context.log_event(
            AssetObservation(
                asset_key=key,
                metadata={
                    "client": d.client,
                    "model": d.model,
                    "failed_run": self.context.run.run_id,
                    "error": str(exc)[:MAX_ERROR_CHARS],
                },
            )
        )

    def __call__(self, client: ClientDeployment) -> Iterator[MaterializeResult | Output[pa.Table]]:
        """Selected trainings first, then selected predictions; a failure does not stop the other models.

        Each failure is recorded on its asset as it happens (an observation with the model's error, which the
        run-failure sensor lifts to run tags); the step then fails with the model's own error, or all of them.
        """
        selected = self.context.selected_asset_keys
        failures: dict[str, ModelpexError] = {}
        for key_of, action in ((state_key, self.train), (predictions_key, self.predict)):
            for d in client.models.values():
                if key_of(d) not in selected or d.where in failures:
                    continue
                try:
                    yield action(d)
                except ModelpexError as exc:
                    failures[d.where] = exc
                    self._record_failure(d, key_of(d), exc)
        if len(failures) == 1:
            raise next(iter(failures.values()))
        if failures:
            raise ModelRunFailures(
                f"{len(failures)} models of {client.name} failed:\n\n"
                + "\n\n".join(f"{where}: {exc}" for where, exc in failures.items())
            )


def client_asset(
    client: ClientDeployment, versions: Mapping[str, ModelVersion], codes: Mapping[str, str]
) -> AssetsDefinition:
    """Every model of a client: its fitted state (trained at run time) and its predictions.

    N.B. One subsettable multi-asset per client rather than two assets per model: at 100 models x 50 clients,
    per-asset definitions took 34 s to load (benchmarks/definitions.py). A schedule or a click selects a subset
    (say, only the predictions), and the step runs exactly the models selected.
    """
    specs = []
    for d in client.models.values():
        common = {"group_name": client.name, "tags": _tags(d, versions[d.model]), "skippable": True}
        state = AssetSpec(
            key=state_key(d),
            deps=[model_version_key(versions[d.model]), *_deps(d)],
            kinds={"python"},
            code_version=codes[d.model],
            description=f"{client.name}'s {d.model} ({d.version}), fitted at run time; the state's sha256 is kept.",
            **common,
        )
        predictions = AssetSpec(
            key=predictions_key(d),
            deps=[state_key(d), *_deps(d)],
            kinds={"parquet"},
            description=f"{client.name}'s {d.model} predictions.",
            **common,
        )
        specs += [state, predictions.with_io_manager_key("frames")]

    @multi_asset(name=f"{client.name}__models", specs=specs, can_subset=True)
    def _client(context: AssetExecutionContext, modelpex: ModelpexResource, frame_store: FrameStore) -> Iterator[Any]:
        yield from ClientRun(context, modelpex, frame_store)(client)

    return _client
