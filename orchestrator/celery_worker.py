"""Celery worker: dagster-celery's tasks, with the delivery settings under which a lost worker never hangs a run.

    celery -A orchestrator.celery_worker -b "$MODELPEX_CELERY_BROKER" --result-backend "$MODELPEX_CELERY_BROKER" \
        worker -c 2 --disable-prefetch

The tasks are dagster-celery's own (`dagster_celery.app`); this module only applies `celery_delivery` to its app, so
that a step whose worker dies goes to another worker (orchestrator/executors.py says how, and how soon).
"""

from dagster_celery.app import app, execute_job, execute_plan, resume_job

from orchestrator.executors import celery_delivery
from orchestrator.settings import Settings

__all__ = ["app", "execute_job", "execute_plan", "resume_job"]

app.conf.update(celery_delivery(Settings.from_env()))
