"""The Dagster code location, for real: definitions load, assets materialise with real pexes and subprocesses,
per-client jobs touch only their assets, the sensor redeploys what changed, failures carry the model's error."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from dagster import (
    AssetKey,
    AssetSelection,
    DagsterEventType,
    DagsterInstance,
    Definitions,
    RetryPolicy,
    build_run_status_sensor_context,
    build_sensor_context,
    define_asset_job,
    evaluate_automation_conditions,
)
from dagster._core.definitions.sensor_definition import SensorExecutionData
from dagster._core.scheduler.instigation import TickStatus
from dagster._core.storage.dagster_run import RunsFilter
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG
from dagster._core.test_utils import create_test_daemon_workspace_context, instance_for_test
from dagster._core.workspace.load_target import ModuleTarget
from dagster._daemon.sensor import execute_sensor_iteration

from orchestrator.assets import dataset_key, model_version_key, predictions_key, state_key
from orchestrator.build import Builder
from orchestrator.catalog import ModelVersion
from orchestrator.definitions import build_definitions
from orchestrator.deployments import RESERVED_CLIENT_NAMES, ModelDeployment
from orchestrator.resources import ModelpexResource
from orchestrator.settings import Settings
from orchestrator.specs import ModelRef, load_base_env
from orchestrator.store import LocalPexStore
from orchestrator.versions import resolve_source

from .conftest import REPO, CliResult, Project, cache_env, leaked_children, write_model

M_INPUTS = (
    '[tool.modelpex]\ntrain = "m.model:train"\npredict = "m.model:predict"\nframes = "pyarrow"\ninputs = ["data"]\n'
)


def repo_definitions() -> Definitions:
    return build_definitions(Settings.from_env(env={}, project=str(REPO)), automation_running=False)


def labels(condition) -> set[str]:
    """Every labelled part of an automation condition (``on_cron(...)``, ``redeploy``, ...)."""
    found = {condition.get_label()} - {None}
    for child in condition.children:
        found |= labels(child)
    return found


def state(client: str, model: str = "m") -> AssetKey:
    return state_key(ModelDeployment(client, model, "latest", {}, {}, {}))


def predictions(client: str, model: str = "m") -> AssetKey:
    return predictions_key(ModelDeployment(client, model, "latest", {}, {}, {}))


def version(model: str, number: str) -> AssetKey:
    return model_version_key(ModelVersion(model, number, "", "tag"))


def test_repository_definitions_load() -> None:
    defs = repo_definitions()
    Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = set(graph.get_all_asset_keys())
    assert {version("churn", "1.0.0"), version("churn", "1.1.0")} <= keys
    assert AssetKey(["modelpex", "base"]) in keys
    acme, globex = graph.get(state("acme", "churn")), graph.get(state("globex", "churn"))
    assert acme.tags["version"] == "1.0.0" and globex.tags["version"] == "1.1.0"
    assert {"v1.0.0", "pinned"} <= acme.kinds and {"v1.1.0", "follows-latest"} <= globex.kinds, "drawn on the graph"
    assert acme.group_name == "acme"
    assert version("churn", "1.0.0") in acme.parent_keys and version("churn", "1.1.0") in globex.parent_keys
    assert graph.get(version("churn", "1.1.0")).code_version
    assert labels(acme.automation_condition) >= {"on_cron(0 2 * * *, UTC)", "redeploy"}, "trains on acme's cron"
    assert labels(graph.get(predictions("acme", "churn")).automation_condition) >= {"on_cron(0 * * * *, UTC)"}
    credit = graph.get(state("globex", "credit_risk")).automation_condition
    assert "on_cron(0 4 * * 1, UTC)" in labels(credit), "a model's own cron overrides its client's"
    assert "on_cron(30 2 * * *, UTC)" not in labels(credit)
    assert defs.schedules is None or list(defs.schedules) == [], "the crons are automation conditions"
    assert {s.name for s in defs.sensors} == {"modelpex_automation", "modelpex_redeploy", "modelpex_failures"}
    assert all(s.description for s in defs.sensors)
    assert {j.name for j in defs.jobs} == {"build_model"} and all(j.description for j in defs.jobs)


def test_every_label_on_the_lineage_graph_names_its_model() -> None:
    """The graph shows the last part of a key only: every model's asset says which model it is, and a client's
    which client runs it (a model version's group links to its clients' states by that label)."""
    graph = repo_definitions().resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        tags = graph.get(key).tags
        if "client" in tags and "model" in tags:
            assert key.path[-1].startswith(f"{tags['client']}_{tags['model']}_"), key
        elif "model" in tags:
            assert key.path[-1].startswith(f"{tags['model']}_"), key
    labels = {key.path[-1] for key in graph.get_all_asset_keys()}
    assert {"churn_v1_0_0", "churn_v1_1_0", "acme_churn_state", "globex_churn_state"} <= labels
    assert {"acme_churn_predictions", "globex_credit_risk_predictions", "acme_demand_predictions"} <= labels
    links = {key.path[-1] for key in graph.get(version("churn", "1.0.0")).child_keys}
    assert links == {"acme_churn_state"}, "the pex's group shows who runs it"


def test_reserved_client_names_cover_every_name_modelpex_gives_itself() -> None:
    """Every group and key prefix of an asset that is not a client's is reserved (deployments.py)."""
    defs = repo_definitions()
    clients = {"acme", "globex"}
    own = [node for node in defs.resolve_asset_graph().asset_nodes if node.key.path[0] not in clients]
    assert own, "the base and the model versions"
    assert {n.group_name for n in own} | {n.key.path[0] for n in own} <= RESERVED_CLIENT_NAMES


def write_deployments(project: Project, clients: dict) -> None:
    (project.root / "deployments.yaml").write_text(yaml.safe_dump({"clients": clients}))


def client(version: str, rows: int = 50, **params: object) -> dict:
    return {
        "datasets": {"data": {"generate": "customers", "rows": rows}},
        "models": {"m": {"version": version, "inputs": {"data": "data"}, "params": params}},
    }


def run_client(defs: Definitions, instance: DagsterInstance, name: str, **kwargs: object):
    """What the UI's "Materialize all" does in a client's group: Dagster's asset job over the group's assets."""
    keys = AssetSelection.groups(name).resolve(defs.resolve_asset_graph())
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, asset_selection=sorted(keys), **kwargs
    )


M_CODE = """
    import os, time
    import pyarrow as pa
    import pyarrow.compute as pc
    from dagster_pipes import PipesContext
    from modelpex_runtime import Trained

    VERSION = "{version}"
    ATTEMPTS = []  # N.B. A module global: it lives as long as the model process, which serves the whole run.

    def train(inputs, params):
        if params.get("fail"):
            raise ValueError("boom: the model's own error")
        if params.get("vanish"):
            os._exit(0)
        if params.get("hang"):
            time.sleep(600)
        if params.get("flaky") and not ATTEMPTS:
            ATTEMPTS.append(1)
            raise RuntimeError("first attempt fails")
        if "report" in params:  # N.B. The other way to report: metadata through Dagster Pipes.
            PipesContext.get().report_asset_materialization(metadata=params["report"])
        time.sleep(params.get("sleep", 0))  # N.B. A model that takes a known time.
        state = {{"mean": pc.mean(inputs["data"]["monthly_charges"]).as_py()}}
        return Trained(state, params["metrics"]) if "metrics" in params else state

    def predict(inputs, state, params):
        time.sleep(params.get("sleep", 0))
        data = inputs["data"]
        env = sorted(os.environ)
        score = pc.subtract(data["monthly_charges"], state["mean"])
        if params.get("null_every"):
            keep = [i % params["null_every"] != 0 for i in range(data.num_rows)]
            score = pc.if_else(pa.array(keep), score, pa.scalar(None, pa.float64()))
        return pa.table({{
            "customer_id": data["customer_id"],
            "score": score,
            "version": pa.array([VERSION] * data.num_rows),
            "band": pa.array(["high" if v is not None and v > 0 else "low" for v in score.to_pylist()]),
            "env": pa.array([" ".join(env)] * data.num_rows),
        }}).slice(0, params.get("rows_out", data.num_rows))
"""


def m_model(project: Project, version: str, contract: str = "") -> Path:
    """Model m; ``contract`` is TOML appended to its [tool.modelpex] (a [tool.modelpex.predictions] table)."""
    tool = M_INPUTS + contract
    return write_model(project.models, "m", version=version, code=M_CODE.format(version=version), tool=tool)


@pytest.fixture
def two_versions(project: Project) -> Project:
    """Model m released as 1.0.0 (tag) with 1.1.0 in the working tree; acme pins 1.0.0, globex follows latest."""
    m_model(project, "1.0.0")
    project.commit_and_tag("m 1.0.0", "m/v1.0.0")
    m_model(project, "1.1.0")
    write_deployments(project, {"acme": client("1.0.0"), "globex": client("latest")})
    project.commit_and_tag("m 1.1.0")
    return project


def defs_for(project: Project, store: LocalPexStore, **resource: object) -> Definitions:
    settings = Settings.from_env(env=cache_env(), project=str(project.root), store_url=str(store.root))
    modelpex = ModelpexResource(project_dir=str(project.root), store_url=str(store.root), **resource)
    return build_definitions(settings, automation_running=False, modelpex=modelpex)


def defs_for_url(project: Project, store_url: str) -> Definitions:
    """Definitions on the store at ``store_url``, with this process's cache settings (a simulated host's)."""
    env = {name: os.environ[name] for name in ("MODELPEX_CACHE", "MODELPEX_PEX_ROOT") if name in os.environ}
    settings = Settings.from_env(env=env, project=str(project.root), store_url=store_url)
    modelpex = ModelpexResource(project_dir=str(project.root), store_url=store_url)
    return build_definitions(settings, automation_running=False, modelpex=modelpex)


def materialised(result) -> dict[AssetKey, dict]:
    return {
        e.materialization.asset_key: {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }


def test_deploy_command_materialises_two_clients_on_two_versions(
    two_versions: Project, cli: Callable[..., CliResult], store: LocalPexStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README's main command: builds, then materialises every asset on the embedded SQLite instance."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    write_deployments(two_versions, {"acme": client("1.0.0", sleep=SLEEP), "globex": client("latest")})
    done = cli("deploy")
    assert done.returncode == 0, done.stderr
    assert "acme/acme_m_predictions" in done.stdout and "deployed: run" in done.stdout
    home = two_versions.root / ".dagster_home"
    with DagsterInstance.from_config(str(home)) as instance:
        latest = instance.get_latest_materialization_event
        meta = {k: {n: v.value for n, v in latest(k).asset_materialization.metadata.items()} for k in DEPLOYED}
        (run,) = instance.get_runs()
        seconds = step_seconds(instance, run.run_id)
    acme, globex = meta[predictions("acme")], meta[predictions("globex")]
    assert (acme["model_version"], globex["model_version"]) == ("1.0.0", "1.1.0")
    assert acme["rows_in"] == acme["dagster/row_count"] == 50
    table = pq.read_table(home / "frames" / "acme" / "acme_m_predictions.parquet")
    data = pq.read_table(home / "frames" / "acme" / "data.parquet")
    assert quantity(acme["data_moved"]) >= 0.99 * (data.nbytes + table.nbytes), "the input there, the output back"
    assert SLEEP <= acme["model_seconds"] < seconds["acme.m_predict"], "the model's own time, within its step's"
    assert 0 < quantity(acme["transport_time"]) < seconds["acme.m_predict"] - acme["model_seconds"]
    assert "| customer_id | score | version |" in acme["preview"]
    assert {c.name for c in acme["dagster/column_schema"].columns} == {"customer_id", "score", "version", "band", "env"}
    assert acme["params"] == {"sleep": SLEEP} and acme["nulls"] == 0
    assert (run.tags["client"], run.tags["model"], run.tags["action"]) == ("acme,globex", "m", "build,predict,train")
    assert run.tags["version"] == "m@1.0.0,m@1.1.0"
    # N.B. Launched through the instance as the UI launches: the code location is the run's origin.
    assert run.remote_job_origin is not None and run.remote_job_origin.location_name == "modelpex"
    assert run.job_code_origin is not None and run.job_name == "__ASSET_JOB"
    version_asset = meta[version("m", "1.0.0")]
    (stored,) = store.find("model", "m", "1.0.0")
    assert version_asset["action"] == "fetched", "deploy builds first: the asset finds the pex in the store"
    assert version_asset["sha256"] == stored.sha256
    assert meta[state("acme")]["state_format"] == "json"
    assert set(table["version"].to_pylist()) == {"1.0.0"}
    assert trained_after_its_pex(home, run.run_id) == {"acme": True, "globex": True}


def trained_after_its_pex(home: Path, run_id: str) -> dict[str, bool]:
    """Per client: its training step started after its version's pex step succeeded, and its state recorded the
    pex's real data version (its sha256, not Dagster's INITIAL of a pex not yet materialised in that run)."""
    with DagsterInstance.from_config(str(home)) as instance:
        order = [
            (e.dagster_event.event_type, e.step_key)
            for e in instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS})
        ]
        found = {}
        for client, number in (("acme", "1.0.0"), ("globex", "1.1.0")):
            pex = version("m", number)
            built = order.index((DagsterEventType.STEP_SUCCESS, "__".join(pex.path)))
            trained = order.index((DagsterEventType.STEP_START, f"{client}.m_train"))
            event = instance.get_latest_materialization_event(state(client)).asset_materialization
            sha256 = instance.get_latest_materialization_event(pex).asset_materialization.metadata["sha256"].value
            # N.B. Where Dagster keeps the data version of each input a materialisation saw (its provenance).
            recorded = event.tags.get(f"dagster/input_data_version/{pex.to_user_string()}")
            found[client] = built < trained and recorded == sha256
    return found


SLEEP = 0.2  # N.B. Seconds a model sleeps in each call, when a test asks it to: a time its figures must show.


def step_seconds(instance: DagsterInstance, run_id: str) -> dict[str, float]:
    """Each successful step's duration in a run, as Dagster recorded it."""
    events = instance.all_logs(run_id, of_type=DagsterEventType.STEP_SUCCESS)
    return {e.step_key: e.dagster_event.event_specific_data.duration_ms / 1000 for e in events}


def quantity(text: str) -> float:
    """A human-unit figure (``1.5 ms``, ``241 KB``) as seconds or bytes."""
    number, unit = text.split()
    return float(number) * {"µs": 1e-6, "ms": 1e-3, "s": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


DEPLOYED = [
    AssetKey(["modelpex", "base"]),
    version("m", "1.0.0"),
    version("m", "1.1.0"),
    *(dataset_key(c, "data") for c in ("acme", "globex")),
    *(key(c) for c in ("acme", "globex") for key in (state, predictions)),
]


def test_deploy_command_fails_with_the_model_error(project: Project, cli: Callable[..., CliResult]) -> None:
    failing_project(project, fail=True)
    done = cli("deploy", env={"DAGSTER_HOME": str(project.root / "instance")})
    assert done.returncode != 0, done.stderr
    assert "orchestrator/" not in done.stderr, "no traceback of modelpex's own; the model's stderr may show"
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: deploy run ") and "failed in acme.m_train: " in last, done.stderr
    assert "model m@1.0.0 raised ValueError: boom: the model's own error" in last, done.stderr


def test_deploy_refuses_steps_elsewhere_with_a_local_store(project: Project, cli: Callable[..., CliResult]) -> None:
    """Celery workers (or a run launcher that starts runs elsewhere) cannot see a folder on this host: one line, before
    anything is built."""
    m_model(project, "1.0.0")
    write_deployments(project, {"acme": client("latest")})
    env = {"MODELPEX_EXECUTOR": "celery", "MODELPEX_CELERY_BROKER": "redis://127.0.0.1:1/0"}
    done = cli("deploy", env={"DAGSTER_HOME": str(project.root / "instance"), **env})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "MODELPEX_EXECUTOR=celery" in lines[0] and "is a folder on this host" in lines[0] and "s3://" in lines[0]
    assert "built" not in done.stdout


def test_client_job_touches_only_its_assets(two_versions: Project, store: LocalPexStore) -> None:
    defs = defs_for(two_versions, store)
    with DagsterInstance.ephemeral() as instance:
        result = run_client(defs, instance, "acme")
        assert result.success
        assert {k.path[0] for k in materialised(result)} == {"acme"}
        assert instance.get_latest_materialization_event(predictions("globex")) is None
        seconds = step_seconds(instance, result.run_id)
    meta = materialised(result)
    trained, predicted = meta[state("acme")], meta[predictions("acme")]
    assert predicted["process_start"] == "re-used", "one warm process: training started it, prediction re-used it"
    started = quantity(trained["process_start"])
    assert 0 < started < seconds["acme.m_train"] - trained["model_seconds"], "the start is part of training's step"
    assert not leaked_children(), "the run's model processes ended with the run"


def test_model_process_gets_an_explicit_environment(two_versions: Project, store: LocalPexStore, monkeypatch) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    monkeypatch.setenv("LANG", "C.UTF-8")
    defs = defs_for(two_versions, store, env={"MODEL_SETTING": "chosen"})
    with DagsterInstance.ephemeral() as instance:
        result = run_client(defs, instance, "acme")
    env = set(result.output_for_node("acme", "m__predictions")["env"][0].as_py().split())
    assert "SECRET_TOKEN" not in env and "MODEL_SETTING" in env and "LANG" in env
    assert not {name for name in env if name.startswith(("AWS_", "DAGSTER_HOME", "MODELPEX_STORE"))}


def failing_project(project: Project, **params: object) -> Project:
    m_model(project, "1.0.0")
    write_deployments(project, {"acme": client("latest", **params)})
    return project


def step_failure(result) -> str:
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    return failure.event_specific_data.error.to_string()


def test_model_error_shows_its_own_type_message_and_traceback(project: Project, store: LocalPexStore) -> None:
    defs = defs_for(failing_project(project, fail=True), store)
    with DagsterInstance.ephemeral() as instance:
        result = run_client(defs, instance, "acme", raise_on_error=False)
    assert not result.success
    error = step_failure(result)
    assert "ModelRaisedError: model m@1.0.0 raised ValueError: boom: the model's own error" in error
    assert 'm/model.py", line' in error and "in train" in error


def test_model_that_never_reports_is_a_failure(project: Project, store: LocalPexStore) -> None:
    defs = defs_for(failing_project(project, vanish=True), store)
    with DagsterInstance.ephemeral() as instance:
        result = run_client(defs, instance, "acme", raise_on_error=False)
    assert "model m@1.0.0 exited with code 0 while answering call 1" in step_failure(result)


def test_hanging_model_is_killed_at_its_timeout(project: Project, store: LocalPexStore) -> None:
    defs = defs_for(failing_project(project, hang=True), store, timeout_seconds=5)
    with DagsterInstance.ephemeral() as instance:
        result = run_client(defs, instance, "acme", raise_on_error=False)
    assert "ran longer than its timeout of 5 s and was killed" in step_failure(result)
    assert not leaked_children(), "the model's process group is gone"


def test_retry_policy_acts_on_model_failures(project: Project, store: LocalPexStore) -> None:
    defs = defs_for(failing_project(project, flaky=True), store)
    job = define_asset_job(
        "retrying", selection=AssetSelection.groups("acme"), op_retry_policy=RetryPolicy(max_retries=1)
    )
    defs = Definitions(assets=list(defs.assets), resources=defs.resources, jobs=[job], executor=defs.executor)
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("retrying").execute_in_process(instance=instance)
    assert result.success
    assert any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)


def test_failures_are_recorded_per_client_and_model(project: Project, store: LocalPexStore) -> None:
    defs = defs_for(failing_project(project, fail=True), store)
    with DagsterInstance.ephemeral() as instance:
        result = run_client(defs, instance, "acme", raise_on_error=False)
        (record,) = instance.fetch_observations(state("acme"), limit=1).records
        meta = {k: v.value for k, v in record.asset_observation.metadata.items()}
        assert (meta["client"], meta["model"], meta["failed_run"]) == ("acme", "m", result.run_id)
        assert "ValueError: boom" in meta["error"]

        run = instance.get_run_by_id(result.run_id)
        (failure,) = instance.all_logs(result.run_id, of_type=DagsterEventType.RUN_FAILURE)
        sensor = defs.resolve_sensor_def("modelpex_failures")
        context = build_run_status_sensor_context(
            sensor_name=sensor.name, dagster_instance=instance, dagster_run=run, dagster_event=failure.dagster_event
        ).for_run_failure()
        sensor(context)
        tags = instance.get_run_by_id(result.run_id).tags
    assert tags["modelpex/failed"] == "acme/m"
    assert "ValueError: boom" in tags["modelpex/error/acme.m"]


def test_one_failing_model_does_not_stop_the_others(project: Project, store: LocalPexStore) -> None:
    m_model(project, "1.0.0")
    write_model(
        project.models,
        "n",
        code=M_CODE.format(version="n").replace("m.model", "n.model"),
        tool=M_INPUTS.replace("m.model", "n.model"),
    )
    write_deployments(
        project,
        {
            "acme": {
                "datasets": {"data": {"generate": "customers", "rows": 20}},
                "models": {
                    "m": {"inputs": {"data": "data"}, "params": {"fail": True}},
                    "n": {"inputs": {"data": "data"}, "params": {"sleep": SLEEP}},
                },
            }
        },
    )
    defs = defs_for(project, store)
    with DagsterInstance.ephemeral() as instance:
        result = run_client(defs, instance, "acme", raise_on_error=False)
        assert not result.success
        assert instance.get_latest_materialization_event(state("acme", "n")) is not None
        assert instance.get_latest_materialization_event(state("acme")) is None
    assert "ValueError: boom" in step_failure(result)
    ends = {e.step_key: e for e in result.all_events if e.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE")}
    assert {key: e.event_type_value for key, e in ends.items()} == {
        "acme.data": "STEP_SUCCESS",
        "acme.m_train": "STEP_FAILURE",
        "acme.n_train": "STEP_SUCCESS",
        "acme.n_predict": "STEP_SUCCESS",
    }, "each model's training and prediction is a step of its own, with its own outcome; m's prediction never ran"
    meta = materialised(result)
    times = {key: ends[key].event_specific_data.duration_ms / 1000 for key in ("acme.n_train", "acme.n_predict")}
    assert SLEEP <= meta[state("acme", "n")]["model_seconds"] < times["acme.n_train"], "training timed in its step"
    assert SLEEP <= meta[predictions("acme", "n")]["model_seconds"] < times["acme.n_predict"], "and prediction in its"


def tick(
    defs: Definitions,
    project: Project,
    store: LocalPexStore,
    cursor: str | None,
    instance: DagsterInstance | None = None,
) -> SensorExecutionData:
    """One tick as the sensor daemon evaluates it: run requests resolved to the job and assets they will run."""
    sensor = defs.resolve_sensor_def("modelpex_redeploy")
    resource = ModelpexResource(project_dir=str(project.root), store_url=str(store.root))
    with (
        DagsterInstance.ephemeral() if instance is None else contextlib.nullcontext(instance) as instance,
        build_sensor_context(
            instance=instance, cursor=cursor, definitions=defs, resources={"modelpex": resource}
        ) as context,
    ):
        return sensor.evaluate_tick(context)


def test_redeploy_sensor_requests_what_changed_for_its_followers(two_versions: Project, store: LocalPexStore) -> None:
    project = two_versions
    defs = defs_for(project, store)
    first = tick(defs, project, store, None)
    assert not first.run_requests and first.cursor
    unchanged = tick(defs, project, store, first.cursor)
    assert not unchanged.run_requests

    model_py = project.models / "m" / "src" / "m" / "model.py"
    model_py.write_text(model_py.read_text() + "\n# a code change for the followers of 1.1.0\n")
    changed = tick(defs, project, store, unchanged.cursor)
    (request,) = changed.run_requests
    assert request.job_name == "__ASSET_JOB", "runs Dagster's asset job over exactly the selection below"
    assert set(request.asset_selection) == {
        version("m", "1.1.0"),
        state("globex"),
        predictions("globex"),
    }, "acme pins 1.0.0: it must not be redeployed"
    assert not tick(defs, project, store, changed.cursor).run_requests

    pyproject = project.models / "m" / "pyproject.toml"
    project.commit_and_tag("m 1.1.0 final", "m/v1.1.0")
    pyproject.write_text(pyproject.read_text().replace('version = "1.1.0"', 'version = "1.2.0"'))
    bumped = tick(defs, project, store, changed.cursor)
    (request,) = bumped.run_requests
    assert request.tags["modelpex/redeploy"] == "m@1.2.0"
    assert set(request.asset_selection) == {
        state("globex"),
        predictions("globex"),
    }

    (project.root / "base_env" / "src" / "modelpex_runtime" / "note.py").write_text("# base change\n")
    rebased = tick(defs, project, store, bumped.cursor)
    (request,) = rebased.run_requests
    assert request.tags["modelpex/redeploy"] == "base"
    assert AssetKey(["modelpex", "base"]) in request.asset_selection
    assert predictions("acme") in request.asset_selection


def test_redeploy_sensor_sees_new_tags_and_stored_versions(two_versions: Project, store: LocalPexStore) -> None:
    project = two_versions
    defs = defs_for(project, store)
    first = tick(defs, project, store, None)
    pyproject = project.models / "m" / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "1.1.0"', 'version = "2.0.0"'))
    project.commit_and_tag("m 2.0.0", "m/v2.0.0")
    pyproject.write_text(pyproject.read_text().replace('version = "2.0.0"', 'version = "1.1.0"'))
    project.commit_and_tag("back to developing 1.1.0")
    project.git("tag", "m/v9.9.9")  # N.B. Mislabelled: its tree says 1.1.0. Skipped with a warning, not fatal.
    with pytest.warns(UserWarning, match=r"ignoring git tag m/v9.9.9: .*holds m version 1.1.0"):
        tagged = tick(defs, project, store, first.cursor)
    (request,) = tagged.run_requests
    assert request.tags["modelpex/redeploy"] == "m@2.0.0"
    assert set(request.asset_selection) == {
        state("globex"),
        predictions("globex"),
    }

    builder = Builder(store, load_base_env(project.root / "base_env"))
    with tempfile.TemporaryDirectory() as exports:
        builder.model(resolve_source(project.root, project.models, ModelRef("m", "1.0.0"), Path(exports)))
    stored = tick(defs, project, store, tagged.cursor)
    (request,) = stored.run_requests
    assert request.tags["modelpex/redeploy"] == "m@1.0.0"
    assert state("acme") in request.asset_selection
    assert state("globex") not in request.asset_selection


def test_an_edit_reloaded_in_the_tick_that_sees_the_last_run_is_not_lost(
    two_versions: Project, store: LocalPexStore
) -> None:
    """A user edits again right after the last redeploy took effect: that run's materialisations and the reload with
    the new code versions reach the same automation tick. The edit still redeploys (it used to be lost: Dagster's
    `since` lets a same-tick reset win over `code_version_changed`)."""
    project = two_versions
    write_deployments(project, {"a": client("latest")})
    with DagsterInstance.ephemeral() as instance:
        defs = defs_for(project, store)
        assert defs.resolve_implicit_global_asset_job_def().execute_in_process(instance=instance).success
        tick = evaluate_automation_conditions(defs, instance)
        assert defs.resolve_implicit_global_asset_job_def().execute_in_process(instance=instance).success
        model_py = project.models / "m" / "src" / "m" / "model.py"
        model_py.write_text(model_py.read_text() + "\n# the next edit\n")
        tick = evaluate_automation_conditions(defs_for(project, store), instance, cursor=tick.cursor)
        assert requested(tick) == {"model/m/m_v1_1_0", "a/a_m_state", "a/a_m_predictions"}


def test_a_version_this_deployment_built_is_not_news(two_versions: Project, store: LocalPexStore) -> None:
    """The first deploy builds and publishes both versions: the store's new entries are its own work, not versions
    built elsewhere, so the next tick reruns nothing (it used to retrain every client once more)."""
    project = two_versions
    defs = defs_for(project, store)
    with DagsterInstance.ephemeral() as instance:
        first = tick(defs, project, store, None, instance)
        assert defs.resolve_implicit_global_asset_job_def().execute_in_process(instance=instance).success
        after = tick(defs, project, store, first.cursor, instance)
    assert not after.run_requests, [r.tags for r in after.run_requests]


def test_redeploy_sensor_deploys_a_client_moved_to_another_version(two_versions: Project, store: LocalPexStore) -> None:
    """acme moves from 1.0.0 to 1.1.0 and initech arrives: after the reload, those two run; globex stays put."""
    project = two_versions
    loaded = defs_for(project, store)
    first = tick(loaded, project, store, None)
    write_deployments(project, {"acme": client("1.1.0"), "globex": client("latest"), "initech": client("1.0.0")})
    not_yet = tick(loaded, project, store, first.cursor)
    assert not not_yet.run_requests
    assert "deployments.yaml changed since the code location loaded: reload" in not_yet.skip_message
    reloaded = defs_for(project, store)
    moved = tick(reloaded, project, store, first.cursor)
    requests = {r.tags["modelpex/redeploy"]: set(r.asset_selection) for r in moved.run_requests}
    assert requests == {
        "acme/m -> m@1.1.0": {
            version("m", "1.1.0"),
            state("acme"),
            predictions("acme"),
        },
        "initech/m -> m@1.0.0": {
            version("m", "1.0.0"),
            dataset_key("initech", "data"),
            state("initech"),
            predictions("initech"),
        },
    }
    settled = tick(reloaded, project, store, moved.cursor)
    assert not settled.run_requests and settled.skip_message == "nothing changed"
    legacy = json.loads(first.cursor)
    del legacy["deployed"]  # N.B. A cursor written before the sensor tracked deployments: nothing counts as moved.
    assert not tick(reloaded, project, store, json.dumps(legacy)).run_requests

    project.commit_and_tag("m 1.1.0 released", "m/v1.1.0")
    pyproject = project.models / "m" / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "1.1.0"', 'version = "0.9.0"'))
    unfollowed = tick(reloaded, project, store, settled.cursor)
    assert not unfollowed.run_requests, "no client runs 0.9.0, and the loaded definitions have no asset for it"
    assert "model versions without an asset yet: m@0.9.0" in unfollowed.skip_message

    with DagsterInstance.ephemeral() as instance:
        job = reloaded.resolve_implicit_global_asset_job_def()
        result = job.execute_in_process(instance=instance, asset_selection=list(requests["initech/m -> m@1.0.0"]))
    assert result.success, "a new client deploys from the sensor's request alone"
    assert {k.path[0] for k in materialised(result)} == {"model", "initech"}


@pytest.fixture
def daemon_instance(tmp_path: Path, two_versions: Project, store: LocalPexStore, monkeypatch):
    """A persistent instance whose queue never starts a run: what the sensor launches stays there to be counted."""
    monkeypatch.setenv("MODELPEX_PROJECT", str(two_versions.root))
    monkeypatch.setenv("MODELPEX_STORE", str(store.root))
    monkeypatch.setenv("MODELPEX_SENSOR_INTERVAL", "1")
    queue = {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}
    overrides = {"run_coordinator": {**queue, "config": {"max_concurrent_runs": 0}}}
    (tmp_path / "dagster_home").mkdir()
    with instance_for_test(overrides=overrides, temp_dir=str(tmp_path / "dagster_home")) as instance:
        yield instance


class SensorDaemon:
    """The sensor daemon's own loop (``execute_sensor_iteration``) over a code location it loads in a gRPC server,
    as `dagster-daemon run` does: run keys are deduplicated against the instance's runs."""

    def __init__(self, instance: DagsterInstance, context) -> None:
        self.instance, self.context = instance, context

    def tick(self) -> list:
        """One tick of the redeploy sensor; the runs it launched, newest first."""
        before = {r.run_id for r in self.runs()}
        time.sleep(1.1)  # N.B. MODELPEX_SENSOR_INTERVAL=1: the daemon skips a sensor evaluated less than 1 s ago.
        logger = logging.getLogger("SensorDaemon")
        list(execute_sensor_iteration(self.context, logger, threadpool_executor=None, submit_threadpool_executor=None))
        ticks = self.instance.get_ticks(self.origin_id, self.selector_id, limit=1)
        assert ticks and ticks[0].status != TickStatus.FAILURE, ticks and ticks[0].error
        return [r for r in self.runs() if r.run_id not in before]

    def runs(self) -> list:
        return self.instance.get_runs(filters=RunsFilter(tags={SENSOR_NAME_TAG: "modelpex_redeploy"}))

    def reload(self) -> None:
        self.context.reload_code_location("modelpex")

    @property
    def _sensor(self):
        location = next(iter(self.context.create_request_context().get_code_location_entries().values()))
        return next(iter(location.code_location.get_repositories().values())).get_sensor("modelpex_redeploy")

    @property
    def origin_id(self) -> str:
        return self._sensor.get_remote_origin_id()

    @property
    def selector_id(self) -> str:
        return self._sensor.selector_id


@pytest.fixture
def sensor_daemon(daemon_instance: DagsterInstance) -> SensorDaemon:
    target = ModuleTarget(
        module_name="orchestrator.definitions", attribute="defs", working_directory=None, location_name="modelpex"
    )
    with create_test_daemon_workspace_context(target, daemon_instance) as context:
        yield SensorDaemon(daemon_instance, context)


def test_every_change_redeploys_even_back_to_content_seen_before(
    two_versions: Project, sensor_daemon: SensorDaemon
) -> None:
    """A -> B -> A -> B, a client moved and moved back, a base changed and reverted: each change launches its run on
    one persistent instance, where Dagster drops a run whose key it has seen."""
    project, daemon = two_versions, sensor_daemon
    assert not daemon.tick(), "the first tick only remembers the tree"
    model_py = project.models / "m" / "src" / "m" / "model.py"
    a = model_py.read_text()
    for edit, content in enumerate([a + "\n# B\n", a, a + "\n# B\n"]):
        model_py.write_text(content)
        (run,) = daemon.tick()
        assert run.tags["modelpex/redeploy"] == "m@1.1.0", f"edit {edit}"
        assert predictions("globex") in run.asset_selection
        assert not daemon.tick(), "an unchanged tree launches nothing"

    for version in ("1.1.0", "1.0.0"):  # N.B. acme moves to 1.1.0, then back to the 1.0.0 it ran before.
        write_deployments(project, {"acme": client(version), "globex": client("latest")})
        daemon.reload()
        (run,) = daemon.tick()
        assert run.tags["modelpex/redeploy"] == f"acme/m -> m@{version}"
        assert state("acme") in run.asset_selection

    note = project.root / "base_env" / "src" / "modelpex_runtime" / "note.py"
    for change in (lambda: note.write_text("# base change\n"), note.unlink):
        change()
        (run,) = daemon.tick()
        assert run.tags["modelpex/redeploy"] == "base"
    assert len(daemon.runs()) == 7
    assert len({r.tags[RUN_KEY_TAG] for r in daemon.runs()}) == 7


def requested(result) -> set[str]:
    """Asset keys (as strings) that one automation tick requests."""
    return {r.key.to_user_string() for r in result.results if r.true_subset.size}


def test_automation_redeploys_exactly_what_changed(two_versions: Project, store: LocalPexStore) -> None:
    """Tick by tick on one instance, as the daemon evaluates the conditions after each reload: an edit rebuilds the
    version's pex and retrains its followers (and predicts) in one tick; a client moved back to a version it ran
    before retrains; an unchanged tree requests nothing."""
    project = two_versions
    write_deployments(project, {"a": client("latest"), "b": client("1.0.0"), "c": client("latest")})
    with DagsterInstance.ephemeral() as instance:
        defs = defs_for(project, store)
        assert defs.resolve_implicit_global_asset_job_def().execute_in_process(instance=instance).success
        tick = evaluate_automation_conditions(defs, instance)
        assert requested(tick) == set(), "the first tick only remembers code versions"
        assert requested(tick := evaluate_automation_conditions(defs, instance, cursor=tick.cursor)) == set()

        model_py = project.models / "m" / "src" / "m" / "model.py"
        model_py.write_text(model_py.read_text() + "\n# an edit of 1.1.0\n")
        tick = evaluate_automation_conditions(defs_for(project, store), instance, cursor=tick.cursor)
        assert requested(tick) == {
            "model/m/m_v1_1_0",
            "a/a_m_state",
            "a/a_m_predictions",
            "c/c_m_state",
            "c/c_m_predictions",
        }

        for version in ("1.1.0", "1.0.0"):  # N.B. b moves, then back to the version it ran before.
            write_deployments(project, {"a": client("latest"), "b": client(version), "c": client("latest")})
            reloaded = defs_for(project, store)
            tick = evaluate_automation_conditions(reloaded, instance, cursor=tick.cursor)
            assert requested(tick) == {"b/b_m_state", "b/b_m_predictions"}, version
            tick = evaluate_automation_conditions(reloaded, instance, cursor=tick.cursor)
            assert requested(tick) == set(), "requested once"
