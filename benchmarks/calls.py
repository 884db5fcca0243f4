"""Calls benchmark: what the orchestrator adds to a model call, cold and warm, side by side in one run.

    python benchmarks/calls.py --json benchmarks/results/calls.json [--quick]

All with the churn model (scikit-learn on pandas) as the project's store has it, in the sandbox this machine
allows (the JSON records which):

- overhead per call (launch to result, minus the model's own train/predict time) for a cold process (a process
  per call), a client's first call (a fresh child of the warm fork server), and its later calls;
- a redeploy of one model for 20 clients (train, then predict, per client) in the three designs side by side: a
  cold process per call, a warm child per client (the fork server, today's design), and one warm process shared
  by every client (the design before it, which let one client's data reach another);
- ``modelpex run`` of a 100-row frame end to end, against the model process's own wall time (start-up to answer);
- inside a Dagster run (20 clients, in process), the orchestrator's own time per call, from each materialisation's
  ``step_overhead`` and ``process_start``;
- the transport's share of a client's warm predict call at 1,000 and 1,000,000 rows (issue 17);
- what the limits cost (issue 16): a client's child with the default limits against one without, alternating, for
  its start and its warm calls (target: under 5 ms per call);
- what was taken off every call: hashing the 186 MB base (now a stat of the verified copy) and importing Dagster
  in the CLI (it no longer does).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402

from benchmarks.plot import pyplot, save  # noqa: E402
from benchmarks.results import write  # noqa: E402
from orchestrator.datasets import customers  # noqa: E402
from orchestrator.pipes import console_link as loud_link  # noqa: E402
from orchestrator.run import ForkServer  # noqa: E402
from orchestrator.runner import Runner  # noqa: E402
from orchestrator.settings import Settings  # noqa: E402
from orchestrator.specs import ModelRef  # noqa: E402
from orchestrator.store import file_sha256  # noqa: E402
from orchestrator.versions import resolve_source  # noqa: E402

# N.B. The model's log lines are dropped: a benchmark times calls, not a terminal.
console_link = functools.partial(loud_link, log=lambda message: None)
TARGETS = {
    "later_warm_overhead_s": 0.02,
    "redeploy_speedup": 10.0,
    "dagster_orchestrator_s": 0.3,
    "cli_extra_s": 1.0,
    "limits_cost_per_call_s": 0.005,
}


def overhead(outcome) -> float:
    return outcome.wall_seconds - sum(outcome.model_seconds.values())


def per_call(runner: Runner, record, inputs: dict, state, repeats: int) -> dict:
    """Overhead of one call: a cold process; a client's first call on a warm server (its child forked, the model
    imported); that client's later calls."""
    prepared = runner.prepare(record)
    cold = dataclasses.replace(prepared, entry={**prepared.entry, "reuse": False})
    kwargs = {"action": "predict", "inputs": inputs, "params": {}, "state_in": state}
    cold_overheads = []
    for _ in range(repeats):
        started = time.perf_counter()
        outcome = runner.processes.call(cold, console_link, timeout=600, **kwargs)
        cold_overheads.append(time.perf_counter() - started - sum(outcome.model_seconds.values()))
    runner.processes.call(prepared, console_link, timeout=600, client="warm-up", **kwargs)  # N.B. The server.
    first, later = [], []
    for index in range(max(2, repeats)):
        for call in range(6):
            started = time.perf_counter()
            outcome = runner.processes.call(prepared, console_link, timeout=600, client=f"client-{index}", **kwargs)
            took = time.perf_counter() - started - sum(outcome.model_seconds.values())
            (first if call == 0 else later).append(took)
    runner.processes.close()
    return {
        "cold_process_s": statistics.median(cold_overheads),
        "warm_first_call_s": statistics.median(first),
        "later_warm_calls_s": statistics.median(later),
        "later_warm_calls_max_s": max(later),
    }


def redeploy(runner: Runner, record, clients: int) -> dict:
    """Train then predict for each client, every client its own data, in the three designs: a cold process per
    call, a warm child per client (fork server), one warm process shared by every client (the old design)."""
    prepared = runner.prepare(record)
    datasets = [{"customers": customers(2000, seed=i)} for i in range(clients)]

    def run(target, client) -> float:
        started = time.perf_counter()
        for index, data in enumerate(datasets):
            who = client(index)
            trained = runner.processes.call(
                target, console_link, timeout=600, client=who, action="train", inputs=data, params={}, keep_state=True
            )
            runner.processes.call(
                target,
                console_link,
                timeout=600,
                client=who,
                action="predict",
                inputs=data,
                params={},
                state_in=trained.state,
            )
        runner.processes.close()
        return time.perf_counter() - started

    per_call_s = run(dataclasses.replace(prepared, entry={**prepared.entry, "reuse": False}), lambda i: f"c{i}")
    per_client_s = run(prepared, lambda i: f"c{i}")
    shared_s = run(prepared, lambda i: "everyone")  # N.B. One child serves every client: the old shared process.
    return {
        "clients": clients,
        "process_per_call_s": per_call_s,
        "per_client_warm_s": per_client_s,
        "shared_warm_s": shared_s,
        "speedup": per_call_s / per_client_s,
        "shared_speedup": per_call_s / shared_s,
    }


def _start_and_answer(runner: Runner, prepared, sandbox=None) -> tuple[ForkServer, object, float]:
    """A fork server and its first child, as a cold call starts them, and the seconds to the child's ready."""
    started = time.perf_counter()
    server = ForkServer(prepared, sandbox or runner.sandbox)
    try:
        child = server.fork(600)
    except BaseException:
        server.close()
        raise
    return server, child, time.perf_counter() - started


def cli_run(settings: Settings, runner: Runner, record, workdir: Path, repeats: int) -> dict:
    """`modelpex run` of 100 rows against the model process's own wall time: start-up, then its answer."""
    data = workdir / "customers.parquet"
    pq.write_table(customers(100), data)
    command = [
        str(Path(sys.executable).with_name("modelpex")),
        "run",
        "churn",
        "--input",
        f"customers={data}",
        "--output",
        str(workdir / "out.parquet"),
    ]
    env = {**os.environ, "MODELPEX_PROJECT": str(settings.project), "MODELPEX_STORE": settings.store_url}
    prepared = runner.prepare(record)
    inputs = {"customers": customers(100)}
    cli, model = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True)
        cli.append(time.perf_counter() - started)
        started = time.perf_counter()
        server, child, _ = _start_and_answer(runner, prepared)
        try:
            with console_link() as link:
                outcome = child.call(link, timeout=600, action="train_predict", inputs=inputs, params={})
            answered = time.perf_counter() - started
            model.append(
                answered - (outcome.wall_seconds - sum(outcome.model_seconds.values()) - outcome.transport_seconds)
            )
        finally:
            server.close()
    return {
        "cli_s": statistics.median(cli),
        "model_process_s": statistics.median(model),
        "extra_s": statistics.median(cli) - statistics.median(model),
    }


def duration(text: str) -> float:
    """Seconds from a step's metadata, which shows durations in human units (``orchestrator.metadata.human_duration``:
    ``850 µs``, ``12.3 ms``, ``1.62 s``); a step's own time and a process start are well under a minute."""
    number, unit = text.split()
    return float(number) * {"µs": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


DEPLOYMENTS = """
clients:
{clients}
"""


def dagster_run(settings: Settings, workdir: Path, clients: int) -> dict:
    """A Dagster run over ``clients`` clients of churn, in process: the orchestrator's own time per call."""
    from dagster import AssetSelection, DagsterInstance, Definitions, define_asset_job

    from orchestrator.definitions import build_definitions

    project = workdir / "project"
    shutil.copytree(REPO / "base_env", project / "base_env", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(
        REPO / "model_packages" / "churn",
        project / "model_packages" / "churn",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    block = "".join(
        f"  c{i}:\n    datasets:\n      customers: {{generate: customers, rows: 2000, seed: {i}}}\n"
        f"    models:\n      churn: {{version: latest, inputs: {{customers: customers}}}}\n"
        for i in range(clients)
    )
    (project / "deployments.yaml").write_text(DEPLOYMENTS.format(clients=block))
    local = dataclasses.replace(settings, project=project)
    defs = build_definitions(local, automation_running=False)
    # N.B. The clients' assets and what they need: the store's release records may name versions no client runs.
    selection = AssetSelection.key_prefixes(*([f"c{i}"] for i in range(clients))).upstream()
    defs = Definitions.merge(defs, Definitions(jobs=[define_asset_job("benchmark", selection)]))
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("benchmark").execute_in_process(instance=instance)
    metadata = [
        {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
        if "step_overhead" in e.materialization.metadata
    ]
    seconds = [parse_duration(m["step_overhead"]) for m in metadata]
    starts = [parse_duration(m["process_start"]) for m in metadata if m["process_start"] != "re-used"]
    return {
        "calls": len(seconds),
        "median_s": statistics.median(seconds),
        "max_s": max(seconds),
        "processes_started": len(starts),
        "process_start_s": statistics.median(starts),
    }


def parse_duration(text: str) -> float:
    """Seconds from the assets' human durations (``850 µs``, ``12.3 ms``, ``1.62 s``)."""
    value, unit = text.split()
    return float(value) * {"µs": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def sandbox_cost(settings: Settings, runner: Runner, record, repeats: int) -> dict:
    """Starting a model process (to its first answer) in bubblewrap's namespaces and without, alternating."""
    from orchestrator.sandbox import Sandbox

    if not runner.sandbox.bwrap:
        return {"bubblewrap": False}
    plain = Sandbox.create(settings.cache_dir, settings.isolation, settings.model_user, "none")
    prepared = runner.prepare(record)
    times: dict[str, list[float]] = {"with_bwrap_s": [], "without_s": []}
    for _ in range(repeats):
        for name, sandbox in (("with_bwrap_s", runner.sandbox), ("without_s", plain)):
            server, _, seconds = _start_and_answer(runner, prepared, sandbox)
            times[name].append(seconds)
            server.close()
    figures = {name: statistics.median(values) for name, values in times.items()}
    return {"bubblewrap": True, **figures, "ratio": figures["with_bwrap_s"] / figures["without_s"]}


def removed(runner: Runner, record) -> dict:
    """Hashing the base as every call did, against trusting its verified copy; importing Dagster in the CLI."""
    base = runner.store.record("base", "base", record.base_key)
    started = time.perf_counter()
    file_sha256(runner.store.local_path(base))
    hashed = time.perf_counter() - started
    started = time.perf_counter()
    runner.cache.artifact(runner.store, base)
    trusted = time.perf_counter() - started

    def imports(modules: str) -> float:
        code = f"import time; t = time.perf_counter(); import {modules}; print(time.perf_counter() - t)"
        return float(
            subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
        )

    cli_path = "orchestrator.cli, orchestrator.runner, orchestrator.pipes, pyarrow.parquet"
    dagster_free = (
        subprocess.run(
            [sys.executable, "-c", f"import sys, {cli_path}; print('dagster' in sys.modules)"],
            capture_output=True,
            text=True,
            cwd=REPO,
        ).stdout.strip()
        == "False"
    )
    return {
        "hash_base_s": hashed,
        "trusted_copy_s": trusted,
        "import_dagster_s": imports("dagster"),
        "import_cli_path_s": imports(cli_path),
        "cli_path_imports_dagster": not dagster_free,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "calls.json")
    parser.add_argument("--quick", action="store_true", help="one repeat, two clients (a minute on a quiet machine)")
    args = parser.parse_args()
    repeats, clients = (1, 2) if args.quick else (7, 20)
    settings = Settings.from_env(project=str(REPO))
    builder = settings.builder()
    with tempfile.TemporaryDirectory(prefix="modelpex-bench-") as tmp:
        record = builder.model(resolve_source(REPO, settings.models_dir, ModelRef("churn"), Path(tmp))).record
    with (
        Runner(settings, builder.interpreter, timeout=600) as runner,
        tempfile.TemporaryDirectory(prefix="modelpex-bench-") as tmp,
    ):
        workdir = Path(tmp)
        workdir.chmod(0o755)
        inputs = {"customers": customers(2000)}
        state = runner.call(record, console_link, action="train", inputs=inputs, params={}, keep_state=True).state
        figures = {
            "model": record.label,
            "sandbox": runner.sandbox.describe(),
            "per_call": per_call(runner, record, inputs, state, repeats),
            "redeploy": redeploy(runner, record, clients),
            "cli_100_rows": cli_run(settings, runner, record, workdir, repeats),
            "dagster": dagster_run(settings, workdir, clients),
            "process_start": sandbox_cost(settings, runner, record, repeats),
            "removed": removed(runner, record),
            "limits": limits_cost(runner, record, inputs, state, max(2, repeats)),
            "transport": transport_share(runner, record, state, (1000, 1_000_000), 3 if args.quick else 9),
        }
    figures["targets"] = TARGETS
    figures["met"] = {
        "later_warm_overhead_s": figures["per_call"]["later_warm_calls_s"] <= TARGETS["later_warm_overhead_s"],
        "redeploy_speedup": figures["redeploy"]["speedup"] >= TARGETS["redeploy_speedup"],
        "dagster_orchestrator_s": figures["dagster"]["median_s"] <= TARGETS["dagster_orchestrator_s"],
        "cli_extra_s": figures["cli_100_rows"]["extra_s"] <= TARGETS["cli_extra_s"],
        "limits_cost_per_call_s": figures["limits"]["cost_per_call_s"] <= TARGETS["limits_cost_per_call_s"],
    }
    figures = write(args.json, figures)
    plot(figures, args.json.with_suffix(".png"))
    print(json.dumps(figures, indent=2))


def plot(figures: dict, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    calls = figures["per_call"]
    limits = figures["limits"]
    labels = [
        "cold process",
        "client's first call (fork)",
        "later warm calls",
        "later warm calls, child without limits",
        "later warm calls, child with limits",
        "Dagster step (median)",
        "CLI extra",
    ]
    values = [
        calls["cold_process_s"],
        calls["warm_first_call_s"],
        calls["later_warm_calls_s"],
        limits["without"]["call_s"],
        limits["with"]["call_s"],
        figures["dagster"]["median_s"],
        figures["cli_100_rows"]["extra_s"],
    ]
    left.barh(labels, values, color=["#888", "#dd8452", "#4c72b0", "#8172b3", "#937860", "#55a868", "#c44e52"])
    left.set_xscale("log")
    left.set_xlabel("seconds the orchestrator adds per call (log)")
    left.set_title("overhead per call")
    redeploy = figures["redeploy"]
    right.bar(
        ["cold process per call", "warm child per client", "one warm process shared"],
        [redeploy["process_per_call_s"], redeploy["per_client_warm_s"], redeploy["shared_warm_s"]],
        color=["#888", "#4c72b0", "#dd8452"],
    )
    right.set_ylabel("seconds")
    right.set_title(
        f"redeploy, {redeploy['clients']} clients (train + predict each)\nwarm child per client "
        f"{redeploy['speedup']:.1f}x, one shared process {redeploy['shared_speedup']:.1f}x faster than cold"
    )
    save(fig, path)


# --- the transport's share of a warm call (issue 17) ----------------------------------------------------------


def transport_share(runner: Runner, record, state, sizes: tuple[int, ...], calls: int) -> dict:
    """A client's warm predict calls at each size: the call's wall time, the transport's part of it (our writes and
    reads of the frames, the model's reads and writes, as `RunOutcome.transport_seconds` counts them), and the model's
    own predict; medians of ``calls`` calls after a first one."""
    prepared = runner.prepare(record)
    figures = {}
    for rows in sizes:
        kwargs = {"action": "predict", "inputs": {"customers": customers(rows)}, "params": {}, "state_in": state}
        runner.processes.call(prepared, console_link, timeout=600, client=f"transport-{rows}", **kwargs)
        outcomes = [
            runner.processes.call(prepared, console_link, timeout=600, client=f"transport-{rows}", **kwargs)
            for _ in range(calls)
        ]
        wall = statistics.median(o.wall_seconds for o in outcomes)
        transport = statistics.median(o.transport_seconds for o in outcomes)
        figures[str(rows)] = {
            "wall_s": wall,
            "transport_s": transport,
            "model_s": statistics.median(sum(o.model_seconds.values()) for o in outcomes),
            "transport_share": transport / wall,
            "bytes_in": outcomes[0].bytes_in,
            "bytes_out": outcomes[0].bytes_out,
        }
    runner.processes.close()
    return figures


# --- what the limits cost (issue 16) ----------------------------------------------------------------------------


def _limited_process(runner: Runner, prepared, limits, kwargs: dict, calls: int) -> dict:
    """A fork server's child with ``limits`` (None: none applied): its start (fork, limits, the model's import), its
    warm calls' overhead, and the server's end (with a uid of its own, the uid's processes ended)."""
    server = ForkServer(prepared, runner.sandbox, limits=limits)
    overheads = []
    try:
        started = time.perf_counter()
        process = server.fork(600, limits, "the benchmark")
        start = time.perf_counter() - started
        for _ in range(calls):
            with console_link() as link:
                overheads.append(overhead(process.call(link, timeout=600, **kwargs)))
    finally:
        ended = time.perf_counter()
        server.close()
    return {"start_s": start, "call_s": statistics.median(overheads), "close_s": time.perf_counter() - ended}


def limits_cost(runner: Runner, record, inputs: dict, state, repeats: int) -> dict:
    """Each figure with and without limits, alternating so that the machine's load falls on both alike."""
    from orchestrator.limits import Limits

    prepared = runner.prepare(record)
    kwargs = {"action": "predict", "inputs": inputs, "params": {}, "state_in": state}
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    for _ in range(repeats):
        for name, limits in (("without", None), ("with", Limits.defaults())):
            runs[name].append(_limited_process(runner, prepared, limits, kwargs, 6))
    figures: dict = {
        name: {key: statistics.median(run[key] for run in each) for key in ("start_s", "call_s", "close_s")}
        for name, each in runs.items()
    }
    figures["cost_per_call_s"] = figures["with"]["call_s"] - figures["without"]["call_s"]
    figures["cost_per_process_start_s"] = figures["with"]["start_s"] - figures["without"]["start_s"]
    return figures


if __name__ == "__main__":
    main()
