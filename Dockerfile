# modelpex runtime layer: Python (runtime) + the orchestrator + the base pex, built and pre-unpacked into a persistent
# PEX_ROOT, so a model's first run only links a venv (about 2 s here) instead of unpacking the base (8-20 s).
# Models are not baked in: they change often, are built or fetched at run time, and only their own bytes move.
#
#   docker build -t modelpex .
#   docker run --rm -p 3000:3000 --shm-size=2g modelpex
#
# --shm-size: frames cross to the model process through /dev/shm (Arrow IPC in shared memory). Docker's default is
# 64 MB, which does not hold a 10M-row frame; size it to your largest input plus output. On Kubernetes, mount an
# emptyDir with `medium: Memory` and a `sizeLimit` at /dev/shm.
# To follow a model repository instead of the copy below, mount it: -v "$PWD:/app" (the base key must match, or the
# base is rebuilt at start, which needs the package index).
FROM python:3.11.7-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODELPEX_PROJECT=/app \
    MODELPEX_PEX_ROOT=/var/cache/modelpex/pex_root \
    PEX_ROOT=/var/cache/modelpex/pex_root \
    DAGSTER_HOME=/app/.dagster_home \
    PATH=/opt/venv/bin:$PATH

# git: model versions are per-model git tags (`churn/v1.0.0`).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends git \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 modelpex

WORKDIR /app
COPY pyproject.toml README.md workspace.yaml deployments.yaml ./
COPY base_env/ base_env/
COPY orchestrator/ orchestrator/
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir ./base_env . \
 && mkdir -p /var/cache/modelpex /app/pex_builds /app/.dagster_home \
 && chown -R modelpex /var/cache/modelpex /app

USER 1000
# The same commands the tests run (tests/test_dockerfile.py): build the base by its content key, then unpack it.
RUN modelpex build base && modelpex warm

COPY --chown=1000 model_packages/ model_packages/
EXPOSE 3000
CMD ["modelpex", "ui", "--host", "0.0.0.0", "--port", "3000"]
