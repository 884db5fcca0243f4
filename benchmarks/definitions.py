"""Definitions benchmark: load time and redeploy-sensor tick time of a code location with many models and
clients (default 100 x 50, every client running every model), each as a ratio against an empty code location
measured in the same run.

    python benchmarks/definitions.py --json benchmarks/results/definitions.json [--quick]

"Load" is what a Dagster code server does before it can answer the webserver, in a fresh process: import the
module, build the Definitions, resolve the repository (asset graph, jobs, schedules, sensors), and serialise its
snapshot (what the webserver receives). A tick is one evaluation of ``modelpex_redeploy``
with a cursor from a previous tick (the tree unchanged), in process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.plot import pyplot, save  # noqa: E402
from benchmarks.results import write  # noqa: E402

MODEL_CODE = """
def train(inputs, params):
    return {"n": inputs["data"].num_rows}


def predict(inputs, state, params):
    return inputs["data"]
"""

LOAD = """
import os, sys, time, json
started, cpu = time.perf_counter(), time.process_time()
from dagster._core.remote_representation.external_data import RepositorySnap
from dagster_shared.serdes import serialize_value
from orchestrator.definitions import build_definitions
from orchestrator.settings import Settings
imported = time.perf_counter()
defs = build_definitions(Settings.from_env())
repository = defs.get_repository_def()
repository.get_all_jobs(); repository.asset_graph
built = time.perf_counter()
snapshot = serialize_value(RepositorySnap.from_def(repository))
print(json.dumps({
    "import_s": imported - started, "build_s": built - imported, "snapshot_s": time.perf_counter() - built,
    "snapshot_mb": len(snapshot) / 2**20,
    "assets": len(list(repository.asset_graph.get_all_asset_keys())), "jobs": len(repository.get_all_jobs()),
    "schedules": len(repository.schedule_defs), "sensors": len(repository.sensor_defs),
    "checks": len(repository.asset_graph.asset_check_keys), "cpu_s": time.process_time() - cpu,
}), flush=True)
os._exit(0)  # N.B. A code server stays up: tearing down its objects is not part of loading.
"""


def make_project(root: Path, models: int, clients: int, per_client: int | None = None) -> Path:
    shutil.copytree(REPO / "base_env", root / "base_env", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / "model_packages").mkdir()
    for i in range(models):
        name = f"m{i:03d}"
        folder = root / "model_packages" / name
        (folder / "src" / name).mkdir(parents=True)
        (folder / "pyproject.toml").write_text(
            f'[project]\nname = "{name}"\nversion = "1.0.{i % 7}"\ndependencies = ["modelpex-base"]\n\n'
            f'[tool.modelpex]\ntrain = "{name}.model:train"\npredict = "{name}.model:predict"\n'
            'frames = "pyarrow"\ninputs = ["data"]\n'
        )
        (folder / "src" / name / "__init__.py").write_text("")
        (folder / "src" / name / "model.py").write_text(MODEL_CODE)
    deployments = {
        "clients": {
            f"client{c:03d}": {
                "schedules": {"train": "0 2 * * *", "predict": "0 * * * *"},
                "datasets": {"data": {"generate": "customers", "rows": 100, "seed": c}},
                "models": {
                    f"m{(c * (per_client or 0) + i) % models:03d}": {"version": "latest", "inputs": {"data": "data"}}
                    for i in range(per_client or models)
                },
            }
            for c in range(clients)
        }
    }
    (root / "deployments.yaml").write_text(yaml.safe_dump(deployments))
    return root


def load(project: Path, repeats: int) -> dict[str, float]:
    env = {**os.environ, "MODELPEX_PROJECT": str(project), "MODELPEX_STORE": str(project / "pex_builds")}
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, check=True)
        runs.append({"wall_s": time.perf_counter() - started, **json.loads(out.stdout)})
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def tick(project: Path, repeats: int) -> float:
    from dagster import DagsterInstance, build_sensor_context

    from orchestrator.definitions import build_definitions
    from orchestrator.resources import ModelpexResource
    from orchestrator.settings import Settings

    settings = Settings.from_env(env={}, project=str(project), store_url=str(project / "pex_builds"))
    defs = build_definitions(settings)
    sensor = defs.resolve_sensor_def("modelpex_redeploy")
    resource = ModelpexResource(project_dir=str(project), store_url=str(project / "pex_builds"))
    cursor, times = None, []
    with DagsterInstance.ephemeral() as instance:
        for _ in range(repeats + 1):
            with build_sensor_context(
                instance=instance, cursor=cursor, definitions=defs, resources={"modelpex": resource}
            ) as context:
                started = time.perf_counter()
                result = sensor(context)
                times.append(time.perf_counter() - started)
            assert not result.run_requests, "an unchanged tree requests nothing"
            cursor = result.cursor
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "definitions.json")
    parser.add_argument("--quick", action="store_true", help="10 models x 5 clients, one repeat")
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--models-per-client", type=int, default=0, help="0 = every client runs every model")
    args = parser.parse_args()
    models, clients = (10, 5) if args.quick else (args.models, args.clients)
    repeats = 1 if args.quick else 5
    with tempfile.TemporaryDirectory(prefix="modelpex-defs-") as tmp:
        empty = make_project(Path(tmp) / "empty", 0, 0)
        big = make_project(Path(tmp) / "big", models, clients, args.models_per_client or None)
        figures = {
            "models": models,
            "clients": clients,
            "models_per_client": args.models_per_client or models,
            "empty": {**load(empty, repeats), "tick_s": tick(empty, repeats)},
            "large": {**load(big, repeats), "tick_s": tick(big, repeats)},
        }
    e, g = figures["empty"], figures["large"]
    figures["load_ratio"] = g["wall_s"] / e["wall_s"]
    # N.B. CPU time too: on a shared machine wall time swings with the neighbours' load, CPU time much less.
    figures["load_cpu_ratio"] = g["cpu_s"] / e["cpu_s"]
    figures["tick_ratio"] = g["tick_s"] / e["tick_s"]
    print(
        f"{models} models x {clients} clients, {figures['models_per_client']} per client: "
        f"{g['assets']:.0f} assets, {g['checks']:.0f} checks, {g['jobs']:.0f} jobs, {g['schedules']:.0f} schedules"
    )
    print(
        f"load (fresh process): {g['wall_s']:.2f} s vs empty {e['wall_s']:.2f} s = {figures['load_ratio']:.2f}x "
        f"(definitions {g['build_s']:.2f} s, snapshot {g['snapshot_s']:.2f} s of {g['snapshot_mb']:.0f} MB); "
        f"CPU {g['cpu_s']:.2f} s vs {e['cpu_s']:.2f} s = {figures['load_cpu_ratio']:.2f}x"
    )
    print(
        f"sensor tick: {g['tick_s'] * 1000:.0f} ms vs empty {e['tick_s'] * 1000:.0f} ms = {figures['tick_ratio']:.1f}x"
    )
    write(args.json, figures)
    plot(figures, args.json.with_suffix(".png"))
    print(f"wrote {args.json} and {args.json.with_suffix('.png')}")


def plot(figures: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    label = f"{figures['models']} models x {figures['clients']} clients"
    for ax, key, title in (
        (axes[0], "wall_s", "code location load (s)"),
        (axes[1], "tick_s", "redeploy sensor tick (s)"),
    ):
        values = [figures["empty"][key], figures["large"][key]]
        ax.bar(["empty", label], values, color=["#bbb", "#4c72b0"])
        ax.set_title(f"{title}: {values[1] / values[0]:.1f}x")
    save(fig, path)


if __name__ == "__main__":
    main()
