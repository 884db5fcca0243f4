"""Executors: where the steps of a run execute, Dagster's own engines chosen by MODELPEX_EXECUTOR.

- ``in_process`` (the default): every step in the run's own process, so one model process per version serves
  every call of the run (`orchestrator.runner`).
- ``celery``: Dagster's Celery executor (``dagster-celery``, an extra: imported only when chosen). The run submits
  each step as a task to the broker (MODELPEX_CELERY_BROKER, results on MODELPEX_CELERY_BACKEND) and whichever
  worker takes it loads the code location through the run's reconstructable pointer and executes that one step.
  Workers are Celery's own, on dagster-celery's tasks (``celery -A orchestrator.celery_worker -b BROKER
  --result-backend BACKEND worker``): modelpex adds no engine, only the delivery settings below. A worker shares
  nothing with the run but the instance, the store and the signing key, which is why the steps pass frames and
  states through the store (an ``s3://`` one across hosts): a local store is refused.
"""

from __future__ import annotations

from dagster import ExecutorDefinition, in_process_executor

from orchestrator.errors import ModelpexError
from orchestrator.settings import Settings
from orchestrator.store import is_remote

__all__ = ["REDELIVERY_GRACE", "celery_delivery", "redeliver_after", "run_executor"]

# N.B. Seconds beyond the model call timeout that a step may take (fetching and unpacking a base on a cold host, under
# load) before the broker hands it, unacknowledged, to another worker.
REDELIVERY_GRACE = 900.0


def redeliver_after(settings: Settings) -> float:
    """Seconds after which an unacknowledged step goes to another worker: MODELPEX_CELERY_REDELIVER, else the model
    call timeout plus `REDELIVERY_GRACE`."""
    return settings.celery_redeliver or settings.timeout + REDELIVERY_GRACE


def run_executor(settings: Settings) -> ExecutorDefinition:
    """The executor of every job of the code location, as the settings choose it."""
    if settings.executor == "celery":
        if not is_remote(settings.store_url):
            raise ModelpexError(
                f"MODELPEX_EXECUTOR=celery executes steps on other hosts, but the store {settings.store_url} is a "
                "folder on this host that they cannot see: set MODELPEX_STORE to a shared s3:// store (README, Running "
                "on a cluster), or unset MODELPEX_EXECUTOR"
            )
        return _celery(settings)
    return in_process_executor


def celery_delivery(settings: Settings) -> dict[str, object]:
    """Celery settings under which a lost worker never hangs a run, the same for the workers and the run's process.

    A step is acknowledged only once it has finished (``task_acks_late``), never while it runs: a worker killed in
    the middle of it (kill -9, out of memory, a host that disappears) leaves it unacknowledged. When only the pool
    process running the step dies, the worker rejects the step at once and the broker re-delivers it
    (``task_reject_on_worker_lost``). When the whole worker dies, Redis gives an unacknowledged step back to the
    queue after ``visibility_timeout`` (`redeliver_after`), and every live worker looks for such steps every 10 s.
    N.B. Redis cannot tell a dead worker's step from a slow one: a step still running after that time is handed out
    a second time (both executions write the same outcome; the run takes the first), hence a default longer than
    any step. Each worker
    reserves no step beyond the one it runs (``worker_prefetch_multiplier``), so a lost worker loses one step.
    """
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {
            "visibility_timeout": redeliver_after(settings),
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
        },
    }


def _celery(settings: Settings) -> ExecutorDefinition:
    """dagster-celery's executor on the configured broker and backend, or one line saying how to install it."""
    try:
        from dagster_celery.executor import CELERY_CONFIG, CeleryExecutor
    except ImportError as exc:
        raise ModelpexError(
            f"MODELPEX_EXECUTOR=celery needs dagster-celery ({exc}): install it with `pip install -e '.[cluster]'`, "
            "or unset MODELPEX_EXECUTOR"
        ) from None
    from dagster import executor
    from dagster._core.definitions.executor_definition import multiple_process_executor_requirements
    from dagster._core.execution.retries import RetryMode

    class WatchedCeleryExecutor(CeleryExecutor):
        """dagster-celery's executor, which says so in the run's log when no worker listens on its broker (its
        steps would otherwise wait in the queue without a word)."""

        def execute(self, plan_context, execution_plan):  # noqa: ANN001, ANN202 - Dagster's signature
            _say_when_no_worker(self, plan_context.log)
            yield from super().execute(plan_context, execution_plan)

    @executor(name="celery", config_schema=CELERY_CONFIG, requirements=multiple_process_executor_requirements())
    def watched_celery_executor(init_context):  # noqa: ANN001, ANN202 - Dagster's signature
        """Dagster's Celery executor (dagster-celery), as `dagster_celery.celery_executor` builds it."""
        config = init_context.executor_config
        return WatchedCeleryExecutor(
            broker=config.get("broker"),
            backend=config.get("backend"),
            config_source=config.get("config_source"),
            include=config.get("include"),
            retries=RetryMode.from_config(config["retries"]),
        )

    # N.B. The same broker and backend as the workers' `-b` and `--result-backend`, or the tasks wait forever.
    config = {
        "broker": settings.celery_broker,
        "backend": settings.celery_backend,
        "config_source": celery_delivery(settings),
    }
    return watched_celery_executor.configured(config, name="celery")


def _say_when_no_worker(celery: object, log: object, seconds: float = 5.0) -> None:
    """Ask the broker's workers to answer (Celery's ping): when none does, warn in the run's log that its steps
    wait until one starts, naming the broker and the command that starts one."""
    from dagster_celery.make_app import make_app

    app = make_app(celery.app_args())  # type: ignore[attr-defined]
    try:
        answers = app.control.ping(timeout=seconds)
    except Exception as exc:  # noqa: BLE001 - the broker's own error says more than ours would
        answers, why = [], f" ({type(exc).__name__}: {exc})"
    else:
        why = ""
    if not answers:
        log.warning(  # type: ignore[attr-defined]
            f"no Celery worker answers on {celery.broker}{why}: this run's steps wait in its queue until a worker "  # type: ignore[attr-defined]
            "starts there (`celery -A orchestrator.celery_worker -b BROKER --result-backend BACKEND worker`, README: "
            "Running on a cluster)"
        )
