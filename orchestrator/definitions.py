"""Definitions: the Dagster code location, assembled from the catalog of model versions and deployments.yaml.

``workspace.yaml`` loads `defs`. Jobs: ``deploy`` (everything), one per client (exactly that client's assets), one
per model (its versions and the client assets that run it), and ``build_model`` (the build-or-fetch op, for any
version by config). Schedules come from the deployments' crons; sensors redeploy changes and record failures.
"""


from collections import defaultdict
from collections.abc import Iterable

from dagster import (
    AssetKey,
    AssetsDefinition,
    AssetSelection,
    DefaultScheduleStatus,
    Definitions,
    ScheduleDefinition,
    define_asset_job,
    definitions,
    in_process_executor,
    job,
)

from orchestrator.assets import (
    base_asset,
    build_or_fetch_model,
    dataset_asset,
    dataset_key,
    model_version_asset,
    model_version_key,
    predictions_asset,
    predictions_key,
    state_key,
    training_asset,
)
from orchestrator.build import Builder, Interpreter
from orchestrator.deployments import Deployments, ModelDeployment, load_deployments
from orchestrator.resources import ArrowParquetIOManager, ModelpexResource
from orchestrator.sensors import failure_sensor, redeploy_sensor
from orchestrator.settings import Settings

__all__ = ["build_definitions", "defs"]


def _step_key(key: AssetKey) -> str:
    return "__".join(key.path)


def _schedules(deployments: Deployments, status: DefaultScheduleStatus) -> list[ScheduleDefinition]:
    """One schedule per client, action and cron: the client's models that share a cron share a run."""
    groups: dict[tuple[str, str, str], list[ModelDeployment]] = defaultdict(list)
    for d in deployments.all():
        for action, cron in d.schedules.items():
            groups[(d.client, action, cron)].append(d)
    schedules, seen = [], defaultdict(int)
    for (client, action, cron), members in sorted(groups.items()):
        seen[(client, action)] += 1
        count = seen[(client, action)]
        key_of = state_key if action == "train" else predictions_key
        keys = [key_of(d) for d in members] + [dataset_key(client, ds) for d in members for ds in d.inputs.values()]
        schedules.append(
            ScheduleDefinition(
                name=f"{client}_{action}" + (f"_{count}" if count > 1 else ""),
                cron_schedule=cron,
                target=AssetSelection.assets(*dict.fromkeys(keys)),
                default_status=status,
                tags={"client": client, "modelpex/action": action},
                description=f"{action} {', '.join(d.model for d in members)} for {client} on '{cron}'",
            )
        )
    return schedules


def _keys(assets: Iterable[AssetsDefinition]) -> list[AssetKey]:
    return [key for a in assets for key in a.keys]


def build_definitions(settings: Settings | None = None, *, schedules_running: bool = True) -> Definitions:
    """The whole code location for one project; raises a clear error when deployments.yaml is invalid."""
    settings = settings or Settings.from_env()
    catalog = settings.catalog()
    builder = Builder(settings.store(), settings.base_env(), Interpreter.detect(settings.python))
    deployments = load_deployments(settings.deployments_file, catalog)

    version_assets = {f"{v.name}@{v.version}": model_version_key(v) for v in catalog.all()}
    assets = [base_asset(builder.base_key)]
    assets += [model_version_asset(v, builder.model_key(v.digest)) for v in catalog.all()]
    step_assets = {}
    per_model: dict[str, list[AssetKey]] = defaultdict(list)
    for client in deployments.clients.values():
        assets += [dataset_asset(source) for source in client.datasets.values()]
        for d in client.models.values():
            running = catalog.resolve(d.model, d.version)
            assets += [training_asset(d, running), predictions_asset(d, running)]
            for key in (state_key(d), predictions_key(d)):
                step_assets[_step_key(key)] = (d.client, d.model, key)
                per_model[d.model].append(key)

    all_keys = _keys(assets)
    deploy = define_asset_job("deploy", selection=AssetSelection.assets(*all_keys), description="Build and run everything.")
    jobs = [deploy]
    jobs += [
        define_asset_job(f"client_{name}", selection=AssetSelection.groups(name), description=f"Exactly {name}'s assets.")
        for name in sorted(deployments.clients)
    ]
    for model in sorted(catalog.specs):
        keys = [model_version_key(v) for v in catalog.ordered(model)] + per_model.get(model, [])
        jobs.append(define_asset_job(f"model_{model}", selection=AssetSelection.assets(*keys)))

    @job(name="build_model", description="Build or fetch one model version's pex (config: model, version).")
    def build_model() -> None:
        build_or_fetch_model()

    status = DefaultScheduleStatus.RUNNING if schedules_running else DefaultScheduleStatus.STOPPED
    return Definitions(
        assets=assets,
        jobs=[*jobs, build_model],
        schedules=_schedules(deployments, status),
        sensors=[redeploy_sensor(deployments, version_assets, deploy, all_keys), failure_sensor(step_assets)],
        resources={
            "modelpex": ModelpexResource(project_dir=str(settings.project), store_url=settings.store_url),
            "frames": ArrowParquetIOManager(base_dir=str(settings.project / ".dagster_home" / "frames")),
        },
        executor=in_process_executor,
    )


@definitions
def defs() -> Definitions:
    return build_definitions()
