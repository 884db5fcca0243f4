"""The ``modelpex`` command line: lock, build, list, run and collect garbage, on the local store by default.

Errors are one line on stderr and a non-zero exit: a `ModelpexError` already says what to do next, so its
traceback would only hide that line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packaging.version import Version
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.build import Builder, BuildResult, lock_base, lock_model
from orchestrator.catalog import release_record
from orchestrator.errors import BuildError, ModelpexError, ModelpexWarning, PlatformError, SpecError
from orchestrator.files import staged
from orchestrator.platforms import CompletePlatform, recorded_platform
from orchestrator.settings import Settings, parse_seconds
from orchestrator.specs import ModelRef, ModelSpec, discover_models, load_model_spec
from orchestrator.store import ArtifactRecord, IndexScan, Leftover, PexStore, is_remote, referenced
from orchestrator.versions import ModelSource, resolve_source, tag_name

if TYPE_CHECKING:
    from dagster_shared.error import SerializableErrorInfo

    from orchestrator.catalog import Catalog
    from orchestrator.run import FittedState, RunOutcome
    from orchestrator.runner import Runner
    from orchestrator.states import StateRecord

__all__ = ["main"]

# N.B. Piped output (CI logs, tests) gets a wide console so tables are not squeezed into 80 columns.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def warn(message: str) -> None:
    """One ``warning:`` line on stderr: something was skipped or kept so that the rest could go on."""
    err.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


_PYTHON_SHOWWARNING = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """modelpex's own warnings as one line each; every other warning as Python shows it."""
    if issubclass(category, ModelpexWarning):
        warn(str(message))
    else:
        _PYTHON_SHOWWARNING(message, category, *args, **kwargs)


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


@contextmanager
def _builder(settings: Settings) -> Iterator[Builder]:
    with err.status("starting") as status:
        yield settings.builder(step=lambda message: status.update(message))


def _report(result: BuildResult) -> None:
    record = result.record
    verb = "cached" if result.cached else "built "
    out.print(f"{verb} {record.label:<24} key {record.key}  {_mb(record.size):>10}  {result.seconds:6.2f} s")


def all_refs(settings: Settings) -> list[ModelRef]:
    """Every model version whose source is here: each working tree's version and every released tag (versions only
    the store knows were published elsewhere, with their pexes)."""
    return [version.ref for version in settings.catalog().all() if version.origin != "store"]


@contextmanager
def model_source(settings: Settings, ref: ModelRef) -> Iterator[ModelSource]:
    """One model version's source; a tag is exported to a temporary folder for as long as it is used."""
    with tempfile.TemporaryDirectory(prefix="modelpex-tags-") as exports:
        yield resolve_source(settings.project, settings.models_dir, ref, Path(exports))


def build_ref(builder: Builder, settings: Settings, ref: ModelRef, *, force: bool = False) -> BuildResult:
    """Build (or find) one model version, then publish its release record: from then on every host that reads the
    store knows the version, git or no git. A version whose source is not here is found in the store by its
    release record's content key."""
    try:
        with model_source(settings, ref) as source:
            result = builder.model(source, force=force)
            from_tree = source.spec.folder == settings.models_dir / ref.name
            record = release_record(source.spec, "working tree" if from_tree else "tag", source.commit)
            builder.store.publish_release(record, replace=force)
            return result
    except SpecError:
        stored = _published_pex(builder, ref)
        if stored is None:
            raise
        return stored


def _published_pex(builder: Builder, ref: ModelRef) -> BuildResult | None:
    """A version only the store's release record knows (published elsewhere): its pex for this base, or an error
    saying where to build it; ``None`` when the store has no release of it either."""
    release = builder.store.release(ref.name, ref.version) if ref.version else None
    if release is None:
        return None
    key = builder.model_key(release.digest)
    record = builder.store.record("model", ref.name, key, ref.version)
    if record is None:
        raise BuildError(
            f"{ref}: its source is not here and the store {builder.store.url} has no pex of it for this base (key "
            f"{key}): build it where its tag is, `modelpex build {ref}` with this store"
        )
    return BuildResult(record, cached=True, seconds=0.0)


def cmd_build(args: argparse.Namespace, settings: Settings) -> None:
    targets: list[str] = args.targets
    if not targets and not args.all:
        raise UsageError("nothing to build: name `base`, one or more models (`churn` or `churn@1.2.0`), or --all")
    if args.complete_platform:
        CompletePlatform.load(args.complete_platform, "--complete-platform")  # N.B. Named as the user typed it.
        settings = dataclasses.replace(settings, complete_platform=args.complete_platform)
    with _builder(settings) as builder:
        if args.all or "base" in targets:
            base = builder.base(force=args.force)
            _report(base)
            unpacked = builder.unpacked(base.record) if is_remote(builder.store.url) else None
            if unpacked is not None and not unpacked.cached:
                _report(unpacked)  # N.B. Backfilled for a base published before there was an unpacked form.
        refs = all_refs(settings) if args.all else [ModelRef.parse(t) for t in targets if t != "base"]
        for ref in refs:
            _report(build_ref(builder, settings, ref, force=args.force))


def cmd_lock(args: argparse.Namespace, settings: Settings) -> None:
    if not args.targets and not args.all:
        raise UsageError("nothing to lock: name `base`, one or more models, or --all")
    base = settings.base_env()
    names = [p.name for p in discover_models(settings.models_dir)] if args.all else args.targets
    if args.all or "base" in names:
        with err.status("locking base_env (resolves against the package index)"):
            out.print(f"locked base -> {lock_base(base)}")
    for name in (n for n in names if n != "base"):
        spec = load_model_spec(settings.models_dir / ModelRef.parse(name).name)
        with err.status(f"locking {spec.name} against the base's pins"):
            path = lock_model(spec, base)
        out.print(f"locked {spec.name} -> {path}" if path else f"{spec.name} needs nothing beyond the base: no lock")


def cmd_list(args: argparse.Namespace, settings: Settings) -> None:
    store = settings.store()
    scan = store.scan()
    records = sorted(scan.records, key=lambda r: (r.kind != "base", r.name, r.version, r.built_at))
    table = Table(title=f"artifacts in {store.url}")
    columns = ("kind", "name", "version", "key", "size", "base key", "git commit", "built at", "sha256", "built for")
    for column in columns:
        table.add_column(column, no_wrap=True)
    for r in records:
        table.add_row(
            r.kind,
            r.name,
            r.version,
            r.key[:12],
            _mb(r.size),
            (r.base_key or "")[:12],
            (r.git_commit or "")[:12],
            r.built_at,
            r.sha256[:12],
            r.interpreter,
        )
    out.print(table)
    releases = store.releases()
    published = Table(title=f"releases in {store.url} (versions every host knows)")
    for column in ("model", "version", "content digest", "from", "git commit", "published at", "description"):
        published.add_column(column, no_wrap=column != "description")
    for r, _ in sorted(releases.records, key=lambda found: (found[0].name, Version(found[0].version))):
        published.add_row(
            r.name, r.version, r.digest[:12], r.source, (r.git_commit or "")[:12], r.published_at, r.description
        )
    out.print(published)
    for problem in [*scan.problems.values(), *releases.problems.values()]:
        warn(str(problem))


def cmd_gc(args: argparse.Namespace, settings: Settings) -> None:
    """Remove what nothing references: artifacts of old bases or of superseded content of a version, states
    nothing can use, and what runs that died left (model folders, build folders) once they are old enough."""
    from orchestrator.deployments import pinned_versions
    from orchestrator.leases import sweep
    from orchestrator.removal import sweep_each
    from orchestrator.sandbox import RUN_PREFIX, RUNS, Sandbox
    from orchestrator.states import StateKeeper
    from orchestrator.store import BUILD_PREFIX

    store = settings.store()
    if not args.dry_run:
        store.check_writable("remove garbage (`modelpex gc --dry-run` only lists it)")
    builder = settings.builder()
    scan = store.scan()
    for problem in scan.problems.values():
        warn(f"{problem}; gc keeps its artifact meanwhile")
    keep = kept_keys(builder, settings.catalog(), scan, pinned_versions(settings.deployments_file))
    garbage = [r for r in scan.records if r.key not in keep]
    verb = "would remove" if args.dry_run else "removed"
    leftovers: list[Path | str] = []
    failed = 0

    def report(line: str) -> None:
        nonlocal failed
        failed += 1
        warn(line)

    def artifacts() -> None:
        for record in garbage:
            out.print(f"{verb} {record.label} key {record.key} ({_mb(record.size)})")
            if not args.dry_run:
                store.delete(record)

    def unindexed() -> None:
        for leftover in unindexed_garbage(store, keep, scan):
            out.print(f"{verb} unindexed file {leftover.where}")
            if not args.dry_run:
                store.remove(leftover)

    def fitted_states() -> None:
        states = StateKeeper(store, settings.signing_key_path)
        for record in unused_states(states.records(), keep, settings.gc_grace):
            out.print(f"{verb} fitted state {record.label} {record.sha256[:12]} ({_mb(record.size)})")
            if not args.dry_run:
                store.delete_state(record.model, record.state_id)

    def folders(parent: Path, prefix: str) -> Callable[[], None]:
        return lambda: leftovers.extend(sweep(parent, prefix, settings.gc_grace, dry_run=args.dry_run, report=report))

    def model_processes() -> None:
        sandbox = Sandbox.create(settings.cache_dir, settings.isolation, settings.model_user, "none")
        for uid in [] if args.dry_run else sandbox.end_orphans():
            out.print(f"ended the processes a dead run left under model uid {uid}")

    def stray_states() -> None:
        strays = [stray for stray in store.stray_states() if stray.modified < time.time() - settings.gc_grace]
        for stray in [] if args.dry_run else strays:
            store.remove(stray)
        leftovers.extend(stray.where for stray in strays)

    # N.B. Each sweep on its own: one that fails is one line, and the others still run.
    sweep_each(  # N.B. `report` counts the failures, of a sweep as of one of its folders.
        [
            ("end what dead runs' models left running", model_processes),
            ("remove unreferenced artifacts", artifacts),
            ("remove unindexed files", unindexed),
            ("remove unused fitted states", fitted_states),
            ("remove dead runs' model folders", folders(settings.cache_dir / RUNS, RUN_PREFIX)),
            ("remove dead builds' folders", folders(store.work_root, BUILD_PREFIX)),
            ("remove stray states", stray_states),
        ],
        report,
    )
    for path in leftovers:
        out.print(f"{verb} {path}, left by a run that ended")
    out.print(f"{len(garbage)} artifact(s) {'to remove' if args.dry_run else 'removed'}, {len(keep)} kept")
    if failed:
        raise ModelpexError(f"gc could not remove {failed} thing(s) (each named above); the rest was collected")


def kept_keys(builder: Builder, catalog: Catalog, scan: IndexScan, pinned: set[tuple[str, str]]) -> set[str]:
    """Keys gc keeps: every version the catalog knows, the versions clients pin even when this clone cannot
    resolve them (no tag), everything of a model whose folder cannot be read, and the bases all these run on.

    N.B. What gc cannot judge it keeps: a missing tag or a broken folder is fixed in minutes, a deleted artifact
    that a client pins may not be rebuildable at all. While some record is unreadable, every base is kept too,
    since nothing tells which base that record's model runs on. Current artifacts are kept for every complete
    platform a base in the store was built for, not only this machine's target: a laptop's gc must not remove what
    it built for the workers, nor a worker's what CI built for another fleet.
    """
    builders, judged = [builder], set()
    for record in scan.records:
        try:
            platform = recorded_platform(record) if record.kind == "base" else None
        except PlatformError:
            judged.add(record.key)  # N.B. A base whose platform cannot be read cannot be judged: kept.
            continue
        if platform is not None and platform != builder.platform:
            builders.append(builder.for_platform(platform))
    live = set(judged)
    for each in builders:
        live |= {each.base_key} | {each.model_key(v.digest) for v in catalog.all()}
    unresolved = pinned - {(v.name, v.version) for v in catalog.all()}

    def keep(record: ArtifactRecord) -> bool:
        if record.key in live or (record.kind == "base" and scan.problems):
            return True
        return record.kind == "model" and ((record.name, record.version) in unresolved or record.name in catalog.broken)

    kept = referenced(scan.records, keep)
    for name, version in sorted(unresolved):
        if any(r.name == name and r.version == version for r in scan.records):
            warn(
                f"kept {name}@{version}: deployments.yaml pins it but this clone has no tag "
                f"{tag_name(name, version)}; fetch the tags (`git fetch --tags`) so it can be built and collected"
            )
    for name in sorted(catalog.broken.keys() & {r.name for r in scan.records}):
        warn(f"kept every artifact of {name}: its folder is not a valid model (see above), so none can be judged")
    return kept


def unindexed_garbage(store: PexStore, keep: set[str], scan: IndexScan) -> list[Leftover]:
    """Artifact files without a record, except those whose record is unreadable and bases that gc keeps.

    N.B. A base whose record was lost is still what kept models run on: deleting it would break them all.
    """
    unreadable = {location.partition("/")[2] for location in scan.problems}
    garbage = []
    for leftover in store.unindexed():
        if leftover.key in unreadable:
            warn(f"kept {leftover.where}: its index record is unreadable (see above)")
        elif leftover.kind == "base" and (leftover.key in keep or scan.problems):
            warn(
                f"kept {leftover.where}: it has no index record but kept models run on it (`modelpex build base` "
                "restores the record of the current base)"
            )
        else:
            garbage.append(leftover)
    return garbage


def unused_states(records: list[StateRecord], keep: set[str], grace: float) -> list[StateRecord]:
    """States no run will load again: of a model pex gc removes, or not the newest of their client and version."""
    newest: dict[tuple[str, str, str], StateRecord] = {}
    for record in sorted(records, key=lambda r: r.created_at):
        newest[(record.client, record.model, record.version)] = record
    cutoff = datetime.now(UTC) - timedelta(seconds=grace)
    return [
        r
        for r in records
        if (r.model_key not in keep or newest[(r.client, r.model, r.version)] is not r)
        and datetime.fromisoformat(r.created_at) < cutoff
    ]


def _input_paths(specs: list[str]) -> dict[str, Path]:
    """``--input NAME=PATH`` options by name; a name given twice is refused (the last one would win unseen)."""
    paths: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.isidentifier() or not path:
            raise ModelpexError(f"--input {spec!r} must look like NAME=PATH, e.g. --input customers=data.parquet")
        if name in paths:
            raise ModelpexError(f"--input {name} is given twice ({paths[name]} and {path}): give each input once")
        paths[name] = Path(path)
    return paths


def _check_inputs(spec: ModelSpec, given: dict[str, Path]) -> None:
    """The inputs the model declares, no more and no fewer: a typo is one line here, not the model's KeyError."""
    if not spec.inputs:
        return  # N.B. Not declared: the model takes what it is given.
    label, declared = f"{spec.name}@{spec.version}", ", ".join(spec.inputs)
    for name in given:
        if name not in spec.inputs:
            raise ModelpexError(f"--input {name}: {label} reads only {declared}: rename or drop this input")
    for name in spec.inputs:
        if name not in given:
            raise ModelpexError(f"{label} reads input {name!r}, which was not given: add --input {name}=PATH")


def _check_targets(args: argparse.Namespace, inputs: dict[str, Path]) -> None:
    """``--output`` and ``--save-state`` before anything runs: a file (not a folder) in a folder that exists and
    takes a new file, and neither an input nor the other output, so a slip never overwrites data or wastes a run."""
    sources = {f"--input {name}": path for name, path in inputs.items()}
    if args.state:
        sources["--state"] = Path(args.state)
    targets = {
        option: Path(path) for option, path in (("--output", args.output), ("--save-state", args.save_state)) if path
    }
    seen = dict(sources)
    for option, path in targets.items():
        _check_writable(option, path)
        for other, other_path in seen.items():
            if _same_file(path, other_path):
                raise ModelpexError(f"{option} {path} is also {other}: write to another file")
        seen[option] = path


def _check_writable(option: str, path: Path) -> None:
    if path.is_dir():
        raise ModelpexError(f"{option} {path} is a folder: name a file in it, e.g. {path / 'predictions.parquet'}")
    folder = path.absolute().parent
    if not folder.is_dir():
        raise ModelpexError(f"{option} {path}: the folder {folder} does not exist: create it, or choose another path")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ModelpexError(
            f"{option} {path}: cannot write in {folder} ({exc.strerror}): choose another folder"
        ) from None


def _same_file(a: Path, b: Path) -> bool:
    """The same file by path, or by inode when both exist (a hard link, a symlink, `./x` and `x`)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _read_table(name: str, path: Path) -> Any:
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if path.suffix == ".csv":
            return pyarrow.csv.read_csv(path)
        return pyarrow.parquet.read_table(path)
    except (OSError, pyarrow.ArrowInvalid) as exc:
        raise ModelpexError(
            f"--input {name}: cannot read {path} as {'CSV' if path.suffix == '.csv' else 'Parquet'} ({exc})"
        ) from None


def _params(text: str) -> dict[str, Any]:
    try:
        value = json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelpexError(f"--params {text!r} is not a JSON object or @file ({exc})") from None
    if not isinstance(value, dict):
        raise ModelpexError(f"--params must be a JSON object, got {type(value).__name__}")
    return value


def _stored_state(path: str, record: ArtifactRecord, runner: Runner) -> FittedState:
    """A state saved by ``--save-state``, checked against its signed record in the store."""
    try:
        payload = Path(path).read_bytes()
    except OSError as exc:
        raise ModelpexError(f"--state {path}: cannot read it ({exc.strerror})") from None
    return runner.states.load(record, hashlib.sha256(payload).hexdigest(), client="", payload=payload)


@contextmanager
def staged_state(path: str | None, outcome: RunOutcome) -> Iterator[Path | None]:
    """Where ``--save-state`` writes aside, when it was asked for."""
    if not path or outcome.state is None:
        yield None
        return
    with staged(Path(path)) as temporary:
        yield temporary


def cmd_run(args: argparse.Namespace, settings: Settings) -> None:
    """Build or find the model version, then train and predict (or predict from a stored state) on files."""
    import pyarrow.parquet

    from orchestrator.pipes import console_link
    from orchestrator.runner import Runner

    paths = _input_paths(args.input)
    _check_targets(args, paths)
    params = _params(args.params)
    if args.save_state:
        settings.store().check_writable("keep the fitted state (--save-state) and its record")
    with model_source(settings, ModelRef.parse(args.model)) as source:
        _check_inputs(source.spec, paths)
        inputs = {name: _read_table(name, path) for name, path in paths.items()}
        with _builder(settings) as builder:
            record = builder.model(source).record
    output = Path(args.output)
    with Runner(settings, builder.interpreter, timeout=args.timeout) as runner:
        state_in = _stored_state(args.state, record, runner) if args.state else None
        with err.status(f"running {record.label}"):
            outcome = runner.call(
                record,
                functools.partial(console_link, asset=record.name),
                action="predict" if state_in else "train_predict",
                inputs=inputs,
                params=params,
                state_in=state_in,
                keep_state=bool(args.save_state),
            )
        if args.save_state and outcome.state:
            runner.states.save(record, "", f"cli-{os.getpid()}", outcome.state)
        # N.B. Both files are written aside and renamed at the end: a failure leaves neither.
        with staged(output) as temporary, staged_state(args.save_state, outcome) as state_file:
            pyarrow.parquet.write_table(outcome.outputs["predictions"], temporary)
            if state_file is not None:
                state_file.write_bytes(outcome.state.payload)
    out.print(
        f"{record.label}: {sum(outcome.rows_in.values())} rows in, {outcome.rows_out['predictions']} rows out "
        f"-> {output} ({outcome.wall_seconds:.2f} s, transport {outcome.transport_seconds * 1000:.1f} ms)"
    )
    if outcome.metrics:
        out.print("metrics: " + ", ".join(f"{name} = {value:.4g}" for name, value in sorted(outcome.metrics.items())))


def cmd_warm(args: argparse.Namespace, settings: Settings) -> None:
    """Unpack the base into the model processes' PEX_ROOT and compile its bytecode, so a first run only links a venv."""
    from orchestrator.cache import ArtifactCache

    with _builder(settings) as builder:
        record = builder.base().record
    cache = ArtifactCache(settings.cache_dir, settings.model_pex_root, builder.interpreter)
    started = time.perf_counter()
    with err.status(f"unpacking base {record.key} into {settings.model_pex_root}"):
        cache.warm(builder.store, record)
    out.print(f"warmed base {record.key} in {settings.model_pex_root} ({time.perf_counter() - started:.1f} s)")


def cmd_deploy(args: argparse.Namespace, settings: Settings) -> None:
    """The main job: build the base and every model version, then materialise every asset through the instance, as
    the UI's "Materialize all" does (the run's origin is the code location; the instance's run launcher and the
    code location's executor run it)."""
    # N.B. The code server and the run's process read the settings from the environment, as on every host.
    os.environ.update(
        {
            "DAGSTER_HOME": str(settings.dagster_home),
            "MODELPEX_PROJECT": str(settings.project),
            "MODELPEX_STORE": str(settings.store_url),
        }
    )
    if settings.python:
        os.environ["MODELPEX_PYTHON"] = str(settings.python)
    from dagster import DagsterEventType, DagsterInstance

    from orchestrator.launch import check_launchable, launch_asset_job
    from orchestrator.metadata import human_duration

    with DagsterInstance.get() as instance:
        check_launchable(settings, instance)  # N.B. Before building: a refused deploy has nothing to show for it.
    cmd_build(argparse.Namespace(targets=[], all=True, force=False, complete_platform=None), settings)
    with DagsterInstance.get() as instance, err.status("loading the code location") as status:

        def submitted(run: Any) -> None:
            status.update(f"run {run.run_id}: materialising every asset (datasets, pexes, training, predictions)")

        log = settings.dagster_home / "logs" / "deploy.log"
        launched = launch_asset_job(
            settings, instance, tags={"modelpex/launched_by": "deploy"}, log=log, on_submit=submitted
        )
    run_id = launched.run.run_id
    table = Table(title=f"run {run_id} on {instance.root_directory}")
    for column in ("asset", "model version", "rows in", "rows out", "data moved", "transport", "model time"):
        table.add_column(column, no_wrap=True)
    for entry in launched.of_type(DagsterEventType.ASSET_MATERIALIZATION):
        materialization = entry.dagster_event.step_materialization_data.materialization  # type: ignore[union-attr]
        meta = {k: v.value for k, v in materialization.metadata.items()}
        if "rows_in" in meta:
            table.add_row(
                materialization.asset_key.to_user_string(),
                f"{meta['model']}@{meta['model_version']}",
                str(meta["rows_in"]),
                str(meta.get("dagster/row_count", "-")),
                str(meta["data_moved"]),
                str(meta["transport_time"]),
                human_duration(float(meta["model_seconds"])),
            )
    out.print(table)
    if not launched.success:
        failures = launched.of_type(DagsterEventType.STEP_FAILURE)
        failed = "; ".join(
            f"{e.step_key}: {_first_line(e.dagster_event.event_specific_data.error)}"  # type: ignore[union-attr]
            for e in failures
        ) or _run_failure(launched)
        raise ModelpexError(f"deploy run {run_id} failed in {failed} (its tracebacks: `modelpex ui`)")
    link = lineage_url(launched.groups)
    out.print(f"deployed: run {run_id}. Open the UI with `modelpex ui`: {link}", soft_wrap=True)


def _run_failure(launched: Any) -> str:
    """Why a run failed without a failing step (it never started, or its process died): the run's own failure."""
    from dagster import DagsterEventType

    for entry in reversed(launched.of_type(DagsterEventType.RUN_FAILURE)):
        return entry.message or entry.dagster_event.message or "the run failed"
    return "no step failed: see the run's events"


def lineage_url(groups: Sequence[str], base: str = "http://127.0.0.1:3000") -> str:
    """The UI's global lineage with every group open: the UI opens it with every group collapsed, and nothing in the
    definitions changes that; its ``expanded`` query parameter does (the UI's group ids, ``global@global:<group>``)."""
    return f"{base}/asset-groups?expanded=" + ",".join(f"global@global:{group}" for group in groups)


def _first_line(error: SerializableErrorInfo) -> str:
    """The innermost cause of a Dagster step failure (the model's own error, not Dagster's wrapper), one line."""
    while error.cause is not None:
        error = error.cause
    return error.message.strip().splitlines()[0]


def cmd_ui(args: argparse.Namespace, settings: Settings) -> None:
    """Replace this process with `dagster dev` on the project's instance, with default signal handling."""
    # N.B. The redeploy sensor reloads the code location through this webserver when the tree changes.
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    env = {
        **os.environ,
        "DAGSTER_HOME": str(settings.dagster_home),
        "MODELPEX_PROJECT": str(settings.project),
        "MODELPEX_WEBSERVER_URL": f"http://{host}:{args.port}",
    }
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # N.B. Inherited SIG_IGN would make dagster dev unstoppable (field notes).
    dagster = str(Path(sys.executable).with_name("dagster"))
    workspace = str(settings.project / "workspace.yaml")
    os.chdir(settings.project)
    os.execve(dagster, [dagster, "dev", "-w", workspace, "-h", args.host, "-p", str(args.port)], env)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelpex", description=__doc__.splitlines()[0])
    parser.add_argument("--project", help="repository with base_env/ and model_packages/ (MODELPEX_PROJECT)")
    parser.add_argument("--store", dest="store_url", help="artifact store URL or folder (MODELPEX_STORE)")
    parser.add_argument("--python", help="interpreter to build for and run with (MODELPEX_PYTHON)")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build the base and model pexes whose keys are not in the store")
    build.add_argument("targets", nargs="*", metavar="base|MODEL[@VERSION]")
    build.add_argument("--all", action="store_true", help="the base and every model version (working tree and tags)")
    build.add_argument("--force", action="store_true", help="rebuild even when the key exists")
    build.add_argument(
        "--complete-platform",
        metavar="FILE",
        help="build for the workers' platform: the file `pex3 interpreter inspect --markers --tags -o FILE` writes "
        "on a worker (MODELPEX_COMPLETE_PLATFORM)",
    )
    build.set_defaults(func=cmd_build)

    lock = commands.add_parser("lock", help="(re)create base_env/pex.lock or a model's pex.lock (needs the index)")
    lock.add_argument("targets", nargs="*", metavar="base|MODEL")
    lock.add_argument("--all", action="store_true")
    lock.set_defaults(func=cmd_lock)

    listing = commands.add_parser("list", help="the artifacts in the store, as a table")
    listing.set_defaults(func=cmd_list)

    gc = commands.add_parser("gc", help="remove artifacts nothing references, and dead orchestrators' segments")
    gc.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    gc.set_defaults(func=cmd_gc)

    run = commands.add_parser("run", help="train then predict with a model version on Parquet/CSV files")
    run.add_argument("model", metavar="MODEL[@VERSION]")
    run.add_argument("--input", action="append", default=[], metavar="NAME=PATH", help="an input frame (repeat)")
    run.add_argument("--output", required=True, metavar="PATH", help="where to write the predictions (Parquet)")
    run.add_argument("--params", default="{}", metavar="JSON|@FILE", help="model parameters as JSON")
    run.add_argument("--state", metavar="PATH", help="use this stored fitted state instead of training")
    run.add_argument("--save-state", metavar="PATH", help="keep the fitted state here for later runs")
    run.add_argument("--timeout", type=_seconds, help="seconds before the model process is killed")
    run.set_defaults(func=cmd_run)

    warm = commands.add_parser("warm", help="unpack the base into PEX_ROOT so a model's first run is fast")
    warm.set_defaults(func=cmd_warm)

    deploy = commands.add_parser("deploy", help="the main job: build everything and materialise every asset")
    deploy.set_defaults(func=cmd_deploy)

    ui = commands.add_parser("ui", help="open the Dagster UI (dagster dev) on this project's instance")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)
    return parser


def _seconds(text: str) -> float:
    try:
        return parse_seconds(text, "--timeout", 0.0)
    except ModelpexError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds, e.g. 600") from None


class UsageError(ModelpexError):
    """A command line that names nothing to do: argparse's usage line and exit code 2."""


class Terminated(BaseException):
    """SIGTERM (docker stop, Kubernetes, timeout): unwinds like Ctrl-C, so every model process, segment and
    private folder is released on the way out."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    warnings.showwarning = _show_warning
    try:
        settings = Settings.from_env(project=args.project, store_url=args.store_url, python=args.python)
        args.func(args, settings)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        err.print(f"[bold red]error:[/] modelpex {args.command}: {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except ModelpexError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 1
    except OSError as exc:  # N.B. A full disk, a folder we may not write: the file and the reason, in one line.
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Terminated:
        err.print("terminated")
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
