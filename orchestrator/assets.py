"""Assets: factories that turn the catalog and deployments.yaml into Dagster assets, steps and checks.

- ``modelpex/base``: the base pex (code version: its content key).
- ``model/<name>/<name>_v<version>``: one per model version that exists; materialising builds it or fetches it.
- per client, one graph of steps: a step per dataset (``<client>/<dataset>``), and per model a training step
  (``<client>/<client>_<model>_state``) and a prediction step (``<client>/<client>_<model>_predictions``, which
  runs the predictions' asset checks). The lineage graph labels a node with the last part of its key only, so every
  label of a model's asset names its client and model (a model version's group shows the clients that run it as
  links labelled so); and two parts keep the client in an asset page's breadcrumbs, which the UI folds from the
  left when they run long.

N.B. Why graphs: each model's training and prediction is a step of its own (its own timing and failure on the run
page), while the definitions stay small: one graph-backed definition per client whose steps all share a few op
definitions (one per model version), where an asset definition per step took 34 s to load at 100 models x 50
clients (benchmarks/definitions.py).
"""

import functools
import json
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
from dagster import (
    AssetCheckResult,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    AssetsDefinition,
    AssetSpec,
    AutomationCondition,
    ConfigMapping,
    DataVersion,
    DependencyDefinition,
    Enum,
    EnumValue,
    Field,
    GraphDefinition,
    In,
    InputMapping,
    JobDefinition,
    MaterializeResult,
    MetadataValue,
    MultiDependencyDefinition,
    NodeInvocation,
    Nothing,
    OpDefinition,
    OpExecutionContext,
    Out,
    Output,
    OutputMapping,
    Shape,
    asset,
    job,
    op,
)

from orchestrator.catalog import LATEST, Catalog, ModelVersion
from orchestrator.checks import PredictionCheck, declares_contract, no_contract_note, prediction_checks
from orchestrator.datasets import load_dataset
from orchestrator.deployments import ClientDeployment, DatasetSource, ModelDeployment
from orchestrator.errors import ModelpexError
from orchestrator.metadata import (
    code_references,
    frame_metadata,
    frame_version,
    human_duration,
    human_size,
    metric_metadata,
    quiet_beta,
)
from orchestrator.resources import Ensured, FrameStore, ModelpexResource
from orchestrator.run import RunOutcome
from orchestrator.versions import WebRemote, tag_name

__all__ = [
    "BASE_KEY",
    "STATE_KIND",
    "AssetIndex",
    "ClientSteps",
    "Deployed",
    "base_asset",
    "build_model_job",
    "client_assets",
    "dataset_key",
    "deployed_models",
    "model_version_asset",
    "model_version_key",
    "predictions_key",
    "run_tags",
    "state_key",
]

BASE_GROUP, VERSIONS_GROUP, VERSIONS_PREFIX = "modelpex", "models", "model"  # N.B. RESERVED_CLIENT_NAMES
BASE_KEY = AssetKey([BASE_GROUP, "base"])
# N.B. The kind of a client's fitted states, and of no other asset of theirs: automation selects states by it.
STATE_KIND = "python"
MAX_ERROR_CHARS = 4000
MAX_TAG_CHARS = 255
Step = Literal["train", "predict"]
# N.B. No step takes config. Said once for the whole graph, the run config schema does not list every step of every
# client: at 100 models x 50 clients that list was 10% of the code location's load time.
NO_CONFIG = ConfigMapping(config_fn=lambda _: {}, config_schema={})
# N.B. A client graph's outputs are declared with Dagster's default IO manager whatever its steps use, and a run
# that selects only frames (a dataset, a prediction without checks) would otherwise drop that resource and fail
# to build its run config: every step that writes a frame asks for it too.
DEFAULT_IO_MANAGER_KEY = "io_manager"


def model_version_key(version: ModelVersion) -> AssetKey:
    return AssetKey([VERSIONS_PREFIX, version.name, f"{version.name}_{version.slug}"])


def dataset_key(client: str, dataset: str) -> AssetKey:
    return AssetKey([client, dataset])


def state_key(deployment: ModelDeployment) -> AssetKey:
    return AssetKey([deployment.client, f"{deployment.client}_{deployment.model}_state"])


def predictions_key(deployment: ModelDeployment) -> AssetKey:
    return AssetKey([deployment.client, f"{deployment.client}_{deployment.model}_predictions"])


@dataclass(frozen=True)
class Deployed:
    """One client's model as the definitions loaded it: the version it resolved to, its code version, its checks."""

    deployment: ModelDeployment
    version: ModelVersion
    code_version: str
    checks: tuple[PredictionCheck, ...]

    @classmethod
    def of(cls, d: ModelDeployment, version: ModelVersion, code_version: str) -> "Deployed":
        return cls(d, version, code_version, tuple(prediction_checks(d, version.predictions, version.version)))

    @functools.cached_property
    def keys(self) -> tuple[AssetKey, AssetKey]:
        """The state's and the predictions' asset keys."""
        return state_key(self.deployment), predictions_key(self.deployment)


@dataclass
class AssetIndex:
    """What every asset key of the code location stands for: the steps look their work up here by their output's key,
    and a run's tags are derived from its selection."""

    steps: dict[AssetKey, tuple[Deployed, Step]] = field(default_factory=dict)
    datasets: dict[AssetKey, DatasetSource] = field(default_factory=dict)
    versions: dict[AssetKey, ModelVersion] = field(default_factory=dict)

    def add(self, deployed: Deployed) -> None:
        state, predictions = deployed.keys
        self.steps[state], self.steps[predictions] = (deployed, "train"), (deployed, "predict")


def _joined(values: set[str]) -> str:
    """Sorted and comma-separated; a list too long for a tag ends with how many more there are."""
    text = ",".join(sorted(values))
    if len(text) <= MAX_TAG_CHARS:
        return text
    kept = text[: MAX_TAG_CHARS - 16].rsplit(",", 1)[0].split(",")
    return ",".join(kept) + f",+{len(values) - len(kept)} more"


def run_tags(keys: Sequence[AssetKey] | frozenset[AssetKey], index: AssetIndex) -> dict[str, str]:
    """``client``, ``model``, ``version`` (``model@version``) and ``action`` of a run over ``keys``; values of a run
    that covers several are comma-separated."""
    found: dict[str, set[str]] = {"client": set(), "model": set(), "version": set(), "action": set()}
    for key in keys:
        if key in index.steps:
            deployed, step = index.steps[key]
            d = deployed.deployment
            found["client"].add(d.client)
            found["model"].add(d.model)
            found["version"].add(f"{d.model}@{deployed.version.version}")
            found["action"].add(step)
        elif key in index.datasets:
            found["client"].add(key.path[0])
        elif key in index.versions or key == BASE_KEY:
            version = index.versions.get(key)
            if version is not None:
                found["model"].add(version.name)
                found["version"].add(f"{version.name}@{version.version}")
            found["action"].add("build")
    return {name: _joined(values) for name, values in found.items() if values}


_tagged_runs: set[str] = set()


def tag_run(context: OpExecutionContext, index: AssetIndex) -> None:
    """Tag the run with what it covers, once per run and process, whoever launched it (a click, a schedule, the
    sensor, ``modelpex deploy``): Dagster gives a run launched from the asset graph no tags of its own."""
    run = context.run
    if run.run_id in _tagged_runs:
        return
    keys = run.asset_selection or context.job_def.asset_layer.selected_asset_keys
    tags = {k: v for k, v in run_tags(frozenset(keys), index).items() if run.tags.get(k) != v}
    if tags:
        context.instance.add_run_tags(run.run_id, tags)
    _tagged_runs.add(run.run_id)


# --- the base and the model versions -----------------------------------------------------------------------------


def base_asset(base_key: str, index: AssetIndex) -> AssetsDefinition:
    @asset(key=BASE_KEY, code_version=base_key, group_name=BASE_GROUP, kinds={"pex"})
    def _base(context: OpExecutionContext, modelpex: ModelpexResource) -> MaterializeResult:
        """The shared base pex (numpy, pandas, polars, pyarrow, scikit-learn, dagster-pipes, the runtime)."""
        tag_run(context, index)
        ensured = modelpex.ensure_base()
        metadata = {**ensured.metadata, "interpreter": ensured.record.interpreter}
        with quiet_beta():
            return MaterializeResult(metadata=metadata, data_version=DataVersion(ensured.record.sha256))

    return _base


def model_version_asset(
    version: ModelVersion, code_version: str, index: AssetIndex, web: WebRemote | None, folder: str
) -> AssetsDefinition:
    """The pex of one model version; its code reference points at the version's tag (or the working tree's folder)."""
    key = model_version_key(version)
    index.versions[key] = version
    refs = {"tag": tag_name(version.name, version.version), "store": (version.commit or "").removesuffix("+dirty")}
    ref = refs.get(version.origin, "HEAD")
    url = web.tree_url(ref, f"model_packages/{version.name}") if web and ref else None
    label = f"{version.name} {version.version} ({version.origin})"
    origin = "the store's release record" if version.origin == "store" else f"its {version.origin}"
    about = f" {version.description}" if version.description else ""

    @asset(
        key=key,
        deps=[BASE_KEY],
        code_version=code_version,
        group_name=VERSIONS_GROUP,
        kinds={"pex"},
        tags={"model": version.name, "version": version.version},
        description=f"The pex of {version.name} {version.version} (from {origin}).{about}",
        metadata={"dagster/code_references": code_references(f"{folder}/pyproject.toml", url, label)},
    )
    def _model_version(context: OpExecutionContext, modelpex: ModelpexResource) -> MaterializeResult:
        tag_run(context, index)
        ensured = modelpex.ensure(version)
        with quiet_beta():
            return MaterializeResult(metadata=ensured.metadata, data_version=DataVersion(ensured.record.sha256))

    return _model_version


def _version_choice(choices: Sequence[str]) -> Shape:
    """``model_version``: an enum of ``choices``, which the launchpad completes as a list as one types.

    N.B. Dagster memoises a config shape, process-wide, by a hash of its description and its fields' type names: a
    shape whose enum is named alike for other choices (a catalog reloaded in the same process) would bring back the
    old choices. The shape's description lists the choices, so the enum keeps a readable name; the launchpad shows
    that list above the field.
    """
    model_version = Field(
        Enum("ModelVersion", [EnumValue(choice) for choice in choices]),
        default_value=choices[0],
        description="The model version to build or fetch: model@version, or model@latest for its newest version. "
        "Type over it (or press Ctrl+Space) for the list.",
    )
    return Shape({"model_version": model_version}, description=f"build_model's choices: {', '.join(choices)}")


def _data_version_tag(sha256: str) -> dict[str, str]:
    """A materialisation's data version as a tag, for an event an op logs itself.

    N.B. `Output` and `MaterializeResult` take a `DataVersion`; an `AssetMaterialization` does not, and Dagster's own
    webserver records a reported materialisation's data version under this tag (its external-assets endpoint).
    """
    return {"dagster/data_version": sha256}


def build_model_job(catalog: Catalog) -> JobDefinition | None:
    """``build_model``: build or fetch any one model version, chosen from the versions that exist (``None``
    without models), and record it as a materialisation of that version's asset. The launchpad opens on the newest
    version of the first model, with nothing else to fill in (the resources take no config at launch)."""
    choices = [f"{name}@{LATEST}" for name in sorted(catalog.specs)]
    choices += [f"{v.name}@{v.version}" for v in catalog.all()]
    if not choices:
        return None

    @op(
        name="build_or_fetch_model",
        config_schema=_version_choice(choices),
        description="Build a model version's pex, or fetch and verify it when that exact key is in the store.",
    )
    def _build(context: OpExecutionContext, modelpex: ModelpexResource) -> None:
        name, _, wanted = str(context.op_config["model_version"]).partition("@")
        current = modelpex.catalog()
        version = current.resolve(name, wanted)
        ensured = modelpex.ensure(version, current)
        context.log.info(f"{ensured.action} {ensured.record.label} (key {ensured.record.key})")
        context.log_event(
            AssetMaterialization(
                asset_key=model_version_key(version),
                description=f"{ensured.action} by build_model",
                metadata=ensured.metadata,
                tags=_data_version_tag(ensured.record.sha256),
            )
        )

    @job(name="build_model", description="Build or fetch one model version's pex (config: model_version).")
    def build_model() -> None:
        _build()

    return build_model


# --- a client's graph: datasets, training, prediction -------------------------------------------------------------


def _record_failure(context: OpExecutionContext, d: ModelDeployment, key: AssetKey, exc: ModelpexError) -> None:
    """An observation with the model's error on its asset; the run-failure sensor lifts it to the run's tags."""
    metadata = {
        "client": d.client,
        "model": d.model,
        "failed_run": context.run.run_id,
        "error": str(exc)[:MAX_ERROR_CHARS],
    }
    context.log_event(AssetObservation(asset_key=key, metadata=metadata))


def _trained_state(context: OpExecutionContext, d: ModelDeployment, key: AssetKey) -> tuple[str, str]:
    """(version, sha256) of the latest training materialisation, from Dagster's event log."""
    event = context.instance.get_latest_materialization_event(key)
    where = d.where
    if event is None or event.asset_materialization is None:
        raise ModelpexError(f"{where}: no fitted state yet: materialise {key.to_user_string()} first")
    meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    if "state_sha256" not in meta or "model_version" not in meta:
        raise ModelpexError(
            f"{where}: its last training left no state record: materialise {key.to_user_string()} again"
        )
    return str(meta["model_version"]), str(meta["state_sha256"])


def _release_metadata(ensured: Ensured, d: ModelDeployment) -> dict[str, Any]:
    """Which pex ran, and with which parameters."""
    return {
        "model": ensured.record.name,
        "model_version": ensured.record.version,
        "model_key": ensured.record.key,
        "pex": ensured.action,
        "params": MetadataValue.json(dict(d.params)),
    }


def _timing_metadata(outcome: RunOutcome, started: float) -> dict[str, Any]:
    """What a call cost, after the data's profile: sizes and durations in human units and one number to plot,
    ``model_seconds``. ``step_overhead`` is the step's own time: everything but the model's code and, on the call
    that started it, the model process's start (its imports)."""
    model_seconds = sum(outcome.model_seconds.values())
    overhead = max(0.0, time.perf_counter() - started - model_seconds - outcome.start_seconds)
    return {
        "rows_in": sum(outcome.rows_in.values()),
        "data_moved": human_size(outcome.bytes_moved),
        "transport_time": human_duration(outcome.transport_seconds),
        "process_start": human_duration(outcome.start_seconds) if outcome.process_started else "re-used",
        "step_overhead": human_duration(overhead),
        "model_seconds": MetadataValue.float(round(model_seconds, 4)),  # N.B. A number: Dagster plots it.
    }


def _unclaimed(reported: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, Any]:
    """What the model reported through Pipes, less any label modelpex sets itself: it cannot replace what modelpex
    vouches for (the state's digest above all)."""
    return {label: value for label, value in reported.items() if label not in ours}


class ModelStep:
    """The work of one training or prediction step: one call of a model version in its model process."""

    def __init__(self, context: OpExecutionContext, index: AssetIndex, modelpex: ModelpexResource, frames: FrameStore):
        self.context, self.modelpex, self.frames = context, modelpex, frames
        self.key = context.asset_key_for_output("result")
        self.deployed, _ = index.steps[self.key]
        self.d = self.deployed.deployment
        tag_run(context, index)

    def _inputs(self) -> dict[str, pa.Table]:
        return {name: self.frames.load_table(dataset_key(self.d.client, ds)) for name, ds in self.d.inputs.items()}

    def _ensure(self) -> tuple[Ensured, float]:
        started = time.perf_counter()
        catalog = self.modelpex.run_catalog()
        running = catalog.resolve(self.d.model, self.d.version)  # N.B. At run time, not at load: follows `latest`.
        return self.modelpex.ensure(running, catalog), started

    def recorded(self, work: Any) -> Any:
        """Run ``work``; a model's failure is recorded on the asset before it fails the step."""
        try:
            return work()
        except ModelpexError as exc:
            _record_failure(self.context, self.d, self.key, exc)
            raise

    def train(self) -> Output[None]:
        ensured, started = self._ensure()
        reported: dict[str, Any] = {}
        outcome = self.modelpex.run(
            self.context,
            ensured.record,
            asset_key=self.key,
            action="train",
            inputs=self._inputs(),
            params=self.d.params,
            keep_state=True,
            reported=reported,
        )
        if outcome.state is None:
            raise ModelpexError(f"{self.d.where}: training reported no fitted state")
        record = self.modelpex.runner.states.save(ensured.record, self.d.client, self.context.run.run_id, outcome.state)
        metadata = {
            **metric_metadata(outcome.metrics),
            **_release_metadata(ensured, self.d),
            "state_sha256": record.sha256,  # N.B. Computed and signed here: the digest predictions trust.
            "state_format": record.format,
            "state_size": human_size(record.size),
            **_timing_metadata(outcome, started),
        }
        metadata |= _unclaimed(reported, metadata)
        with quiet_beta():
            return Output(None, "result", metadata=metadata, data_version=DataVersion(record.sha256))

    def predict(self) -> list[Output[pa.Table] | AssetCheckResult]:
        ensured, started = self._ensure()
        trained_version, sha256 = _trained_state(self.context, self.d, state_key(self.d))
        if trained_version != ensured.record.version:
            raise ModelpexError(
                f"{self.d.where} now runs {self.d.model}@{ensured.record.version} but its state was trained by "
                f"{trained_version}: materialise {state_key(self.d).to_user_string()} first"
            )
        state = self.modelpex.runner.states.load(ensured.record, sha256, self.d.client)
        reported: dict[str, Any] = {}
        outcome = self.modelpex.run(
            self.context,
            ensured.record,
            asset_key=self.key,
            action="predict",
            inputs=self._inputs(),
            params=self.d.params,
            state_in=state,
            reported=reported,
        )
        table = outcome.outputs["predictions"]
        metadata = {
            **frame_metadata(table),
            **_release_metadata(ensured, self.d),
            "state_sha256": sha256,
            **_timing_metadata(outcome, started),
        }
        metadata |= _unclaimed(reported, metadata)
        selected = {check.name for check in self.context.selected_asset_check_keys if check.asset_key == self.key}
        checks = [c.result(self.key, table, outcome.rows_in) for c in self.deployed.checks if c.name in selected]
        with quiet_beta():
            return [Output(table, "result", metadata=metadata, data_version=frame_version(table)), *checks]


class ClientSteps:
    """The op definitions every client's graph invokes: one for datasets, and per model version one for training and
    one for prediction (per set of checks). Each step finds its work in the index by its output's asset key."""

    def __init__(self, index: AssetIndex) -> None:
        self.index = index
        self.dataset = self._dataset_op()
        self._ops: dict[tuple[object, ...], OpDefinition] = {}
        self._version_keys: dict[ModelVersion, AssetKey] = {}

    def version_key(self, version: ModelVersion) -> AssetKey:
        if version not in self._version_keys:
            self._version_keys[version] = model_version_key(version)
        return self._version_keys[version]

    def _dataset_op(self) -> OpDefinition:
        index = self.index

        @op(
            name="modelpex_dataset",
            out={"result": Out(io_manager_key="frames")},
            required_resource_keys={DEFAULT_IO_MANAGER_KEY},
            description="Load a client's input dataset: generated example data, or the client's own file.",
        )
        def _dataset(context: OpExecutionContext) -> Output[pa.Table]:
            tag_run(context, index)
            source = index.datasets[context.asset_key_for_output("result")]
            table = load_dataset(source.generate, source.path, dict(source.options))
            with quiet_beta():
                return Output(table, metadata=frame_metadata(table), data_version=frame_version(table))

        return _dataset

    def train(self, version: ModelVersion) -> OpDefinition:
        key = ("train", version.name, version.version)
        if key not in self._ops:
            self._ops[key] = self._train_op(version)
        return self._ops[key]

    def predict(self, version: ModelVersion, checks: Sequence[PredictionCheck]) -> OpDefinition:
        names = tuple(c.name for c in checks)
        key = ("predict", version.name, version.version, names)
        if key not in self._ops:
            same = sum(1 for k in self._ops if k[:3] == key[:3])
            self._ops[key] = self._predict_op(version, names, f"_{same + 1}" if same else "")
        return self._ops[key]

    def _train_op(self, version: ModelVersion) -> OpDefinition:
        index = self.index

        @op(
            name=f"{version.name}_{version.slug}_train",
            ins={"after": In(Nothing), "pex": In(Nothing)},
            out={"result": Out(Nothing)},
            tags={"model": version.name, "version": version.version},
            description=f"Train {version.name} {version.version} on a client's data, in its model process.",
        )
        def _train(context: OpExecutionContext, modelpex: ModelpexResource, frame_store: FrameStore) -> Output[None]:
            step = ModelStep(context, index, modelpex, frame_store)
            return step.recorded(step.train)

        return _train

    def _predict_op(self, version: ModelVersion, checks: tuple[str, ...], suffix: str) -> OpDefinition:
        index = self.index

        @op(
            name=f"{version.name}_{version.slug}_predict{suffix}",
            ins={"after": In(Nothing)},
            out={"result": Out(io_manager_key="frames"), **{name: Out(Nothing, is_required=False) for name in checks}},
            required_resource_keys={"modelpex", "frame_store", DEFAULT_IO_MANAGER_KEY},
            tags={"model": version.name, "version": version.version},
            description=f"Predict with {version.name} {version.version} from a client's state, then check the frame.",
        )
        def _predict(context: OpExecutionContext) -> Iterator[Output[pa.Table] | AssetCheckResult]:
            step = ModelStep(context, index, context.resources.modelpex, context.resources.frame_store)
            yield from step.recorded(step.predict)

        return _predict


def _pin(d: ModelDeployment) -> str:
    return "follows latest" if d.follows_latest else "pinned"


def _describe(deployed: Deployed, what: str, *details: str) -> str:
    """Who runs what, in plain words first: the catalog shows a description's start as it is (no markdown) and the
    graph its first line. ``details`` are Markdown paragraphs the asset's page renders below."""
    d, version = deployed.deployment, deployed.version
    lines = [f"{d.client} runs {d.model} {version.version} ({_pin(d)}): {what}.", *details]
    if d.params:
        lines.append(f"Parameters: `{json.dumps(dict(d.params), sort_keys=True)}`")
    return "\n\n".join(lines)


def _contract(deployed: Deployed) -> str:
    """What the predictions' checks come from, said on the predictions' page: the release's contract, or that it
    declares none."""
    if not declares_contract(deployed.version.predictions):
        return no_contract_note(deployed.deployment.model, deployed.version.version)
    d, version = deployed.deployment, deployed.version.version
    if not deployed.checks:
        return f"The contract {d.model} {version} declares asks for no check of these predictions."
    names = ", ".join(f"`{c.name}`" for c in deployed.checks)
    return f"Checked after every prediction against the contract {d.model} {version} declares: {names}."


def _kind(text: str) -> str:
    """``text`` as a kind: Dagster allows letters, digits, ``_``, ``.`` and ``-``, 63 at most."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:63]


def _tags(deployed: Deployed, kind: str) -> dict[str, str]:
    """Tags, and kinds: the graph draws a node's kinds under it, its tags nowhere, so the version a client runs and
    whether it is pinned are kinds too (``kind:pinned`` selects every pinned deployment)."""
    d, latest = deployed.deployment, deployed.deployment.follows_latest
    return {
        "client": d.client,
        "model": d.model,
        "version": deployed.version.version,
        "follows": "latest" if latest else "pinned",
        f"dagster/kind/{kind}": "",
        f"dagster/kind/{_kind('v' + deployed.version.version)}": "",
        f"dagster/kind/{'follows-latest' if latest else 'pinned'}": "",
    }


@dataclass
class _Graph:
    """What ``client_assets`` assembles: the graph's wiring and, per output, the asset it stands for."""

    dependencies: dict[NodeInvocation, dict[str, Any]] = field(default_factory=dict)
    inputs: list[InputMapping] = field(default_factory=list)
    outputs: list[OutputMapping] = field(default_factory=list)
    keys_in: dict[str, AssetKey] = field(default_factory=dict)
    keys_out: dict[str, AssetKey] = field(default_factory=dict)
    deps: dict[str, set[AssetKey]] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    code_versions: dict[str, str] = field(default_factory=dict)
    checks: list[Any] = field(default_factory=list)
    ops: dict[str, OpDefinition] = field(default_factory=dict)
    datasets: dict[str, tuple[AssetKey, DependencyDefinition]] = field(default_factory=dict)

    def output(self, name: str, node: str, key: AssetKey, deps: set[AssetKey], description: str, tags: dict[str, str]):
        self.outputs.append(
            OutputMapping(graph_output_name=name, mapped_node_name=node, mapped_node_output_name="result")
        )
        self.keys_out[name], self.deps[name], self.descriptions[name], self.tags[name] = key, deps, description, tags


def _add_dataset(graph: _Graph, source: DatasetSource, steps: ClientSteps) -> None:
    key = dataset_key(source.client, source.name)
    steps.index.datasets[key] = source
    graph.datasets[source.name] = (key, DependencyDefinition(source.name, "result"))
    origin = f"generated ({source.generate})" if source.generate else f"read from {source.path}"
    graph.ops[steps.dataset.name] = steps.dataset
    graph.dependencies[NodeInvocation(steps.dataset.name, alias=source.name)] = {}
    description = f"{source.client}'s {source.name}, {origin}. Replace it to point at real data."
    tags = {"client": source.client, "dagster/kind/parquet": ""}
    graph.output(f"data__{source.name}", source.name, key, set(), description, tags)


def _add_model(graph: _Graph, deployed: Deployed, steps: ClientSteps) -> None:
    """A model's training and prediction steps, their assets and the prediction's checks.

    N.B. Keys and dependencies are made once per client and version and shared: at 100 models x 50 clients, making
    them again per model was a tenth of the definitions' build time.
    """
    d, version = deployed.deployment, deployed.version
    steps.index.add(deployed)
    train, predict = steps.train(version), steps.predict(version, deployed.checks)
    graph.ops[train.name], graph.ops[predict.name] = train, predict
    datasets = [graph.datasets[name] for name in dict.fromkeys(d.inputs.values())]
    data_keys = {key for key, _ in datasets}
    trains, predicts = f"{d.model}_train", f"{d.model}_predict"
    after = [dependency for _, dependency in datasets]
    graph.dependencies[NodeInvocation(train.name, alias=trains)] = (
        {"after": MultiDependencyDefinition(after)} if after else {}
    )
    graph.dependencies[NodeInvocation(predict.name, alias=predicts)] = {
        "after": MultiDependencyDefinition([DependencyDefinition(trains, "result"), *after])
    }
    # N.B. The version's pex is an input of the training step, not only a dependency of the state's asset: in a run
    # with both, training waits for the pex (which its data version records), and a run without it reads it as is.
    pex = f"{d.model}__pex"
    graph.inputs.append(InputMapping(graph_input_name=pex, mapped_node_name=trains, mapped_node_input_name="pex"))
    graph.keys_in[pex] = steps.version_key(version)
    state, predictions = deployed.keys
    graph.output(
        f"{d.model}__state",
        trains,
        state,
        {steps.version_key(version), *data_keys},
        _describe(deployed, "its fitted state, trained at run time", "The state's sha256 is kept and checked."),
        _tags(deployed, STATE_KIND),
    )
    graph.output(
        f"{d.model}__predictions",
        predicts,
        predictions,
        {state, *data_keys},
        _describe(deployed, "its predictions", _contract(deployed)),
        _tags(deployed, "parquet"),
    )
    graph.code_versions[f"{d.model}__state"] = graph.code_versions[f"{d.model}__predictions"] = deployed.code_version
    for check in deployed.checks:
        spec = check.spec(predictions)
        graph.outputs.append(
            OutputMapping(
                graph_output_name=spec.get_python_identifier(),
                mapped_node_name=predicts,
                mapped_node_output_name=check.name,
            )
        )
        graph.checks.append(spec)


def client_assets(
    client: ClientDeployment,
    deployed: Sequence[Deployed],
    steps: ClientSteps,
    automation: Mapping[AssetKey, AutomationCondition] | None = None,
) -> AssetsDefinition:
    """Every asset of a client in one subsettable graph: its datasets, and per model its state and predictions.

    A run selects any subset (say, the datasets and the predictions each hour) and executes exactly those steps.
    ``automation`` gives assets their conditions here: mapping the specs afterwards rebuilds the whole graph.
    """
    graph = _Graph()
    for source in client.datasets.values():
        _add_dataset(graph, source, steps)
    for item in deployed:
        _add_model(graph, item, steps)
    definition = GraphDefinition(
        name=client.name,
        description=f"{client.name}'s datasets and models: a step per dataset, per training and per prediction.",
        node_defs=list(graph.ops.values()),
        dependencies=graph.dependencies,
        input_mappings=graph.inputs,
        output_mappings=graph.outputs,
        config=NO_CONFIG,
    )
    specs = [
        AssetSpec(
            key=graph.keys_out[name],
            deps=graph.deps[name],
            description=graph.descriptions[name],
            tags=graph.tags[name],
            code_version=graph.code_versions.get(name),
            group_name=client.name,
            automation_condition=(automation or {}).get(graph.keys_out[name]),
        )
        for name in graph.keys_out
    ]
    return AssetsDefinition(
        node_def=definition,
        keys_by_input_name=graph.keys_in,
        keys_by_output_name=graph.keys_out,
        specs=specs,
        check_specs_by_output_name={spec.get_python_identifier(): spec for spec in graph.checks},
        can_subset=True,
    )


def deployed_models(client: ClientDeployment, catalog: Catalog, code_version: Mapping[str, str]) -> list[Deployed]:
    """Each of the client's models with the version it resolves to now; ``code_version``: version label -> key."""
    deployed = []
    for d in client.models.values():
        version = catalog.resolve(d.model, d.version)
        deployed.append(Deployed.of(d, version, code_version[str(version.ref)]))
    return deployed
