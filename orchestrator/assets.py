"""Assets: factories that turn the catalog and deployments.yaml into Dagster assets, and the build-or-fetch op.

- ``modelpex/base``: the base pex (code version: its content key).
- ``model/<name>/v<version>``: one per model version that exists; materialising builds it or fetches it.
- ``<client>/<dataset>``: a client's input data, small and replaceable.
- ``<client>/<model>/state`` and ``<client>/<model>/predictions``: training at run time, then inference.
"""


import time
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetsDefinition,
    Config,
    MaterializeResult,
    MetadataValue,
    OpExecutionContext,
    Output,
    asset,
    op,
)

from orchestrator.catalog import ModelVersion
from orchestrator.datasets import load_dataset
from orchestrator.deployments import DatasetSource, ModelDeployment
from orchestrator.errors import ModelpexError
from orchestrator.resources import Ensured, ModelpexResource
from orchestrator.run import RunOutcome
from orchestrator.store import file_sha256

__all__ = [
    "BASE_KEY",
    "base_asset",
    "build_or_fetch_model",
    "dataset_asset",
    "dataset_key",
    "model_version_asset",
    "model_version_key",
    "predictions_asset",
    "predictions_key",
    "state_key",
    "training_asset",
]

BASE_KEY = AssetKey(["modelpex", "base"])
PREVIEW_ROWS = 5


def model_version_key(version: ModelVersion) -> AssetKey:
    return AssetKey(["model", version.name, version.slug])


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
    lines += ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |" for row in head]
    return MetadataValue.md("\n".join(lines))


def _run_metadata(outcome: RunOutcome, ensured: Ensured) -> dict[str, Any]:
    return {
        "model": ensured.record.name,
        "model_version": ensured.record.version,
        "model_key": ensured.record.key,
        "pex": ensured.metadata["action"],
        "rows_in": sum(outcome.rows_in.values()),
        "rows_out": sum(outcome.rows_out.values()),
        "bytes_moved": outcome.bytes_moved,
        "transport_seconds": round(outcome.transport_seconds, 4),
        "model_seconds": round(sum(outcome.model_seconds.values()), 4),
        "wall_seconds": round(outcome.wall_seconds, 3),
    }


def base_asset(base_key: str) -> AssetsDefinition:
    @asset(key=BASE_KEY, code_version=base_key, group_name="modelpex", kinds={"pex"})
    def _base(modelpex: ModelpexResource) -> MaterializeResult:
        """The shared base pex (numpy, pandas, polars, pyarrow, scikit-learn, dagster-pipes, the runtime)."""
        result = modelpex.ensure_base()
        modelpex.builder.store.fetch(result.record)
        r = result.record
        return MaterializeResult(
            metadata={"key": r.key, "sha256": r.sha256, "size_bytes": r.size, "interpreter": r.interpreter,
                      "action": "fetched" if result.cached else "built", "seconds": round(result.seconds, 3)}
        )

    return _base


def model_version_asset(version: ModelVersion, code_version: str) -> AssetsDefinition:
    @asset(
        key=model_version_key(version),
        deps=[BASE_KEY],
        code_version=code_version,
        group_name="models",
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
def build_or_fetch_model(context: OpExecutionContext, config: ModelVersionConfig, modelpex: ModelpexResource) -> dict[str, Any]:
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
        return Output(table, metadata={"rows": table.num_rows, "columns": table.column_names, "preview": preview(table)})

    return _dataset


def _ins(deployment: ModelDeployment) -> dict[str, AssetIn]:
    return {name: AssetIn(key=dataset_key(deployment.client, dataset)) for name, dataset in deployment.inputs.items()}


def _tags(deployment: ModelDeployment, version: ModelVersion) -> dict[str, str]:
    return {"client": deployment.client, "model": deployment.model, "version": version.version,
            "follows": "latest" if deployment.follows_latest else "pinned"}


def training_asset(deployment: ModelDeployment, version: ModelVersion) -> AssetsDefinition:
    """Train the client's model version at run time and keep the fitted state (its sha256 in the metadata)."""

    @asset(
        key=state_key(deployment),
        ins=_ins(deployment),
        deps=[model_version_key(version)],
        group_name=deployment.client,
        tags=_tags(deployment, version),
        kinds={"python"},
        description=f"{deployment.client}'s fitted {deployment.model} ({deployment.version}).",
    )
    def _train(context: AssetExecutionContext, modelpex: ModelpexResource, **inputs: pa.Table) -> MaterializeResult:
        catalog = modelpex.catalog()
        running = catalog.resolve(deployment.model, deployment.version)  # N.B. Now, not at load: follows `latest`.
        ensured = modelpex.ensure(running, catalog)
        state_path = modelpex.state_dir() / deployment.client / deployment.model / f"{running.version}-{context.run_id}.state"
        outcome = modelpex.run(
            context, ensured.record, action="train", inputs=inputs, params=deployment.params, state_out=state_path
        )
        if outcome.state is None:
            raise ModelpexError(f"{deployment.client}/{deployment.model}: training reported no fitted state")
        return MaterializeResult(
            metadata={
                **_run_metadata(outcome, ensured),
                "state_path": str(state_path),
                "state_sha256": file_sha256(state_path),  # N.B. Computed here: the trusted digest predictions check.
                "state_format": outcome.state["format"],
                "state_bytes": state_path.stat().st_size,
            }
        )

    return _train


def _trained_state(context: AssetExecutionContext, deployment: ModelDeployment) -> tuple[str, str, dict[str, Any]]:
    """(model, version, StateRef) of the latest training materialisation, from Dagster's event log."""
    event = context.instance.get_latest_materialization_event(state_key(deployment))
    where = f"{deployment.client}/{deployment.model}"
    if event is None or event.asset_materialization is None:
        raise ModelpexError(f"{where}: no fitted state yet: materialise {where}/state first")
    meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    ref = {"path": meta["state_path"], "format": meta["state_format"], "sha256": meta["state_sha256"], "size": meta["state_bytes"]}
    return str(meta["model"]), str(meta["model_version"]), ref


def predictions_asset(deployment: ModelDeployment, version: ModelVersion) -> AssetsDefinition:
    """Predict with the client's model version from the state its latest training run produced."""

    @asset(
        key=predictions_key(deployment),
        ins=_ins(deployment),
        deps=[state_key(deployment)],
        group_name=deployment.client,
        io_manager_key="frames",
        tags=_tags(deployment, version),
        kinds={"parquet"},
        description=f"{deployment.client}'s {deployment.model} predictions.",
    )
    def _predict(context: AssetExecutionContext, modelpex: ModelpexResource, **inputs: pa.Table) -> Output[pa.Table]:
        catalog = modelpex.catalog()
        running = catalog.resolve(deployment.model, deployment.version)
        _, trained_version, state = _trained_state(context, deployment)
        if trained_version != running.version:
            raise ModelpexError(
                f"{deployment.client}/{deployment.model} now runs {deployment.model}@{running.version} but its state "
                f"was trained by {trained_version}: materialise {deployment.client}/{deployment.model}/state first"
            )
        started = time.perf_counter()
        ensured = modelpex.ensure(running, catalog)
        outcome = modelpex.run(context, ensured.record, action="predict", inputs=inputs, params=deployment.params, state_in=state)
        table = outcome.outputs["predictions"]
        metadata = {**_run_metadata(outcome, ensured), "state_sha256": state["sha256"], "preview": preview(table)}
        metadata["step_seconds"] = round(time.perf_counter() - started, 3)
        return Output(table, metadata=metadata)

    return _predict
