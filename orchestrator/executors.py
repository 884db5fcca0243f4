"""Executors: where the steps of a run execute, Dagster's own engines chosen by MODELPEX_EXECUTOR.

- ``in_process`` (the default): every step in the run's own process, so one model process per version serves
  every call of the run (`orchestrator.runner`).
- ``celery``: Dagster's Celery executor (``dagster-celery``, an extra: imported only when chosen). The run submits
  each step as a task to the broker (MODELPEX_CELERY_BROKER, results on MODELPEX_CELERY_BACKEND) and whichever
  worker takes it loads the code location through the run's reconstructable pointer and executes that one step.
  Workers are Celery's own (``celery -A dagster_celery.app -b BROKER --result-backend BACKEND worker``): modelpex
  adds no engine. A worker shares nothing with the run but the instance, the store and the signing key, which is
  why the steps pass frames and states through the store (an ``s3://`` one across hosts).
"""

from __future__ import annotations

from dagster import ExecutorDefinition, in_process_executor

from orchestrator.errors import ModelpexError
from orchestrator.settings import Settings
from orchestrator.store import is_remote

__all__ = ["run_executor"]


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


def _celery(settings: Settings) -> ExecutorDefinition:
    """dagster-celery's executor on the configured broker and backend, or one line saying how to install it."""
    try:
        from dagster_celery import celery_executor
    except ImportError as exc:
        raise ModelpexError(
            f"MODELPEX_EXECUTOR=celery needs dagster-celery ({exc}): install it with `pip install -e '.[cluster]'`, "
            "or unset MODELPEX_EXECUTOR"
        ) from None
    # N.B. The same broker and backend as the workers' `-b` and `--result-backend`, or the tasks wait forever.
    return celery_executor.configured(
        {"broker": settings.celery_broker, "backend": settings.celery_backend}, name="celery"
    )
