"""Sensors: notice what changed, for the clients that run it, and record which client and model failed.

The redeploy sensor's cursor is a snapshot of content keys (the base's, every model version's), of the model
versions in the store, and of the version each client's model resolves to. What conditions cannot see is its job:
model folders, release tags and deployments.yaml change outside Dagster, and a version may arrive in the store.

- With a webserver to reload through (MODELPEX_WEBSERVER_URL, which `modelpex ui` sets), a tree that differs from
  the one the definitions were built from reloads the code location: new versions get their assets, and the new
  code versions let the automation conditions (orchestrator/automation.py) rebuild and retrain what changed.
- Without one, the sensor requests those runs itself: a changed model version, that version's asset and its
  follower clients' assets; a client's model that deployments.yaml moved (or added), that client's model; a
  changed base, everything. New versions and an edited deployments.yaml then wait for a reload to show.
- Either way, a version that appeared in the store (built elsewhere) runs for its followers.

N.B. Dagster launches at most one run per run key per sensor, ever. Content alone cannot key a run: a model edited
A -> B -> A -> B would redeploy B once. Each tick that requests runs therefore starts a new generation, counted in the
cursor, and every run key carries it. A tick that is evaluated again (its runs launched, its cursor not saved) has
the same generation and so the same keys: Dagster's deduplication still covers what it is for.
"""

import hashlib
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from dagster import (
    AssetKey,
    AssetSelection,
    DagsterEventType,
    DagsterInstance,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    run_failure_sensor,
    sensor,
)

from orchestrator.assets import dataset_key, predictions_key, state_key
from orchestrator.deployments import Deployments, ModelDeployment
from orchestrator.resources import ModelpexResource

__all__ = ["failure_sensor", "redeploy_sensor", "snapshot"]


def snapshot(modelpex: ModelpexResource, deployments: Deployments) -> dict[str, Any]:
    """Content keys of the base and of every model version as they are now, what the store holds, and the version
    each client's model resolves to."""
    settings, catalog = modelpex.settings, modelpex.catalog()
    # N.B. A fresh Builder, not the resource's: that one keeps the base_env it read first, and this tick must see now's.
    builder = settings.builder()
    return {
        "base": builder.base_key,
        "models": {f"{v.name}@{v.version}": builder.model_key(v.digest) for v in catalog.all()},
        "stored": sorted({r.label for r in settings.store().records() if r.kind == "model"}),
        "deployed": deployments.running(catalog),
    }


def redeploy_sensor(
    deployments: Deployments,
    version_assets: Mapping[str, AssetKey],
    loaded: Mapping[str, Any],
    minimum_interval_seconds: int = 30,
    webserver_url: str | None = None,
):
    """The sensor, closed over the definitions it may select from (``version_assets``: ``name@version`` -> key) and
    the tree they were built from (``loaded``: a `snapshot` without "stored").

    With ``webserver_url`` a changed tree reloads the code location, and the assets' automation conditions redeploy
    what the new code versions say changed; without it, the sensor requests those runs itself. Either way a version
    that only appeared in the store (built elsewhere) is run for its followers here. Requests target assets, not a
    job: Dagster runs each request's selection with its implicit asset job.
    """

    @sensor(
        name="modelpex_redeploy",
        asset_selection=AssetSelection.all(),
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            "Watches model folders, release tags, the store, base_env and deployments.yaml. A changed tree reloads the "
            "code location (MODELPEX_WEBSERVER_URL), after which automation redeploys it; a version built elsewhere "
            "re-runs its followers."
        ),
    )
    def _redeploy(context: SensorEvaluationContext, modelpex: ModelpexResource) -> SensorResult:
        now = snapshot(modelpex, deployments)
        if not context.cursor:
            return SensorResult(skip_reason="first tick: remembered the current tree", cursor=_cursor(now, 0))
        before = json.loads(context.cursor)
        if webserver_url:
            return _reload(context, before, now, deployments, version_assets, loaded, webserver_url)
        return _request_runs(context, before, now, deployments, version_assets)

    return _redeploy


def _request_runs(
    context: SensorEvaluationContext,
    before: dict[str, Any],
    now: dict[str, Any],
    deployments: Deployments,
    version_assets: Mapping[str, AssetKey],
) -> SensorResult:
    """Without a webserver to reload through: run what changed, and say what stays stale until a reload."""
    generation = int(before.get("generation", 0)) + 1
    if now["base"] != before["base"]:
        request = RunRequest(  # N.B. No selection: everything.
            run_key=f"{generation}:base:{now['base']}", tags={"modelpex/redeploy": "base"}
        )
        return SensorResult(run_requests=[request], cursor=_cursor(now, generation))
    changed = {label for label, key in now["models"].items() if before["models"].get(label) != key}
    stored = _stored(context, before, now, deployments, version_assets)
    requests = _version_requests(stored | changed, now, deployments, version_assets, generation)
    requests += _moved_requests(before, now, deployments, version_assets, requests, generation)
    for request in requests:
        context.log.info(f"redeploying {request.tags['modelpex/redeploy']} for {request.tags['modelpex/clients']}")
    stale = _stale(deployments, version_assets, now)
    if stale:
        context.log.warning(stale)
    skip = None if requests else "; ".join(filter(None, ["nothing changed", stale]))
    return SensorResult(
        run_requests=requests, cursor=_cursor(now, generation if requests else generation - 1), skip_reason=skip
    )


def _reload(
    context: SensorEvaluationContext,
    before: dict[str, Any],
    now: dict[str, Any],
    deployments: Deployments,
    version_assets: Mapping[str, AssetKey],
    loaded: Mapping[str, Any],
    url: str,
) -> SensorResult:
    """Reload the code location when the tree differs from what it was built from (once per tree, again after
    `RELOAD_RETRY_SECONDS` if it still differs); run versions that only appeared in the store."""
    generation = int(before.get("generation", 0)) + 1
    stored = _stored(context, before, now, deployments, version_assets)
    requests = _version_requests(stored, now, deployments, version_assets, generation)
    cursor = {**now, "generation": generation if requests else generation - 1, "reload": before.get("reload")}
    why = _differences(loaded, now, deployments)
    tree = hashlib.sha256(json.dumps([now[k] for k in TREE], sort_keys=True).encode()).hexdigest()
    last = before.get("reload") or {}
    if why and (last.get("tree") != tree or time.time() - float(last.get("at", 0)) > RELOAD_RETRY_SECONDS):
        location = context.code_location_origin.location_name if context.code_location_origin else "modelpex"
        threading.Thread(target=reload_code_location, args=(url, location), daemon=True).start()
        cursor["reload"] = {"tree": tree, "at": time.time()}
        context.log.info(f"reloading code location {location!r} through {url}: {why}")
    skip = None if requests else (f"reloading: {why}" if why else "nothing changed")
    return SensorResult(run_requests=requests, cursor=json.dumps(cursor, sort_keys=True), skip_reason=skip)


TREE = ("base", "models", "deployed")
RELOAD_RETRY_SECONDS = 120


def _differences(loaded: Mapping[str, Any], now: dict[str, Any], deployments: Deployments) -> str:
    """How the tree differs from the one the loaded definitions were built from, in words."""
    why = []
    if now["base"] != loaded["base"]:
        why.append("base_env changed")
    changed = sorted(label for label, key in now["models"].items() if loaded["models"].get(label) != key)
    if changed:
        why.append(f"model versions new or changed: {', '.join(changed)}")
    moved = sorted(where for where, label in now["deployed"].items() if loaded["deployed"].get(where) != label)
    if moved or deployments.changed_on_disk():
        why.append(f"{deployments.path.name} or the versions clients follow changed ({', '.join(moved) or 'file'})")
    return "; ".join(why)


def reload_code_location(url: str, location: str) -> None:
    """Ask the webserver to reload ``location``: it re-imports the code and every process sees the new definitions.

    N.B. Called on a thread: the code server that evaluates this sensor is the one being reloaded.
    """
    from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

    parsed = urlparse(url)
    try:
        client = DagsterGraphQLClient(
            parsed.hostname or "127.0.0.1", port_number=parsed.port, use_https=parsed.scheme == "https", timeout=300
        )
        client.reload_repository_location(location)
    except (DagsterGraphQLClientError, OSError) as exc:
        logging.getLogger(__name__).warning(f"could not reload code location {location!r} through {url}: {exc}")


def _stored(
    context: SensorEvaluationContext,
    before: dict[str, Any],
    now: dict[str, Any],
    deployments: Deployments,
    version_assets: Mapping[str, AssetKey],
) -> set[str]:
    """Model versions that appeared in the store since the last tick and that no run here has in hand: built
    elsewhere (in CI). N.B. A run here that built a version also published it: that is not news to rerun."""
    new = set(now["stored"]) - set(before["stored"])
    return {label for label in new if not _ran(context.instance, label, now, deployments, version_assets)}


def _ran(
    instance: DagsterInstance,
    label: str,
    now: dict[str, Any],
    deployments: Deployments,
    version_assets: Mapping[str, AssetKey],
) -> bool:
    """Whether a run here has the version in hand: its asset or a client's state that runs it materialised its
    current key, or is planned by a run still going (the run that built and published it, say)."""
    key = now["models"].get(label)
    assets = [state_key(d) for d in deployments.all() if now["deployed"][d.where] == label]
    assets += [version_assets[label]] if label in version_assets else []
    for asset in assets:
        event = instance.get_latest_materialization_event(asset)
        metadata = event.asset_materialization.metadata if event and event.asset_materialization else {}
        found = metadata.get("model_key") or metadata.get("key")
        if found is not None and found.value == key:
            return True
        planned = instance.get_latest_planned_materialization_info(asset)
        run = instance.get_run_by_id(planned.run_id) if planned else None
        if run is not None and not run.is_finished:
            return True
    return False


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
    changed: set[str],
    now: dict[str, Any],
    deployments: Deployments,
    version_assets: Mapping[str, AssetKey],
    generation: int,
) -> list[RunRequest]:
    """One run per model version in ``changed`` (its content changed, or it appeared in the tree, as a tag or in the
    store): that version's pex and the assets of the clients that run it."""
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
