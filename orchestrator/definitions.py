"""Definitions: the Dagster code location, assembled from the catalog of model versions and deployments.yaml.

``workspace.yaml`` loads `defs`. One job of ours, ``build_model`` (build or fetch any model version, chosen from
those that exist); every other run is Dagster's own asset job over a selection: everything ("Materialize all",
``modelpex deploy``), a client (``group:<client>``), a model (``tag:model=<name>``) or a single step.
Automation conditions train and predict on the deployments' crons and redeploy what changed
(orchestrator/automation.py); sensors reload the code location when the tree changes and record failures.
Steps execute in the run's process, or on Celery workers (MODELPEX_EXECUTOR, orchestrator/executors.py).

N.B. No job per client or per model: each would carry its own copy of the clients' graphs in the code location's
snapshot, and at 100 models x 50 clients those 150 jobs were a third of its load time (benchmarks/definitions.py).
"""

from collections.abc import Sequence

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    definitions,
)

from orchestrator.assets import (
    AssetIndex,
    ClientSteps,
    base_asset,
    build_model_job,
    client_assets,
    deployed_models,
    model_version_asset,
    model_version_key,
)
from orchestrator.automation import conditions, with_conditions
from orchestrator.catalog import ModelVersion, released_json
from orchestrator.deployments import load_deployments
from orchestrator.executors import run_executor
from orchestrator.resources import ArrowParquetIOManager, FrameStore, ModelpexResource, set_at_load
from orchestrator.sensors import failure_sensor, redeploy_sensor
from orchestrator.settings import Settings
from orchestrator.store import is_remote
from orchestrator.versions import web_remote

__all__ = ["build_definitions", "defs"]


def build_definitions(
    settings: Settings | None = None,
    *,
    automation_running: bool = True,
    modelpex: ModelpexResource | None = None,
    released: Sequence[ModelVersion] = (),
) -> Definitions:
    """The whole code location for one project; raises a clear error when deployments.yaml is invalid.

    ``modelpex`` replaces the default runner resource (one built from ``settings``), e.g. with a timeout.
    ``released``: released versions recorded where the tags were readable (`ModelpexComponent`'s state).
    """
    settings = settings or Settings.from_env()
    catalog = settings.catalog(released)
    builder = settings.builder()
    deployments = load_deployments(settings.deployments_file, catalog)
    web = web_remote(settings.project)

    index = AssetIndex()
    codes = {str(v.ref): builder.model_key(v.digest) for v in catalog.all()}
    version_assets = {str(v.ref): model_version_key(v) for v in catalog.all()}
    found = conditions(deployments, version_assets.values())
    pexes = [base_asset(builder.base_key, index)]
    pexes += [
        model_version_asset(v, codes[str(v.ref)], index, web, str(settings.models_dir / v.name)) for v in catalog.all()
    ]
    assets = [asset.map_asset_specs(lambda spec: with_conditions(spec, found)) for asset in pexes]
    steps = ClientSteps(index)
    for client in deployments.clients.values():
        if client.datasets or client.models:
            assets.append(client_assets(client, deployed_models(client, catalog, codes), steps, found))

    status = DefaultSensorStatus.RUNNING if automation_running else DefaultSensorStatus.STOPPED
    automation = AutomationConditionSensorDefinition(
        "modelpex_automation",
        target=AssetSelection.all(),
        default_status=status,
        minimum_interval_seconds=max(1, round(settings.sensor_interval)),
        description="Trains and predicts on the deployments' crons; rebuilds a pex whose code version changed and "
        "retrains the clients that run it (orchestrator/automation.py).",
    )
    # N.B. With an object store, frames live there too: every host's runs read what any host's runs wrote.
    frame_store = FrameStore(
        base_dir=str(settings.project / ".dagster_home" / "frames"),
        store_url=settings.store_url if is_remote(settings.store_url) else "",
    )
    build_model = build_model_job(catalog)
    return Definitions(
        assets=assets,
        jobs=[build_model] if build_model else [],
        sensors=[
            automation,
            redeploy_sensor(
                deployments,
                version_assets,
                loaded={"base": builder.base_key, "models": codes, "deployed": deployments.running(catalog)},
                minimum_interval_seconds=max(1, round(settings.sensor_interval)),
                webserver_url=settings.webserver_url,
            ),
            failure_sensor(),
        ],
        resources={
            "modelpex": set_at_load(
                modelpex
                or ModelpexResource(
                    project_dir=str(settings.project),
                    store_url=settings.store_url,
                    released=released_json(released) if released else "",
                )
            ),
            "frames": ArrowParquetIOManager(store=frame_store),
            "frame_store": set_at_load(frame_store),
        },
        executor=run_executor(settings),
    )


@definitions
def defs() -> Definitions:
    return build_definitions()
