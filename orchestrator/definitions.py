"""Definitions: the Dagster code location, assembled from the catalog of model versions and deployments.yaml.

``workspace.yaml`` loads `defs`. One job of ours, ``build_model`` (build or fetch any model version, chosen from
those that exist); every other run is Dagster's own asset job over a selection: everything ("Materialize all",
``modelpex deploy``), a client (``group:<client>``), a model (``tag:model=<name>``) or a single step.
Schedules come from the deployments' crons; sensors redeploy changes and record failures.

N.B. No job per client or per model: each would carry its own copy of the clients' graphs in the code location's
snapshot, and at 100 models x 50 clients those 150 jobs were a third of its load time (benchmarks/definitions.py).
"""

from collections import defaultdict

from dagster import (
    AssetKey,
    DefaultScheduleStatus,
    Definitions,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    definitions,
    in_process_executor,
    schedule,
)

from orchestrator.assets import (
    AssetIndex,
    ClientSteps,
    base_asset,
    build_model_job,
    client_assets,
    dataset_key,
    deployed_models,
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
from orchestrator.versions import web_remote

__all__ = ["build_definitions", "defs"]

ASSET_JOB = "__ASSET_JOB"  # N.B. Dagster's implicit job over every asset: a schedule runs its selection in it.
VERBS = {"train": "Trains", "predict": "Predicts with"}


def _schedules(deployments: Deployments, status: DefaultScheduleStatus) -> list[ScheduleDefinition]:
    """One schedule per client, action and cron: the client's models that share a cron share a run.

    Named for what they run: ``acme_train`` when it covers every model acme trains, ``globex_credit_risk_train``
    for a model on a cron of its own.
    """
    groups: dict[tuple[str, str, str], list[ModelDeployment]] = defaultdict(list)
    for d in deployments.all():
        for action, cron in d.schedules.items():
            groups[(d.client, action, cron)].append(d)
    acting = defaultdict(int)
    for (client, action, _), members in groups.items():
        acting[(client, action)] += len(members)
    names: set[str] = set()
    schedules = []
    for (client, action, cron), members in sorted(groups.items()):
        name = _schedule_name(client, action, cron, [d.model for d in members], acting[(client, action)], names)
        names.add(name)
        key_of = state_key if action == "train" else predictions_key
        keys = [key_of(d) for d in members] + [dataset_key(client, ds) for d in members for ds in d.inputs.values()]
        schedules.append(_schedule(name, client, action, cron, members, list(dict.fromkeys(keys)), status))
    return schedules


def _schedule_name(client: str, action: str, cron: str, models: list[str], acting: int, taken: set[str]) -> str:
    if len(models) == acting:
        name = f"{client}_{action}"
    elif len(models) <= 2:
        name = f"{client}_{'_'.join(models)}_{action}"
    else:
        name = f"{client}_{models[0]}_and_{len(models) - 1}_more_{action}"
    if name in taken:  # N.B. Only odd names collide (client a_b + model c, client a + model b_c): add the cron.
        name += "_" + "".join(c if c.isalnum() else "_" for c in cron)
    return name


def _schedule(
    name: str,
    client: str,
    action: str,
    cron: str,
    members: list[ModelDeployment],
    keys: list[AssetKey],
    status: DefaultScheduleStatus,
) -> ScheduleDefinition:
    @schedule(
        name=name,
        cron_schedule=cron,
        job_name=ASSET_JOB,
        default_status=status,
        description=f"{VERBS[action]} {' and '.join(d.model for d in members)} for {client} on cron '{cron}'.",
    )
    def _run(context: ScheduleEvaluationContext) -> RunRequest:
        return RunRequest(asset_selection=keys, tags={"client": client, "action": action})

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
    web = web_remote(settings.project)

    index = AssetIndex()
    codes = {str(v.ref): builder.model_key(v.digest) for v in catalog.all()}
    assets = [base_asset(builder.base_key, index)]
    assets += [
        model_version_asset(v, codes[str(v.ref)], index, web, str(settings.models_dir / v.name)) for v in catalog.all()
    ]
    steps = ClientSteps(index)
    for client in deployments.clients.values():
        if client.datasets or client.models:
            assets.append(client_assets(client, deployed_models(client, catalog, codes), steps))

    status = DefaultScheduleStatus.RUNNING if schedules_running else DefaultScheduleStatus.STOPPED
    frame_store = FrameStore(base_dir=str(settings.project / ".dagster_home" / "frames"))
    build_model = build_model_job(catalog)
    return Definitions(
        assets=assets,
        jobs=[build_model] if build_model else [],
        schedules=_schedules(deployments, status),
        sensors=[
            redeploy_sensor(
                deployments,
                {str(v.ref): model_version_key(v) for v in catalog.all()},
                max(1, round(settings.sensor_interval)),
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
