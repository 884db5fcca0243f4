"""Sensors: redeploy what changed, for the clients that run it, and record which client and model failed.

The redeploy sensor's cursor is a snapshot of content keys (the base's, every model version's), of the model
versions in the store, and of the version each client's model resolves to. A tick compares the tree with it: a
changed model version requests one run of that version's asset and of the follower clients' assets; a client's
model that deployments.yaml moved to another version (or added) requests a run of that client's model; a changed
base requests everything; an unchanged tree requests nothing.

N.B. Dagster launches at most one run per run key per sensor, ever. Content alone cannot key a run: a model edited
A -> B -> A -> B would redeploy B once. Each tick that requests runs therefore starts a new generation, counted in the
cursor, and every run key carries it. A tick that is evaluated again (its runs launched, its cursor not saved) has
the same generation and so the same keys: Dagster's deduplication still covers what it is for.
"""

import json
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from dagster import (
    AssetKey,
    AssetSelection,
    DagsterEventType,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    run_failure_sensor,
    sensor,
)

from orchestrator.assets import dataset_key, predictions_key, state_key
from orchestrator.build import Builder, Interpreter
from orchestrator.deployments import Deployments, ModelDeployment
from orchestrator.resources import ModelpexResource

__all__ = ["failure_sensor", "redeploy_sensor", "snapshot"]


def snapshot(modelpex: ModelpexResource, deployments: Deployments) -> dict[str, Any]:
    """Content keys of the base and of every model version as they are now, what the store holds, and the version
    each client's model resolves to."""
    settings, catalog = modelpex.settings, modelpex.catalog()
    # N.B. A fresh Builder, not the resource's: that one keeps the base_env it read first, and this tick must see now's.
    builder = Builder(settings.store(), settings.base_env(), Interpreter.detect(settings.python))
    return {
        "base": builder.base_key,
        "models": {f"{v.name}@{v.version}": builder.model_key(v.digest) for v in catalog.all()},
        "stored": sorted({r.label for r in settings.store().records() if r.kind == "model"}),
        "deployed": deployments.running(catalog),
    }


def redeploy_sensor(
    deployments: Deployments,
    version_assets: Mapping[str, AssetKey],
    minimum_interval_seconds: int = 30,
):
    """The sensor, closed over the definitions it may select from (``version_assets``: ``name@version`` -> key).

    It targets assets, not a job: Dagster runs each request's selection with its implicit asset job.
    """

    @sensor(
        name="modelpex_redeploy",
        asset_selection=AssetSelection.all(),
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            "Rebuilds a model version whose folder, tag or stored pex changed and re-runs its followers; deploys a "
            "client's model that deployments.yaml moved to another version (once the code location reloads)."
        ),
    )
    def _redeploy(context: SensorEvaluationContext, modelpex: ModelpexResource) -> SensorResult:
        now = snapshot(modelpex, deployments)
        if not context.cursor:
            return SensorResult(skip_reason="first tick: remembered the current tree", cursor=_cursor(now, 0))
        before = json.loads(context.cursor)
        generation = int(before.get("generation", 0)) + 1
        if now["base"] != before["base"]:
            request = RunRequest(  # N.B. No selection: everything.
                run_key=f"{generation}:base:{now['base']}", tags={"modelpex/redeploy": "base"}
            )
            return SensorResult(run_requests=[request], cursor=_cursor(now, generation))
        requests = _version_requests(before, now, deployments, version_assets, generation)
        requests += _moved_requests(before, now, deployments, version_assets, requests, generation)
        cursor = _cursor(now, generation if requests else generation - 1)
        for request in requests:
            context.log.info(f"redeploying {request.tags['modelpex/redeploy']} for {request.tags['modelpex/clients']}")
        stale = _stale(deployments, version_assets, now)
        if stale:
            context.log.warning(stale)
        skip = None if requests else "; ".join(filter(None, ["nothing changed", stale]))
        return SensorResult(run_requests=requests, cursor=cursor, skip_reason=skip)

    return _redeploy


def _cursor(now: dict[str, Any], generation: int) -> str:
    return json.dumps({**now, "generation": generation}, sort_keys=True)


def _stale(deployments: Deployments, version_assets: Mapping[str, AssetKey], now: dict[str, Any]) -> str:
    """What the loaded definitions miss: a new model version has no asset, an edited deployments.yaml is not in
    effect, until the code location reloads."""
    missing = sorted(set(now["models"]) - set(version_assets))
    stale = [f"model versions without an asset yet: {', '.join(missing)}"] if missing else []
    if deployments.changed_on_disk():
        stale.append(f"{deployments.path.name} changed since the code location loaded")
    return f"{' and '.join(stale)}: reload the code location (UI: Deployment > Reload)" if stale else ""


def _request(key: str, selection: list[AssetKey], label: str, clients: list[str]) -> RunRequest:
    tags = {"modelpex/redeploy": label, "modelpex/clients": (",".join(clients) or "no client")[:63]}
    return RunRequest(run_key=key, asset_selection=selection, tags=tags)


def _version_requests(
    before: dict[str, Any],
    now: dict[str, Any],
    deployments: Deployments,
    version_assets: Mapping[str, AssetKey],
    generation: int,
) -> list[RunRequest]:
    """One run per model version whose content changed or that appeared (in the tree, as a tag, or in the store):
    that version's pex and the assets of the clients that run it."""
    changed = {label for label, key in now["models"].items() if before["models"].get(label) != key}
    changed |= set(now["stored"]) - set(before["stored"])
    running: dict[str, list[ModelDeployment]] = defaultdict(list)
    for d in deployments.all():
        running[now["deployed"][d.where]].append(d)
    requests = []
    for label in sorted(changed):
        followers = running.get(label, [])
        selection = [version_assets[label]] if label in version_assets else []
        selection += [key for d in followers for key in (state_key(d), predictions_key(d))]
        if selection:
            key = f"{generation}:{label}:{now['models'].get(label, 'stored')}"
            requests.append(_request(key, selection, label, [d.client for d in followers]))
    return requests


def _moved_requests(
    before: dict[str, Any],
    now: dict[str, Any],
    deployments: Deployments,
    version_assets: Mapping[str, AssetKey],
    already: list[RunRequest],
    generation: int,
) -> list[RunRequest]:
    """One run per client's model that now runs another version (or is new) and no version run covers.

    N.B. A cursor from before the sensor tracked deployments has no "deployed": nothing counts as moved then.
    """
    if "deployed" not in before:
        return []
    covered = {key for request in already for key in request.asset_selection or ()}
    requests = []
    for d in deployments.all():
        label = now["deployed"][d.where]
        if before["deployed"].get(d.where) == label or state_key(d) in covered:
            continue
        selection = [version_assets[label]] if label in version_assets else []
        if d.where not in before["deployed"]:  # N.B. New: its datasets may never have been materialised.
            selection += [dataset_key(d.client, dataset) for dataset in d.inputs.values()]
        selection += [state_key(d), predictions_key(d)]
        key = f"{generation}:{d.where}:{label}:{now['models'].get(label, 'stored')}"
        requests.append(_request(key, selection, f"{d.where} -> {label}", [d.client]))
    return requests


def failure_sensor():
    """Tag a failed run with the client/model pairs that failed and each model's error.

    The step records each failure on its asset as it happens (an observation with the model's error); this sensor
    lifts them to the run, so the Runs page can be filtered by ``modelpex/failed``.
    """

    @run_failure_sensor(
        name="modelpex_failures",
        default_status=DefaultSensorStatus.RUNNING,
        monitor_all_code_locations=False,
        description="Tags a failed run with the client/model pairs that failed (modelpex/failed) and their errors.",
    )
    def _failures(context: RunFailureSensorContext) -> None:
        run_id = context.dagster_run.run_id
        records = context.instance.get_records_for_run(run_id, of_type=DagsterEventType.ASSET_OBSERVATION).records
        failed = {}
        for record in records:
            observation = record.event_log_entry.asset_observation
            meta = {k: v.value for k, v in (observation.metadata if observation else {}).items()}
            if "error" in meta and meta.get("failed_run") == run_id:
                failed[f"{meta['client']}/{meta['model']}"] = str(meta["error"]).splitlines()[0]
        if not failed:
            return
        tags = {"modelpex/failed": ",".join(sorted(failed))}
        tags |= {f"modelpex/error/{pair.replace('/', '.')}": error[:200] for pair, error in sorted(failed.items())}
        context.instance.add_run_tags(run_id, tags)
        context.log.info(f"run {run_id}: {', '.join(f'{p}: {e}' for p, e in sorted(failed.items()))}")

    return _failures
