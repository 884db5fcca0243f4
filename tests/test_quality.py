"""How well each client's model does, as the UI shows it: metrics a model reports, statistics of its predictions,
asset checks that pass, fail and block, data versions that keep what did not change in sync, run tags, the
build_model launchpad and links to the code. Real pexes, real model processes, a real Dagster instance."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.csv
import pytest
from dagster import (
    AssetCheckSeverity,
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    DagsterInvalidConfigError,
    Definitions,
    MaterializeResult,
    MetadataValue,
    asset,
)
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from orchestrator.assets import dataset_key
from orchestrator.checks import PredictionCheck
from orchestrator.datasets import customers
from orchestrator.metadata import frame_metadata, frame_version, human_duration, human_size
from orchestrator.specs import ColumnCheck
from orchestrator.store import LocalPexStore

from .conftest import Project
from .test_dagster import (
    client,
    defs_for,
    m_model,
    materialised,
    predictions,
    run_client,
    state,
    step_failure,
    version,
    write_deployments,
)

CONTRACT = """
[tool.modelpex.predictions]
columns = ["customer_id", "score"]

[tool.modelpex.predictions.checks]
score = {min = -1000, max = 1000}
band = {values = ["high", "low"], severity = "warn"}
"""


def checks_of(instance: DagsterInstance, run_id: str) -> dict[str, tuple[bool, AssetCheckSeverity, dict]]:
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION).records
    found = {}
    for record in records:
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        metadata = {k: v.value for k, v in evaluation.metadata.items()}
        found[evaluation.check_name] = (evaluation.passed, evaluation.severity, metadata)
    return found


def with_report(defs: Definitions) -> Definitions:
    """The code location plus a user's asset downstream of acme's predictions: what a blocking check protects."""

    @asset(key=AssetKey(["acme", "report"]), deps=[predictions("acme")], group_name="acme")
    def report() -> MaterializeResult:
        return MaterializeResult()

    return Definitions(assets=[*defs.assets, report], resources=defs.resources, executor=defs.executor)


def test_train_reports_metrics_returned_and_through_pipes(project: Project, store: LocalPexStore) -> None:
    m_model(project, "1.0.0")
    report = {"note": "reported through Pipes", "state_sha256": "forged by the model"}
    write_deployments(project, {"acme": client("latest", metrics={"auc": 0.875, "rows": 40}, report=report)})
    defs = defs_for(project, store)
    with DagsterInstance.ephemeral() as instance:
        result = run_client(defs, instance, "acme")
        event = instance.get_latest_materialization_event(state("acme"))
    trained = event.asset_materialization.metadata
    assert trained["metric/auc"] == MetadataValue.float(0.875), "a number Dagster plots"
    assert trained["metric/rows"] == MetadataValue.float(40.0)
    assert trained["note"].value == "reported through Pipes"
    assert trained["state_sha256"].value != "forged by the model", "what modelpex vouches for is its own"
    assert result.success, "the prediction loaded the state by the digest modelpex recorded"
    assert materialised(result)[state("acme")]["params"] == {"metrics": {"auc": 0.875, "rows": 40}, "report": report}


def test_a_metric_that_is_not_a_number_fails_the_training(project: Project, store: LocalPexStore) -> None:
    m_model(project, "1.0.0")
    write_deployments(project, {"acme": client("latest", metrics={"auc": "high"})})
    with DagsterInstance.ephemeral() as instance:
        result = run_client(defs_for(project, store), instance, "acme", raise_on_error=False)
    assert "metric 'auc' = 'high' is not a finite number" in step_failure(result)


def test_each_check_of_the_predictions_runs_and_passes(project: Project, store: LocalPexStore) -> None:
    m_model(project, "1.0.0", CONTRACT)
    write_deployments(project, {"acme": client("latest")})
    defs = defs_for(project, store)
    graph = defs.resolve_asset_graph()
    assert {k.name for k in graph.asset_check_keys} == {"rows_match_input", "no_nulls", "score_range", "band_values"}
    assert {k.name for k in graph.asset_check_keys if graph.get_check_spec(k).blocking} == {
        "rows_match_input",
        "no_nulls",
        "score_range",
    }, "severity warn does not block"
    with DagsterInstance.ephemeral() as instance:
        result = run_client(with_report(defs), instance, "acme")
        checks = checks_of(instance, result.run_id)
    assert {name: passed for name, (passed, _, _) in checks.items()} == {
        "rows_match_input": True,
        "no_nulls": True,
        "score_range": True,
        "band_values": True,
    }
    assert checks["rows_match_input"][2] == {"rows": 50, "rows of data": 50}


def test_a_failed_check_is_visible_and_blocks_what_follows(project: Project, store: LocalPexStore) -> None:
    """Nulls in a declared column: the no_nulls check fails (error severity), the prediction step fails with it, and
    the asset downstream of the predictions does not run."""
    m_model(project, "1.0.0", CONTRACT)
    write_deployments(project, {"acme": client("latest", null_every=5)})
    with DagsterInstance.ephemeral() as instance:
        result = run_client(with_report(defs_for(project, store)), instance, "acme", raise_on_error=False)
        checks = checks_of(instance, result.run_id)
        assert instance.get_latest_materialization_event(AssetKey(["acme", "report"])) is None
        assert instance.get_latest_materialization_event(predictions("acme")) is not None, "visible, not hidden"
    passed, severity, metadata = checks["no_nulls"]
    assert (passed, severity, metadata["nulls"]) == (False, AssetCheckSeverity.ERROR, {"customer_id": 0, "score": 10})
    assert checks["score_range"][0] is False and checks["score_range"][2]["rows outside"] == 10
    assert "2 blocking asset checks failed with ERROR severity" in step_failure(result)


def test_a_warning_check_blocks_nothing(project: Project, store: LocalPexStore) -> None:
    m_model(project, "1.0.0", CONTRACT.replace('values = ["high", "low"]', 'values = ["high"]'))
    write_deployments(project, {"acme": client("latest")})
    with DagsterInstance.ephemeral() as instance:
        result = run_client(with_report(defs_for(project, store)), instance, "acme")
        checks = checks_of(instance, result.run_id)
        assert instance.get_latest_materialization_event(AssetKey(["acme", "report"])) is not None
    passed, severity, metadata = checks["band_values"]
    assert (passed, severity, metadata["unexpected values"]) == (False, AssetCheckSeverity.WARN, "low")
    assert result.success


def test_rows_match_the_input_unless_the_model_says_any(project: Project, store: LocalPexStore) -> None:
    m_model(project, "1.0.0")
    write_deployments(project, {"acme": client("latest", rows_out=7)})
    with DagsterInstance.ephemeral() as instance:
        result = run_client(defs_for(project, store), instance, "acme", raise_on_error=False)
        checks = checks_of(instance, result.run_id)
    assert checks["rows_match_input"] == (False, AssetCheckSeverity.ERROR, {"rows": 7, "rows of data": 50})

    m_model(project, "1.0.0", '\n[tool.modelpex.predictions]\nrows = "any"\n')
    with DagsterInstance.ephemeral() as instance:
        defs = defs_for(project, store)
        assert not defs.resolve_asset_graph().asset_check_keys
        assert run_client(defs, instance, "acme").success


def test_prediction_statistics(project: Project, store: LocalPexStore) -> None:
    m_model(project, "1.0.0")
    write_deployments(project, {"acme": client("latest", null_every=10)})
    with DagsterInstance.ephemeral() as instance:
        result = run_client(defs_for(project, store), instance, "acme")
    meta = materialised(result)[predictions("acme")]
    scores = result.output_for_node("acme", "m__predictions")["score"].to_pylist()
    assert meta["dagster/row_count"] == 50 and meta["nulls"] == 5
    columns = {r.data["column"]: r.data for r in meta["columns"].records}
    assert columns["score"]["nulls"] == 5 and columns["score"]["type"] == "double"
    assert float(columns["customer_id"]["min"]) == 0 and float(columns["customer_id"]["max"]) == 49
    balance = {(r.data["column"], r.data["value"]): r.data["rows"] for r in meta["class_balance"].records}
    assert balance[("band", "low")] + balance[("band", "high")] == 50 and balance[("version", "1.0.0")] == 50
    mean = statistics.fmean(s for s in scores if s is not None)  # N.B. Computed here, from the predictions.
    assert math.isclose(meta["mean/score"], mean, rel_tol=1e-4, abs_tol=1e-4), (meta["mean/score"], mean)
    assert math.isclose(columns["score"]["mean"], mean, rel_tol=1e-4, abs_tol=1e-4) and "mean/customer_id" not in meta


def test_hourly_predictions_leave_the_state_in_sync(project: Project, store: LocalPexStore) -> None:
    """Re-materialising an input that did not change keeps what depends on it in sync; one that did change does
    not. (Without data versions every hourly run left the state "Unsynced".)"""
    m_model(project, "1.0.0")
    data = project.root / "data.csv"
    pyarrow.csv.write_csv(customers(40, seed=1), data)
    write_deployments(
        project,
        {"acme": {"datasets": {"data": {"path": "data.csv"}}, "models": {"m": {"inputs": {"data": "data"}}}}},
    )
    defs = defs_for(project, store)
    job = defs.resolve_implicit_global_asset_job_def()
    hourly = [dataset_key("acme", "data"), predictions("acme")]

    def status(instance: DagsterInstance, key: AssetKey) -> StaleStatus:
        return get_stale_status_resolver(instance, list(defs.assets)).get_status(key)

    with DagsterInstance.ephemeral() as instance:
        assert run_client(defs, instance, "acme").success
        assert job.execute_in_process(instance=instance, asset_selection=hourly).success
        assert status(instance, state("acme")) == StaleStatus.FRESH
        assert status(instance, predictions("acme")) == StaleStatus.FRESH
        pyarrow.csv.write_csv(customers(40, seed=2), data)
        assert job.execute_in_process(instance=instance, asset_selection=[dataset_key("acme", "data")]).success
        assert status(instance, state("acme")) == StaleStatus.STALE, "new data: the state is honestly out of sync"


def test_everything_is_in_sync_after_a_deploy_and_a_build(project: Project, store: LocalPexStore) -> None:
    """What `modelpex deploy` runs (every asset) leaves every asset in sync, the states included (their training
    waits for their pex and records its data version); so does a build through `build_model` of a version clients
    run (it records the pex's sha256 as its data version, as the asset does)."""
    m_model(project, "1.0.0")
    project.commit_and_tag("m 1.0.0", "m/v1.0.0")
    m_model(project, "1.1.0")
    write_deployments(project, {"acme": client("1.0.0"), "globex": client("latest")})
    defs = defs_for(project, store)
    everything = list(defs.resolve_asset_graph().get_all_asset_keys())

    def unsynced(instance: DagsterInstance) -> list[str]:
        resolver = get_stale_status_resolver(instance, list(defs.assets))
        return sorted(k.to_user_string() for k in everything if resolver.get_status(k) != StaleStatus.FRESH)

    with DagsterInstance.ephemeral() as instance:
        assert defs.resolve_implicit_global_asset_job_def().execute_in_process(instance=instance).success
        assert unsynced(instance) == []
        chosen = {"ops": {"build_or_fetch_model": {"config": {"model_version": "m@1.0.0"}}}}
        assert defs.resolve_job_def("build_model").execute_in_process(instance=instance, run_config=chosen).success
        assert unsynced(instance) == []


def test_runs_carry_client_model_version_and_action_tags(project: Project, store: LocalPexStore) -> None:
    """A run launched from the asset graph (no job, schedule or sensor of ours) is tagged by its first step."""
    m_model(project, "1.0.0")
    write_deployments(project, {"acme": client("latest"), "globex": client("1.0.0")})
    defs = defs_for(project, store)
    job = defs.resolve_implicit_global_asset_job_def()
    with DagsterInstance.ephemeral() as instance:
        assert run_client(defs, instance, "acme").success
        result = job.execute_in_process(instance=instance, asset_selection=[predictions("acme")])
        tags = instance.get_run_by_id(result.run_id).tags
    assert (tags["client"], tags["model"], tags["version"], tags["action"]) == ("acme", "m", "m@1.0.0", "predict")


def test_build_model_opens_on_a_valid_choice(project: Project, store: LocalPexStore) -> None:
    m_model(project, "1.0.0")
    project.commit_and_tag("m 1.0.0", "m/v1.0.0")
    m_model(project, "1.1.0")
    write_deployments(project, {"acme": client("latest")})
    defs = defs_for(project, store)
    job = defs.resolve_job_def("build_model")
    choices = job.run_config_schema.config_type.fields["ops"].config_type.fields["build_or_fetch_model"]
    config = choices.config_type.fields["config"].config_type.fields["model_version"]
    assert [v.config_value for v in config.config_type.enum_values] == ["m@latest", "m@1.0.0", "m@1.1.0"]
    assert config.default_value == "m@latest" and config.config_type.given_name == "ModelVersion"
    with DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(instance=instance)  # N.B. No config: what the launchpad opens with.
        event = instance.get_latest_materialization_event(version("m", "1.1.0"))
    assert result.success and event is not None and event.run_id == result.run_id, "the version's asset, built"
    built = event.asset_materialization
    assert built.metadata["version"].value == "1.1.0"
    (stored,) = store.find("model", "m", "1.1.0")
    assert built.tags["dagster/data_version"] == built.metadata["sha256"].value == stored.sha256
    with pytest.raises(DagsterInvalidConfigError, match="m@9.9.9"):
        job.execute_in_process(run_config={"ops": {"build_or_fetch_model": {"config": {"model_version": "m@9.9.9"}}}})
    with pytest.raises(DagsterInvalidConfigError, match='unexpected config entry "project_dir"'):
        job.execute_in_process(run_config={"resources": {"modelpex": {"config": {"project_dir": "/elsewhere"}}}})


def test_git_commit_links_to_the_remote(project: Project, store: LocalPexStore) -> None:
    m_model(project, "1.0.0")
    write_deployments(project, {"acme": client("latest")})
    commit = project.commit_and_tag("m 1.0.0", "m/v1.0.0")
    project.git("remote", "add", "origin", "git@github.com:acme/models.git")
    defs = defs_for(project, store)
    spec = defs.resolve_asset_graph().get(version("m", "1.0.0"))
    (reference,) = spec.metadata["dagster/code_references"].code_references
    assert reference.url == "https://github.com/acme/models/tree/HEAD/model_packages/m"
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance, asset_selection=[version("m", "1.0.0")]
        )
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["git_commit"] == MetadataValue.url(f"https://github.com/acme/models/commit/{commit}")
    assert meta["pex_size"].value.endswith(" MB")


def test_human_units() -> None:
    assert [human_size(n) for n in (850, 12_345, 1_150_000, 3_200_000_000)] == ["850 B", "12.3 KB", "1.15 MB", "3.2 GB"]
    assert [human_duration(s) for s in (0.00042, 0.0123, 1.62, 125, 3720)] == [
        "420 µs",
        "12.3 ms",
        "1.62 s",
        "2 min 05 s",
        "1 h 02 min",
    ]


def test_frame_statistics_and_versions() -> None:
    table = pa.table(
        {"p": [0.1, None, 0.7], "band": pa.array(["a", "b", "a"]).dictionary_encode(), "day": pa.array([1, 2, 3])}
    )
    meta = frame_metadata(table)
    assert meta["nulls"].value == 1 and meta["dagster/row_count"].value == 3
    balance = {(r.data["column"], r.data["value"]): r.data["share"] for r in meta["class_balance"].value.records}
    assert balance == {("band", "a"): 0.6667, ("band", "b"): 0.3333}
    # N.B. The same values in two record batches, and in other column chunks, hash as one.
    rechunked = pa.Table.from_batches([*table.slice(0, 1).to_batches(), *table.slice(1).to_batches()])
    assert frame_version(table) == frame_version(rechunked)
    changed = table.set_column(0, "p", pa.array([0.1, None, 0.8]))
    assert len({frame_version(t) for t in (table, changed, table.slice(1), table.select(["band", "p", "day"]))}) == 4


def test_checks_treat_nulls_and_unexpected_values_as_outside() -> None:
    table = pa.table({"band": pa.array(["a", None, "c", "c"]).dictionary_encode(), "p": [0.5, 2.0, None, 0.1]})
    values = PredictionCheck("band_values", "", "error", rule=ColumnCheck("band", values=("a", "b")))
    result = values.result(AssetKey("x"), table, {})
    assert not result.passed and result.metadata["rows outside"].value == 3
    bounds = PredictionCheck("p_range", "", "warn", rule=ColumnCheck("p", min=0, max=1))
    result = bounds.result(AssetKey("x"), table, {})
    assert (result.passed, result.severity, result.metadata["rows outside"].value) == (
        False,
        AssetCheckSeverity.WARN,
        2,
    )
    missing = PredictionCheck("q_range", "", "error", rule=ColumnCheck("q", min=0)).result(AssetKey("x"), table, {})
    assert not missing.passed and "no column 'q'" in missing.metadata["problem"].value


def test_a_check_with_a_value_of_another_type_fails_not_crashes(tmp_path: Path) -> None:
    table = pa.table({"band": ["a", "b"]})
    check = PredictionCheck("band_range", "", "error", rule=ColumnCheck("band", min=0, max=1))
    result = check.result(AssetKey("x"), table, {})
    assert not result.passed and "not numeric" in result.metadata["problem"].value
