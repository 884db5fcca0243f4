"""deploy/: the Docker and Kubernetes configurations, checked with dagster-docker's, dagster-k8s's and Dagster's own
schemas and turned into what Docker and Kubernetes would be sent, without a Docker daemon or a cluster."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import shlex
import shutil
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from dagster import DagsterInstance
from dagster._config import process_config
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.utils import make_new_run_id
from dagster._core.workspace.config_schema import process_workspace_config
from dagster_docker import DockerRunLauncher
from dagster_k8s import K8sRunLauncher
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import UserDefinedDagsterK8sConfig, construct_dagster_k8s_job, get_job_name_from_run_id
from dagster_postgres import PostgresRunStorage
from docker.constants import DEFAULT_DOCKER_API_VERSION
from docker.errors import DockerException
from docker.models.containers import _create_container_args
from kubernetes.utils import parse_quantity

from orchestrator import settings
from orchestrator.settings import parse_size

from .conftest import REPO

DOCKER_YAML = REPO / "deploy" / "docker" / "dagster.yaml"
DOCKER_WORKSPACE = REPO / "deploy" / "docker" / "workspace.yaml"
HELM_VALUES = REPO / "deploy" / "helm" / "values.yaml"
STORE_VARIABLES = {
    "MODELPEX_STORE",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
}
GIB = 1 << 30


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def validated(schema: Any, config: Mapping[str, Any]) -> Mapping[str, Any]:
    """``config`` checked against a Dagster config schema, with defaults filled in, as the instance does at load.

    N.B. Dagster's config validation is internal (``dagster._config``): the one call is here."""
    result = process_config(schema, config)
    if not result.success:
        raise DagsterInvalidConfigError("invalid config", result.errors, config)
    return result.value


def documented_variables() -> set[str]:
    """The variables orchestrator/settings.py documents: the only MODELPEX_* names a configuration may set."""
    return set(re.findall(r"^\| ([A-Z_]+) ", settings.__doc__ or "", re.MULTILINE))


def modelpex_names(names: list[str]) -> set[str]:
    return {name for name in names if name.startswith("MODELPEX_")}


def dockerfile_instructions(keyword: str) -> list[str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return [line[len(keyword) + 1 :] for line in text.splitlines() if line.startswith(f"{keyword} ")]


def dockerfile_env() -> dict[str, str]:
    pairs = [word.split("=", 1) for line in dockerfile_instructions("ENV") for word in shlex.split(line)]
    return {name: value for name, value in pairs}


def dockerfile_capabilities() -> list[str]:
    """The capabilities the Dockerfile's header says the container needs (``--cap-add X`` ...)."""
    return re.findall(r"--cap-add (\w+)", (REPO / "Dockerfile").read_text())


def dockerfile_model_user() -> str:
    (line,) = [line for line in dockerfile_instructions("RUN") if "useradd" in line]
    return re.search(r"useradd [^&]* (\S+) *&&", line).group(1)


# ---------------------------------------------------------------------------------------------------------------
# Docker: deploy/docker/dagster.yaml


def docker_launcher(config: Mapping[str, Any]) -> DockerRunLauncher:
    """The run launcher the instance would build from ``config`` (validated by dagster-docker's own schema)."""
    block = config["run_launcher"]
    cls = getattr(importlib.import_module(block["module"]), block["class"])
    assert cls is DockerRunLauncher
    return DockerRunLauncher.from_config_value(None, validated(DockerRunLauncher.config_type(), block["config"]))


def docker_create_body(container_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What docker-py would send to the Docker Engine to create a run's container, as DockerRunLauncher calls it.

    N.B. ``containers.create`` needs a daemon; its argument handling (``_create_container_args``, internal to
    docker-py) does not, and is where a misspelled or malformed ``container_kwargs`` entry fails."""
    return _create_container_args(
        {
            "image": "modelpex:test",
            "command": ["dagster", "api", "execute_run", "{}"],
            "detach": True,
            "environment": {},
            "network": "modelpex",
            "labels": {"dagster/run_id": "test"},
            "version": DEFAULT_DOCKER_API_VERSION,
            **container_kwargs,
        }
    )


def env_references(node: Any) -> Iterator[str]:
    """Every ``{env: NAME}`` a Dagster instance configuration reads."""
    if isinstance(node, Mapping):
        if set(node) == {"env"}:
            yield node["env"]
        for value in node.values():
            yield from env_references(value)
    elif isinstance(node, list):
        for value in node:
            yield from env_references(value)


def test_docker_run_launcher_is_valid_for_dagster_docker() -> None:
    launcher = docker_launcher(load_yaml(DOCKER_YAML))
    assert launcher.networks == ["modelpex"]
    assert "shm_size" in launcher.container_kwargs


def test_docker_run_containers_get_shm_the_capabilities_and_the_key_volume() -> None:
    launcher = docker_launcher(load_yaml(DOCKER_YAML))
    host = docker_create_body(launcher.container_kwargs)["host_config"]
    env = dict(variable.split("=", 1) for variable in launcher.env_vars if "=" in variable)
    assert host["ShmSize"] >= 2 * GIB, "a 10M-row frame does not fit Docker's default 64 MB /dev/shm"
    assert parse_size(env["MODELPEX_SHM_POOL_BYTES"], "MODELPEX_SHM_POOL_BYTES", 0) <= host["ShmSize"] // 4
    assert host["CapDrop"] == ["ALL"]
    assert sorted(host["CapAdd"]) == sorted(dockerfile_capabilities())
    assert "no-new-privileges:true" in host["SecurityOpt"]
    key_folder = str(Path(env["MODELPEX_SIGNING_KEY_FILE"]).parent)
    assert any(bind.split(":")[1] == key_folder and not bind.startswith("/") for bind in host["Binds"]), (
        "the signing key must live on a named volume every run container mounts"
    )
    assert env["MODELPEX_ISOLATION"] == "user"


def test_docker_run_containers_get_every_variable_the_instance_and_the_store_read() -> None:
    config = load_yaml(DOCKER_YAML)
    names = [variable.split("=", 1)[0] for variable in docker_launcher(config).env_vars]
    read = set(env_references({key: value for key, value in config.items() if key != "run_launcher"}))
    assert read and read <= set(names), f"a run container could not resolve {sorted(read - set(names))}"
    assert STORE_VARIABLES <= set(names)
    assert modelpex_names(names) <= documented_variables()


def test_docker_workspace_is_a_valid_code_server_target() -> None:
    result = process_workspace_config(load_yaml(DOCKER_WORKSPACE))
    assert result.success, result.errors
    (target,) = load_yaml(DOCKER_WORKSPACE)["load_from"]
    assert target["grpc_server"]["location_name"] == "modelpex"


def test_docker_dagster_yaml_loads_into_an_instance_on_postgres(
    postgres: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in postgres.items():
        monkeypatch.setenv(name, value)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(DOCKER_YAML, home / "dagster.yaml")
    with DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.run_launcher, DockerRunLauncher)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert instance.run_coordinator.get_run_queue_config().max_concurrent_runs == 4
        ref = instance.get_ref()
    # N.B. A run container rebuilds the instance from this reference, sent with its command.
    with DagsterInstance.from_ref(ref) as rebuilt:
        assert isinstance(rebuilt.run_storage, PostgresRunStorage)
        assert rebuilt.run_launcher.container_kwargs == instance.run_launcher.container_kwargs


def test_docker_schema_rejects_a_misspelled_key_and_a_wrong_type() -> None:
    config = load_yaml(DOCKER_YAML)["run_launcher"]["config"]
    with pytest.raises(DagsterInvalidConfigError, match="netwrok"):
        validated(DockerRunLauncher.config_type(), {**config, "netwrok": "modelpex"})
    with pytest.raises(DagsterInvalidConfigError, match="env_vars"):
        validated(DockerRunLauncher.config_type(), {**config, "env_vars": "MODELPEX_STORE"})


def test_docker_rejects_a_misspelled_or_malformed_container_kwarg() -> None:
    kwargs = load_yaml(DOCKER_YAML)["run_launcher"]["config"]["container_kwargs"]
    with pytest.raises(TypeError, match="shm_sise"):
        docker_create_body({**kwargs, "shm_sise": "4g"})
    with pytest.raises(DockerException, match="units"):
        docker_create_body({**kwargs, "shm_size": "4 gigabytes"})


# ---------------------------------------------------------------------------------------------------------------
# Kubernetes: deploy/helm/values.yaml for Dagster's chart
#
# N.B. The chart's own values schema (helm/dagster/schema, `dagster-helm`) is not published on PyPI, and helm is not
# installed here. The two functions below do what the chart's templates do with the parts that become the
# instance's dagster.yaml (templates/helpers/instance/_run-launcher.tpl and _run-coordinator.tpl), refusing any key
# the chart's schema does not declare (it forbids extra keys); dagster-k8s and Dagster validate the result.

CHART_K8S_RUN_LAUNCHER_KEYS = {  # schema/charts/dagster/subschema/run_launcher.py, K8sRunLauncherConfig
    "image",
    "imagePullPolicy",
    "jobNamespace",
    "loadInclusterConfig",
    "kubeconfigFile",
    "envConfigMaps",
    "envSecrets",
    "envVars",
    "volumeMounts",
    "volumes",
    "labels",
    "failPodOnRunFailure",
    "resources",
    "schedulerName",
    "securityContext",
    "runK8sConfig",
}
CHART_RUN_K8S_CONFIG_KEYS = {  # the same file, RunK8sConfig
    "containerConfig": "container_config",
    "podSpecConfig": "pod_spec_config",
    "podTemplateSpecMetadata": "pod_template_spec_metadata",
    "jobSpecConfig": "job_spec_config",
    "jobMetadata": "job_metadata",
}
CHART_QUEUED_RUN_COORDINATOR_KEYS = {  # schema/charts/dagster/subschema/daemon.py, QueuedRunCoordinatorConfig
    "maxConcurrentRuns": "max_concurrent_runs",
    "tagConcurrencyLimits": "tag_concurrency_limits",
    "dequeueIntervalSeconds": "dequeue_interval_seconds",
    "dequeueNumWorkers": "dequeue_num_workers",
    "dequeueUseThreads": "dequeue_use_threads",
    "blockOpConcurrencyLimitedRuns": "block_op_concurrency_limited_runs",
}
RELEASE, NAMESPACE = "dagster", "dagster"


def refuse_unknown(values: Mapping[str, Any], known: set[str] | Mapping[str, str], where: str) -> None:
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"{where}: the chart's schema has no {sorted(unknown)}")


def chart_run_launcher(values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``run_launcher`` section the chart writes into dagster.yaml for ``runLauncher.type: K8sRunLauncher``."""
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    refuse_unknown(k8s, CHART_K8S_RUN_LAUNCHER_KEYS, "runLauncher.config.k8sRunLauncher")
    config: dict[str, Any] = {
        "load_incluster_config": k8s.get("loadInclusterConfig", True),
        "job_namespace": k8s.get("jobNamespace") or NAMESPACE,
        "image_pull_policy": k8s.get("imagePullPolicy", "Always"),
        "service_account_name": RELEASE,
        "dagster_home": values.get("global", {}).get("dagsterHome", "/opt/dagster/dagster_home"),
        "instance_config_map": f"{RELEASE}-instance",
        "postgres_password_secret": values.get("global", {}).get(
            "postgresqlSecretName", f"{RELEASE}-postgresql-secret"
        ),
    }
    if "kubeconfigFile" in k8s and k8s["kubeconfigFile"]:
        config["kubeconfig_file"] = k8s["kubeconfigFile"]
    if "image" in k8s:
        config["job_image"] = f"{k8s['image']['repository']}:{k8s['image']['tag']}"
    for key, name in (("envConfigMaps", "env_config_maps"), ("envSecrets", "env_secrets")):
        if k8s.get(key):
            config[name] = [source["name"] for source in k8s[key] if "name" in source]
    for key, name in (
        ("envVars", "env_vars"),
        ("volumeMounts", "volume_mounts"),
        ("volumes", "volumes"),
        ("labels", "labels"),
        ("resources", "resources"),
        ("schedulerName", "scheduler_name"),
        ("securityContext", "security_context"),
    ):
        if k8s.get(key):
            config[name] = k8s[key]
    if k8s.get("failPodOnRunFailure"):
        config["fail_pod_on_run_failure"] = True
    if k8s.get("runK8sConfig"):
        refuse_unknown(k8s["runK8sConfig"], CHART_RUN_K8S_CONFIG_KEYS, "runLauncher...runK8sConfig")
        config["run_k8s_config"] = {
            CHART_RUN_K8S_CONFIG_KEYS[key]: value for key, value in k8s["runK8sConfig"].items() if value
        }
    return {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": config}


def chart_run_coordinator(values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``run_coordinator`` section the chart writes for ``dagsterDaemon.runCoordinator``."""
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["enabled"] and coordinator["type"] == "QueuedRunCoordinator"
    queued = coordinator["config"]["queuedRunCoordinator"]
    refuse_unknown(queued, CHART_QUEUED_RUN_COORDINATOR_KEYS, "queuedRunCoordinator")
    config = {CHART_QUEUED_RUN_COORDINATOR_KEYS[key]: value for key, value in queued.items()}
    config.setdefault("max_concurrent_runs", -1)
    return {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator", "config": config}


def chart_postgres_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """The storage config the chart writes (templates/helpers/instance/_postgresql.tpl)."""
    pg = values["postgresql"]
    db = {
        "username": pg["postgresqlUsername"],
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "hostname": pg["postgresqlHost"],
        "db_name": pg["postgresqlDatabase"],
        "port": pg["service"]["port"],
        "params": pg.get("postgresqlParams", {}),
    }
    if pg.get("postgresqlScheme"):
        db["scheme"] = pg["postgresqlScheme"]
    return {"postgres_db": db}


def modelpex_deployment(values: Mapping[str, Any]) -> dict[str, Any]:
    (deployment,) = [d for d in values["dagster-user-deployments"]["deployments"] if d["name"] == "modelpex"]
    return deployment


def k8s_launcher(values: Mapping[str, Any], tmp_path: Path) -> K8sRunLauncher:
    """The K8sRunLauncher the instance would build, pointed at a cluster that does not exist (nothing is sent)."""
    processed = dict(validated(K8sRunLauncher.config_type(), chart_run_launcher(values)["config"]))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "none", "user": {"token": "none"}}],
                "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
                "current-context": "none",
            }
        )
    )
    processed.update(load_incluster_config=False, kubeconfig_file=str(kubeconfig))
    return K8sRunLauncher.from_config_value(None, processed)


def run_pod_job(values: Mapping[str, Any], tmp_path: Path) -> dict[str, Any]:
    """The Job the run launcher would create for a run, as sent to the API server (camelCase JSON).

    Built by the same calls as ``K8sRunLauncher.launch_run``, short of sending it."""
    launcher = k8s_launcher(values, tmp_path)
    run = DagsterRun(job_name="client_acme", run_id=make_new_run_id())
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=True)
    image = modelpex_deployment(values)["image"]
    job = construct_dagster_k8s_job(
        job_config=context.get_k8s_job_config(job_image=f"{image['repository']}:{image['tag']}", run_launcher=launcher),
        args=["dagster", "api", "execute_run", "{}"],
        job_name=get_job_name_from_run_id(run.run_id),
        component="run_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": run.job_name, "dagster/run-id": run.run_id},
    )
    return kubernetes.client.ApiClient().sanitize_for_serialization(job)


@pytest.fixture
def pod(tmp_path: Path) -> dict[str, Any]:
    return run_pod_job(load_yaml(HELM_VALUES), tmp_path)["spec"]["template"]["spec"]


def mounted_volume(pod: Mapping[str, Any], container: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The pod volume mounted at ``path`` in ``container``."""
    (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume | {"readOnly": mount.get("readOnly", False)}


def container_env(container: Mapping[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_helm_run_launcher_is_valid_for_dagster_k8s() -> None:
    rendered = chart_run_launcher(load_yaml(HELM_VALUES))
    config = validated(K8sRunLauncher.config_type(), rendered["config"])
    UserDefinedDagsterK8sConfig.from_dict(config["run_k8s_config"])  # N.B. Checks every key against the k8s models.
    assert getattr(importlib.import_module(rendered["module"]), rendered["class"]) is K8sRunLauncher


def test_helm_run_coordinator_queues_runs_with_a_limit() -> None:
    rendered = chart_run_coordinator(load_yaml(HELM_VALUES))
    config = validated(QueuedRunCoordinator.config_type(), rendered["config"])
    assert config["max_concurrent_runs"] > 0


def test_helm_storage_is_valid_for_dagster_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "from-the-secret")  # N.B. As in every pod: the chart sets it.
    config = validated(PostgresRunStorage.config_type(), chart_postgres_config(load_yaml(HELM_VALUES)))
    assert config["postgres_db"]["scheme"] == "postgresql+psycopg2"


def test_run_pod_has_a_memory_dev_shm_within_its_memory_limit(pod: dict[str, Any]) -> None:
    (container,) = pod["containers"]
    shm = mounted_volume(pod, container, "/dev/shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    size = parse_quantity(shm["emptyDir"]["sizeLimit"])
    assert size >= 2 * GIB, "a 10M-row frame does not fit Kubernetes' default 64 MiB /dev/shm"
    assert parse_quantity(container["resources"]["limits"]["memory"]) > size, "frames in /dev/shm count as memory"
    pool = container_env(container)["MODELPEX_SHM_POOL_BYTES"]
    assert parse_size(pool, "MODELPEX_SHM_POOL_BYTES", 0) <= size / 4


def test_run_pod_keeps_pex_root_on_a_volume_seeded_from_the_image(pod: dict[str, Any]) -> None:
    (container,) = pod["containers"]
    env = container_env(container)
    volume = mounted_volume(pod, container, env["MODELPEX_PEX_ROOT"])
    assert "emptyDir" in volume and volume["emptyDir"]["sizeLimit"]
    assert env["MODELPEX_PEX_ROOT"] == dockerfile_env()["MODELPEX_PEX_ROOT"], "the image warms this very folder"
    assert env["MODELPEX_CACHE"] == dockerfile_env()["MODELPEX_CACHE"]
    (seed,) = pod["initContainers"]
    assert seed["image"] == container["image"], "the seed must come from the image the run executes"
    seeded = [m["mountPath"] for m in seed["volumeMounts"] if m["name"] == volume["name"]]
    assert f"cp -a {env['MODELPEX_PEX_ROOT']}/. {seeded[0]}/" in " ".join(seed["command"])


def test_run_pod_runs_models_as_the_model_user_with_few_capabilities(pod: dict[str, Any]) -> None:
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["runAsUser"] == 0, "switching to the model's uids takes root's CAP_SETUID"
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert sorted(context["capabilities"]["add"]) == sorted(dockerfile_capabilities())
    env = container_env(container)
    assert env["MODELPEX_MODEL_USER"] == dockerfile_model_user()
    assert env["MODELPEX_ISOLATION"] == "user"
    assert pod["automountServiceAccountToken"] is False, "a model process could read the pod's API token"


def test_run_pod_gets_the_store_and_the_signing_key_from_secrets(pod: dict[str, Any]) -> None:
    (container,) = pod["containers"]
    env = container_env(container)
    assert {"secretRef": {"name": "modelpex-store"}} in container["envFrom"]
    assert not STORE_VARIABLES & set(env), "the store and its credentials come from the Secret alone"
    key = mounted_volume(pod, container, str(Path(env["MODELPEX_SIGNING_KEY_FILE"]).parent))
    assert key["readOnly"] and key["secret"]["secretName"] == "modelpex-signing-key"
    assert key["secret"]["defaultMode"] & 0o077 == 0, "orchestrator/states.py refuses a key others can read"
    assert env["DAGSTER_PG_PASSWORD"] == {
        "secretKeyRef": {"name": "dagster-postgresql-secret", "key": "postgresql-password"}
    }
    assert modelpex_names(list(env)) <= documented_variables()


def test_code_location_config_stays_out_of_run_pods() -> None:
    """The reason for ``includeConfigInLaunchedRuns: false``, shown with dagster-k8s's own merge: the context the
    chart would hand to runs (charts/dagster-user-deployments/templates/helpers/_helpers.tpl) wins over the run
    launcher's configuration, and it mounts the service account token."""
    values = load_yaml(HELM_VALUES)
    deployment = modelpex_deployment(values)
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": False}
    launcher_config = validated(K8sRunLauncher.config_type(), chart_run_launcher(values)["config"])
    launcher_context = K8sContainerContext(
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(launcher_config["run_k8s_config"])
    )
    chart_context = {
        "k8s": {
            "image_pull_policy": deployment["image"]["pullPolicy"],
            "env_secrets": [secret["name"] for secret in deployment["envSecrets"]],
            "namespace": NAMESPACE,
            "service_account_name": f"{RELEASE}-dagster-user-deployments-user-deployments",
            "run_k8s_config": {"pod_spec_config": {"automount_service_account_token": True}},
        }
    }
    merged = launcher_context.merge(K8sContainerContext.create_from_config(chart_context))
    assert launcher_context.run_k8s_config.pod_spec_config["automount_service_account_token"] is False
    assert merged.run_k8s_config.pod_spec_config["automount_service_account_token"] is True


def test_code_server_serves_modelpex_definitions() -> None:
    deployment = modelpex_deployment(load_yaml(HELM_VALUES))
    args = deployment["codeServerArgs"]
    module, attribute = args[args.index("-m") + 1], args[args.index("-a") + 1]
    assert module == "orchestrator.definitions" and attribute == "defs"
    assert {"name": "modelpex-store"} in deployment["envSecrets"]


def test_helm_rejects_a_misspelled_key_and_a_wrong_type(tmp_path: Path) -> None:
    values = load_yaml(HELM_VALUES)
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    k8s["envSecret"] = k8s.pop("envSecrets")
    with pytest.raises(ValueError, match="envSecret"):
        chart_run_launcher(values)

    values = load_yaml(HELM_VALUES)
    shm = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["podSpecConfig"]["volumes"][0]
    shm["emptyDir"]["sizeLimt"] = shm["emptyDir"].pop("sizeLimit")
    with pytest.raises(Exception, match="sizeLimt"):
        run_pod_job(values, tmp_path)

    values = load_yaml(HELM_VALUES)
    values["runLauncher"]["config"]["k8sRunLauncher"]["loadInclusterConfig"] = "yes"
    with pytest.raises(DagsterInvalidConfigError, match="load_incluster_config"):
        validated(K8sRunLauncher.config_type(), chart_run_launcher(values)["config"])

    values = load_yaml(HELM_VALUES)
    values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]["maxConcurrentRuns"] = "eight"
    with pytest.raises(DagsterInvalidConfigError, match="max_concurrent_runs"):
        validated(QueuedRunCoordinator.config_type(), chart_run_coordinator(values)["config"])


# ---------------------------------------------------------------------------------------------------------------
# The image both configurations run


def test_image_installs_what_the_configurations_load() -> None:
    """The Dockerfile installs the `cluster` extra; it holds every library the configurations name, each pinned to
    the one Dagster release this project runs (a library of another release resolves silently)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    installs = [word for line in dockerfile_instructions("RUN") if "pip install" in line for word in shlex.split(line)]
    extras = [set(m.group(1).split(",")) for word in installs if (m := re.fullmatch(r"\./?\[([\w,]+)\]", word))]
    assert any("cluster" in found for found in extras), "the image must install `cluster`"
    pins = dict(requirement.split("==") for requirement in project["optional-dependencies"]["cluster"])
    dagster_pin = dict(r.split("==") for r in project["dependencies"] if "==" in r)["dagster"]
    modules = {
        load_yaml(DOCKER_YAML)["run_launcher"]["module"],
        "dagster_postgres",
        chart_run_launcher(load_yaml(HELM_VALUES))["module"],
    }
    for module in modules:
        (distribution,) = importlib.metadata.packages_distributions()[module]
        assert distribution in pins, f"{module} ({distribution}) is not in the image's `cluster` extra"
        assert importlib.metadata.version(distribution) == pins[distribution]
        assert f"dagster=={dagster_pin}" in importlib.metadata.requires(distribution)
