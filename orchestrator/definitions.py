"""Definitions: the Dagster code location, assembled from the catalog of model versions and deployments.yaml.

``workspace.yaml`` loads `defs`. Jobs: one per client (exactly that client's assets), one per model (its versions'
pexes), and ``build_model`` (the build-or-fetch op, for any version by config). Everything at once is Dagster's own
asset job (the UI's "Materialize all", ``modelpex deploy``).
Automation conditions train and predict on the deployments' crons and redeploy what changed
(orchestrator/automation.py); sensors reload the code location when the tree changes and record failures.
"""

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    define_asset_job,
    definitions,
    in_process_executor,
    job,
)

from orchestrator.assets import (
    base_asset,
    build_or_fetch_model,
    client_asset,
    dataset_asset,
    model_version_asset,
    model_version_key,
)
from orchestrator.automation import conditions, with_conditions
from orchestrator.deployments import load_deployments
from orchestrator.resources import ArrowParquetIOManager, FrameStore, ModelpexResource
from orchestrator.sensors import failure_sensor, redeploy_sensor
from orchestrator.settings import Settings
from orchestrator.store import is_remote

__all__ = ["build_definitions", "defs"]


def build_definitions(
    settings: Settings | None = None, *, automation_running: bool = True, modelpex: ModelpexResource | None = None
) -> Definitions:
    """The whole code location for one project; raises a clear error when deployments.yaml is invalid.

    ``modelpex`` replaces the default runner resource (one built from ``settings``), e.g. with a timeout.
    """
    settings = settings or Settings.from_env()
    catalog = settings.catalog()
    builder = settings.builder()
    deployments = load_deployments(settings.deployments_file, catalog)

    version_assets = {f"{v.name}@{v.version}": model_version_key(v) for v in catalog.all()}
    assets = [base_asset(builder.base_key)]
    assets += [model_version_asset(v, builder.model_key(v.digest)) for v in catalog.all()]
    for client in deployments.clients.values():
        versions = {d.model: catalog.resolve(d.model, d.version) for d in client.models.values()}
        codes = {name: builder.model_key(version.digest) for name, version in versions.items()}
        assets += [dataset_asset(source) for source in client.datasets.values()]
        if client.models:
            assets.append(client_asset(client, versions, codes))

    # N.B. No job of ours selects everything: Dagster's implicit asset job does, and a second one would double the
    # largest part of the code location's snapshot (benchmarks/definitions.py).
    jobs = [
        define_asset_job(
            f"client_{name}", selection=AssetSelection.groups(name), description=f"Exactly {name}'s assets."
        )
        for name in sorted(deployments.clients)
    ]
    # N.B. A model's job builds or fetches its versions. Running it for every client that uses it is the redeploy
    # sensor's run (or the selection `tag:model=<name>` in the UI): a job over each client's subset costs load time
    # per model, as Dagster re-creates each client's multi-asset for it: 2.8 s at 100 models x 50 clients, 0.05 s
    # (5 s for all 100) at 10 models per client.
    jobs += [
        define_asset_job(
            f"model_{model}",
            selection=AssetSelection.assets(*(model_version_key(v) for v in catalog.ordered(model))),
            description=f"Build or fetch every version of {model}.",
        )
        for model in sorted(catalog.specs)
    ]

    @job(name="build_model", description="Build or fetch one model version's pex (config: model, version).")
    def build_model() -> None:
        build_or_fetch_model()

    found = conditions(deployments, version_assets.values())
    assets = [asset.map_asset_specs(lambda spec: with_conditions(spec, found)) for asset in assets]
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
    return Definitions(
        assets=assets,
        jobs=[*jobs, build_model],
        sensors=[
            automation,
            redeploy_sensor(
                deployments,
                version_assets,
                loaded={
                    "base": builder.base_key,
                    "models": {f"{v.name}@{v.version}": builder.model_key(v.digest) for v in catalog.all()},
                    "deployed": deployments.running(catalog),
                },
                minimum_interval_seconds=max(1, round(settings.sensor_interval)),
                webserver_url=settings.webserver_url,
            ),
            failure_sensor(),
        ],
        resources={
            "modelpex": modelpex or ModelpexResource(project_dir=str(settings.project), store_url=settings.store_url),
            "frames": ArrowParquetIOManager(store=frame_store),
            "frame_store": frame_store,
        },
        executor=in_process_executor,
    )


@definitions
def defs() -> Definitions:
    return build_definitions()
