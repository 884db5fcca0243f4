"""Definitions: the Dagster code location, assembled from the catalog of model versions and deployments.yaml.

``workspace.yaml`` loads `defs`. Jobs: one per client (exactly that client's assets), one per model (its versions'
pexes), and ``build_model`` (the build-or-fetch op, for any version by config). Everything at once is Dagster's own
asset job (the UI's "Materialize all", ``modelpex deploy``).
Schedules come from the deployments' crons; sensors redeploy changes and record failures.
"""

from collections import defaultdict
from collections.abc import Mapping

from dagster import (
    AssetKey,
    AssetSelection,
    DefaultScheduleStatus,
    Definitions,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    define_asset_job,
    definitions,
    in_process_executor,
    job,
    schedule,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from orchestrator.assets import (
    base_asset,
    build_or_fetch_model,
    client_asset,
    dataset_asset,
    dataset_key,
    model_version_asset,
    model_version_key,
    predictions_key,
    state_key,
)
from orchestrator.build import Builder, Interpreter
from orchestrator.deployments import Deployments, ModelDeployment, load_deployments
from orchestrator.resources import ArrowParquetIOManager, FrameStore, ModelpexResource
from orchestrator.sensors import failure_sensor, redeploy_sensor
from orchestrator.settings import Settings

__all__ = ["build_definitions", "defs"]


def _schedules(
    deployments: Deployments, client_jobs: Mapping[str, UnresolvedAssetJobDefinition], status: DefaultScheduleStatus
) -> list[ScheduleDefinition]:
    """One schedule per client, action and cron: the client's models that share a cron share a run.

    N.B. Each schedule requests a subset of its client's job rather than targeting an asset selection, which
    would make Dagster build one more job per schedule at load time.
    """
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
            _schedule(client, action, cron, count, members, list(dict.fromkeys(keys)), client_jobs[client], status)
        )
    return schedules


def _schedule(
    client: str,
    action: str,
    cron: str,
    count: int,
    members: list[ModelDeployment],
    keys: list[AssetKey],
    target: UnresolvedAssetJobDefinition,
    status: DefaultScheduleStatus,
) -> ScheduleDefinition:
    @schedule(
        name=f"{client}_{action}" + (f"_{count}" if count > 1 else ""),
        cron_schedule=cron,
        job=target,
        default_status=status,
        description=f"{action} {', '.join(d.model for d in members)} for {client} on '{cron}'",
    )
    def _run(context: ScheduleEvaluationContext) -> RunRequest:
        return RunRequest(asset_selection=keys, tags={"client": client, "modelpex/action": action})

    return _run


def build_definitions(
    settings: Settings | None = None, *, schedules_running: bool = True, modelpex: ModelpexResource | None = None
) -> Definitions:
    """The whole code location for one project; raises a clear error when deployments.yaml is invalid.

    ``modelpex`` replaces the default runner resource (one built from ``settings``), e.g. with a timeout.
    """
    settings = settings or Settings.from_env()
    catalog = settings.catalog()
    builder = Builder(settings.store(), settings.base_env(), Interpreter.detect(settings.python))
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
    client_jobs = {
        name: define_asset_job(
            f"client_{name}", selection=AssetSelection.groups(name), description=f"Exactly {name}'s assets."
        )
        for name in sorted(deployments.clients)
    }
    jobs = list(client_jobs.values())
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

    status = DefaultScheduleStatus.RUNNING if schedules_running else DefaultScheduleStatus.STOPPED
    frame_store = FrameStore(base_dir=str(settings.project / ".dagster_home" / "frames"))
    return Definitions(
        assets=assets,
        jobs=[*jobs, build_model],
        schedules=_schedules(deployments, client_jobs, status),
        sensors=[
            redeploy_sensor(deployments, version_assets, max(1, round(settings.sensor_interval))),
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
