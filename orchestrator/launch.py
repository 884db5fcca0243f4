"""Launch: a run of the code location submitted through the instance, as the UI's "Materialize all" submits one.

`modelpex deploy` used to execute the asset job in its own process (``execute_in_process``): that run had no code
location as its origin (no target on the Runs page, missing from the timeline, a warning on Re-execute), logged at
CRITICAL to keep its console quiet, and ignored the configured executor. Here the run is created from the code
location (a `RemoteJob` of a workspace loaded like `workspace.yaml`'s), submitted to the instance's run coordinator,
launched by its run launcher and executed with the code location's executor, exactly as the webserver does; the
caller waits for it to finish and reads what it did from the event log.

N.B. Dagster has no public API to create a run from a code location outside GraphQL: `dagster job launch` uses the
same internal calls (``dagster._cli.job._create_run``). They are wrapped here, in one place, for that reason.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, EventLogEntry

from orchestrator.errors import ModelpexError
from orchestrator.settings import Settings
from orchestrator.store import is_remote

__all__ = ["LOCATION", "Launched", "check_launchable", "launch_asset_job"]

LOCATION = "modelpex"  # N.B. The code location's name in workspace.yaml, deploy/docker/workspace.yaml and Helm.
ASSET_JOB = "__ASSET_JOB"  # Dagster's implicit asset job, the one "Materialize all" launches


@dataclass(frozen=True)
class Launched:
    """A finished run and its event log."""

    run: DagsterRun
    events: list[EventLogEntry]
    groups: list[str]  # the code location's asset groups, for a link to its lineage

    @property
    def success(self) -> bool:
        return self.run.status == DagsterRunStatus.SUCCESS

    def of_type(self, event_type: DagsterEventType) -> list[EventLogEntry]:
        return [e for e in self.events if e.dagster_event and e.dagster_event.event_type == event_type]


def check_launchable(settings: Settings, instance: DagsterInstance) -> None:
    """Refuse, in one line, a run whose steps would execute on other hosts while the store is a folder on this one:
    those hosts could not see the artifacts, states or frames it holds."""
    if is_remote(settings.store_url):
        return
    from dagster._core.launcher import DefaultRunLauncher

    launcher = type(instance.run_launcher)
    if settings.executor != "in_process":
        elsewhere = f"MODELPEX_EXECUTOR={settings.executor} executes steps on other hosts"
    elif not issubclass(launcher, DefaultRunLauncher):
        elsewhere = f"the instance's run launcher {launcher.__name__} starts runs elsewhere"
    else:
        return
    raise ModelpexError(
        f"{elsewhere}, but the store {settings.store_url} is a folder on this host that they cannot see: set "
        "MODELPEX_STORE to a shared s3:// store (README, Running on a cluster), or run in this process"
    )


def _queue_is_served(instance: DagsterInstance) -> bool:
    """Whether submitting a run starts it: the instance has no run queue, or a live daemon takes runs from it (as
    under `modelpex ui` or a cluster's daemon). An instance without one (the embedded SQLite one of `modelpex deploy`
    alone) gets the run launched directly, by its run launcher, as Dagster's default coordinator would."""
    from dagster._core.run_coordinator import QueuedRunCoordinator

    if not isinstance(instance.run_coordinator, QueuedRunCoordinator):
        return True
    statuses = instance.get_daemon_statuses(["QUEUED_RUN_COORDINATOR"])
    return any(status.healthy for status in statuses.values())


@contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """This process's stdout and stderr go to ``log`` for the block: what it starts meanwhile (the code server, and
    through it the run's process) writes its console there, not over the caller's terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    log.parent.mkdir(parents=True, exist_ok=True)
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log, "ab") as handle:
            os.dup2(handle.fileno(), 1)
            os.dup2(handle.fileno(), 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


@contextmanager
def _workspace(settings: Settings, instance: DagsterInstance, log: Path) -> Iterator[object]:
    """The code location as `workspace.yaml` declares it (``orchestrator.definitions``, named ``modelpex``), loaded in
    a code server of its own, as `dagster dev` and `dagster job launch` load it; its console (and its runs') to
    ``log``."""
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import ModuleTarget

    target = ModuleTarget("orchestrator.definitions", "defs", str(settings.project), LOCATION)
    with _output_to(log):
        context = WorkspaceProcessContext(instance, target)
    with context:
        yield context.create_request_context()


def _create_run(instance: DagsterInstance, workspace: object, tags: Mapping[str, str]) -> tuple[DagsterRun, list[str]]:
    """A run of the implicit asset job over every asset, with the code location as its origin; and the asset groups."""
    from dagster._core.definitions.selector import JobSubsetSelector

    error = workspace.get_code_location_error(LOCATION)  # type: ignore[attr-defined]
    if error is not None:
        while error.cause is not None:  # N.B. The innermost cause is modelpex's own line, not gRPC's wrapper.
            error = error.cause
        raise ModelpexError(f"the code location {LOCATION!r} did not load: {error.message.strip().splitlines()[0]}")
    location = workspace.get_code_location(LOCATION)  # type: ignore[attr-defined]
    (repository_name,) = location.get_repository_names()
    repository = location.get_repository(repository_name)
    selector = JobSubsetSelector(
        location_name=LOCATION, repository_name=repository_name, job_name=ASSET_JOB, op_selection=None
    )
    job = location.get_job(selector)
    plan = location.get_execution_plan(job, {}, step_keys_to_execute=None, known_state=None, instance=instance)
    groups = sorted({node.group_name for node in repository.asset_graph.asset_nodes if node.group_name})
    return instance.create_run(
        job_name=job.name,
        run_id=None,
        run_config={},
        resolved_op_selection=job.resolved_op_selection,
        step_keys_to_execute=plan.execution_plan_snapshot.step_keys_to_execute,
        op_selection=None,
        status=None,
        root_run_id=None,
        parent_run_id=None,
        tags={**job.tags, **tags},
        job_snapshot=job.job_snapshot,
        execution_plan_snapshot=plan.execution_plan_snapshot,
        parent_job_snapshot=job.parent_job_snapshot,
        remote_job_origin=job.get_remote_origin(),
        job_code_origin=job.get_python_origin(),
        asset_selection=None,
        asset_check_selection=None,
        asset_graph=repository.asset_graph,
    ), groups


def launch_asset_job(
    settings: Settings,
    instance: DagsterInstance,
    *,
    tags: Mapping[str, str] | None = None,
    log: Path,
    on_submit: Callable[[DagsterRun], None] | None = None,
    poll_seconds: float = 0.5,
) -> Launched:
    """Materialise every asset through the instance: create the run from the code location, submit it (queued when
    the instance has a run queue, as the UI's are), and wait until it ends. The code server's and the run process's
    console go to ``log`` (the run's events are in the instance, as for any run)."""
    check_launchable(settings, instance)
    with _workspace(settings, instance, log) as workspace:
        run, groups = _create_run(instance, workspace, tags or {})
        if _queue_is_served(instance):
            instance.submit_run(run.run_id, workspace)  # type: ignore[arg-type]
        else:
            # N.B. What DefaultRunCoordinator does: a queue no daemon serves would hold the run for ever.
            instance.launch_run(run.run_id, workspace)  # type: ignore[arg-type]
        if on_submit:
            on_submit(run)
        while not (current := instance.get_run_by_id(run.run_id)) or not current.is_finished:
            time.sleep(poll_seconds)
    return Launched(current, list(instance.all_logs(run.run_id)), groups)
