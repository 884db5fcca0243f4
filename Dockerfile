# modelpex runtime layer: Python (runtime) + the orchestrator + the base pex, built and pre-unpacked into the model
# processes' PEX_ROOT, so a model's first run only links a venv (about 2 s here) instead of unpacking the base (8-20 s).
# Models are not baked in: they change often, are built or fetched at run time, and only their own bytes move.
#
#   docker build -t modelpex .
#   docker run --rm -p 3000:3000 modelpex
#
# Who runs what. Models are untrusted code: each model process runs as an unprivileged uid of its own (from
# modelpex-model's range in /etc/subuid, in its group), reads PEX_ROOT and the verified artifacts but cannot write
# them, and writes only its private folder. Starting a process as another user takes CAP_SETUID and CAP_SETGID, and a
# process holding those can make itself root whatever its own uid, so running the orchestrator as uid 1000 with those
# capabilities added would buy nothing over root while adding a capability launcher to maintain. The orchestrator
# therefore runs as root inside the container (put it in a user namespace, rootless Docker or Kubernetes
# `hostUsers: false`, to make that root unprivileged on the host), and it needs only these capabilities:
#   --cap-drop ALL --cap-add CHOWN --cap-add DAC_OVERRIDE --cap-add FOWNER --cap-add KILL --cap-add SETUID --cap-add SETGID
# bubblewrap (no network, read-only file system, private /tmp, a PID namespace per model process) additionally needs
# user namespaces, which Docker's default seccomp profile refuses: without them modelpex logs which guarantees do not
# hold and runs models with the user switch alone (README, "How a model runs").
#
# --shm-size: frames never touch /dev/shm (they are memfds, counted in the container's memory), so Docker's default
# 64 MB runs any frame. What models themselves write to /dev/shm lands there when they get no private one (no user
# namespaces: Docker's default seccomp profile): size it for that. On Kubernetes, an emptyDir with `medium: Memory`.
# To follow a model repository instead of the copy below, mount it: -v "$PWD:/app" (the base key must match, or the
# base is rebuilt at start, which needs the package index).
# BASE: any Debian bookworm image with Python 3.11 as `python3` and its venv module (tests/test_containers.py builds
# on a debootstrap of Debian with Debian's own Python, where no registry is reachable).
ARG BASE=python:3.11.7-slim-bookworm
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODELPEX_PROJECT=/app \
    MODELPEX_CACHE=/var/cache/modelpex \
    MODELPEX_PEX_ROOT=/var/cache/modelpex/pex_root \
    MODELPEX_MODEL_USER=modelpex-model \
    DAGSTER_HOME=/app/.dagster_home \
    PATH=/opt/venv/bin:$PATH

# git: model versions are per-model git tags (`churn/v1.0.0`). bubblewrap: the namespace sandbox, where allowed.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends git bubblewrap \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin modelpex-model \
 && echo "modelpex-model:100000:4096" >> /etc/subuid

WORKDIR /app
COPY pyproject.toml ./
COPY base_env/ base_env/
# The `cluster` extra makes this also the user-code image of deploy/'s configurations: the code server
# (`dagster code-server start -m orchestrator.definitions -a defs`) and each run's worker (`dagster api execute_run`)
# need the instance's storage (dagster-postgres) and the run launchers it names (dagster-docker, dagster-k8s); it also
# serves as a Celery worker (dagster-celery, MODELPEX_EXECUTOR=celery). The s3 extra (boto3): a worker may run on
# MODELPEX_STORE=s3://bucket/prefix, credentials from the AWS_* variables.
# N.B. Dependencies first, from pyproject.toml alone (an empty package stands in for the orchestrator): a change to
# the orchestrator's code then reinstalls the orchestrator alone, in seconds, instead of every dependency.
RUN python3 -m venv /opt/venv \
 && mkdir orchestrator && touch orchestrator/__init__.py \
 && pip install --no-cache-dir ./base_env './[cluster,s3]' \
 && pip uninstall --yes modelpex && rm -r orchestrator \
 && mkdir -p /app/pex_builds \
 && install -d -m 0700 /app/.dagster_home
COPY orchestrator/ orchestrator/
RUN pip install --no-cache-dir --no-deps --no-build-isolation .

# The same commands the tests run (tests/test_dockerfile.py): build the base by its content key, then unpack it.
# N.B. pex's download cache is a build cache, not a layer: a rebuild after an orchestrator change fetches no wheel.
RUN --mount=type=cache,target=/root/.cache/pex modelpex build base && modelpex warm

COPY README.md workspace.yaml deployments.yaml ./
COPY model_packages/ model_packages/
COPY deploy/ deploy/
EXPOSE 3000
CMD ["modelpex", "ui", "--host", "0.0.0.0", "--port", "3000"]
