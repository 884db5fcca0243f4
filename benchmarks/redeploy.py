"""Redeploy benchmark: time from a change to its effect, end to end on `modelpex ui` (the real `dagster dev`, its
daemon and webserver), with the default sensor intervals, as a user sees it.

    python benchmarks/redeploy.py --json benchmarks/results/redeploy.json [--quick]

A throwaway project (this repository's base_env, one small model `m`, client `acme` following `latest`) is deployed
once; then, each repeat:

- edit: a saved edit of the version acme runs, until acme's predictions are materialised again;
- release: a new release tag `m/vX.0.0`, until acme's predictions come from that version, and until the version's
  asset exists in the UI (no Reload pressed).

It also times what the redeploy costs the code location: a reload (GraphQL `reloadRepositoryLocation`), against a
GraphQL round trip measured in the same run. The target is 60 s for each of the three.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.plot import pyplot, save  # noqa: E402
from benchmarks.results import write  # noqa: E402
from orchestrator.settings import Settings  # noqa: E402

TARGET_S = 60.0
QUICK_SENSOR_S = 2.0
PYTHON = Path(sys.executable)

MODEL = """
import pyarrow as pa
import pyarrow.compute as pc


def train(inputs, params):
    return {"mean": pc.mean(inputs["data"]["monthly_charges"]).as_py()}


def predict(inputs, state, params):
    data = inputs["data"]
    return pa.table({"customer_id": data["customer_id"], "score": pc.subtract(data["monthly_charges"], state["mean"])})
"""

PYPROJECT = """[project]
name = "m"
version = "{version}"
dependencies = ["modelpex-base"]

[tool.modelpex]
train = "m.model:train"
predict = "m.model:predict"
frames = "pyarrow"
inputs = ["data"]
"""

DEPLOYMENTS = """clients:
  acme:
    datasets:
      data: {generate: customers, rows: 200}
    models:
      m: {version: latest, inputs: {data: data}}
"""

MATERIALIZATIONS = """
query($path: [String!]!) { assetOrError(assetKey: {path: $path}) { ... on Asset {
    assetMaterializations(limit: 1) { timestamp metadataEntries { label ... on TextMetadataEntry { text } } }
} } }
"""
ASSET_KEYS = "{ assetNodes { assetKey { path } } }"
RELOAD = """
mutation($name: String!) { reloadRepositoryLocation(repositoryLocationName: $name) { __typename } }
"""


def git(project: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(project), *args], check=True, capture_output=True)


def base_store(root: Path) -> Path:
    """A store holding this repository's built bases, hard-linked (the benchmark never modifies them)."""
    store = root / "store"
    for folder in ("bases", "index/base"):
        for path in (REPO / "pex_builds" / folder).glob("*"):
            (store / folder).mkdir(parents=True, exist_ok=True)
            os.link(path, store / folder / path.name)
    return store


def make_project(root: Path) -> Path:
    project = root / "project"
    shutil.copytree(REPO / "base_env", project / "base_env", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    folder = project / "model_packages" / "m"
    (folder / "src" / "m").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT.format(version="1.0.0"))
    (folder / "src" / "m" / "__init__.py").write_text("")
    (folder / "src" / "m" / "model.py").write_text(MODEL)
    (project / "deployments.yaml").write_text(DEPLOYMENTS)
    shutil.copyfile(REPO / "workspace.yaml", project / "workspace.yaml")
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "m 1.0.0")
    return project


class GraphQL:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/graphql"

    def __call__(self, query: str, **variables: object) -> dict:
        body = json.dumps({"query": query, "variables": variables}).encode()
        request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            payload = json.load(response)
        if "errors" in payload:
            raise RuntimeError(payload["errors"])
        return payload["data"]

    def latest(self, *path: str) -> tuple[float, dict[str, str]]:
        """Timestamp (s) and text metadata of an asset's latest materialisation; (0, {}) when it has none."""
        found = self(MATERIALIZATIONS, path=list(path))["assetOrError"].get("assetMaterializations") or []
        if not found:
            return 0.0, {}
        entries = {e["label"]: e.get("text") for e in found[0]["metadataEntries"]}
        return float(found[0]["timestamp"]) / 1000, entries

    def has_asset(self, *path: str) -> bool:
        return list(path) in [a["assetKey"]["path"] for a in self(ASSET_KEYS)["assetNodes"]]


def wait(what: str, ready: Callable[[], bool], timeout: float = 300) -> float:
    started = time.monotonic()
    while not ready():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ui(project: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, GraphQL]:
    port = free_port()
    command = [str(PYTHON), "-m", "orchestrator.cli", "ui", "--port", str(port)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    graphql = GraphQL(port)

    def answers() -> bool:
        try:
            return bool(graphql(ASSET_KEYS))
        except (urllib.error.URLError, ConnectionError, RuntimeError):
            if process.poll() is not None:
                raise RuntimeError(f"dagster dev exited:\n{log.read_text()[-3000:]}") from None
            return False

    wait("dagster dev answering GraphQL", answers, timeout=180)
    return process, graphql


def edit(project: Path, graphql: GraphQL, round_: int) -> float:
    """Save an edit of the version acme runs; seconds until acme's predictions are materialised again."""
    before, _ = graphql.latest("acme", "acme_m_predictions")
    model = project / "model_packages" / "m" / "src" / "m" / "model.py"
    model.write_text(model.read_text() + f"\n# edit {round_}\n")
    return wait("predictions after an edit", lambda: graphql.latest("acme", "acme_m_predictions")[0] > before)


def release(project: Path, graphql: GraphQL, major: int) -> tuple[float, float]:
    """Tag a new release `m/v<major>.0.0` (the working tree stays as it is); seconds until acme predicts with it,
    and until its asset exists."""
    version = f"{major}.0.0"
    pyproject = project / "model_packages" / "m" / "pyproject.toml"
    working = pyproject.read_text()
    pyproject.write_text(PYPROJECT.format(version=version))
    git(project, "add", "-A")
    git(project, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", f"m {version}")
    pyproject.write_text(working)  # N.B. Back to developing the old version: only the tag holds the new one.
    git(project, "add", "-A")
    git(project, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "develop")
    started = time.monotonic()
    git(project, "tag", f"m/v{version}", "HEAD~1")
    asset: list[float] = []

    def moved() -> bool:
        if not asset and graphql.has_asset("model", "m", f"m_v{major}_0_0"):
            asset.append(time.monotonic() - started)
        return graphql.latest("acme", "acme_m_predictions")[1].get("model_version") == version

    predictions = wait(f"acme's predictions from {version}", moved)
    if not asset:
        asset.append(wait(f"the asset of m@{version}", lambda: graphql.has_asset("model", "m", f"m_v{major}_0_0")))
        asset[0] += predictions
    return predictions, asset[0]


def reload_cost(graphql: GraphQL, repeats: int) -> dict[str, float]:
    """A code location reload (what each redeploy through the sensor costs) against a GraphQL round trip."""
    reloads, trips = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        graphql(RELOAD, name="modelpex")
        reloads.append(time.perf_counter() - started)
        started = time.perf_counter()
        graphql(ASSET_KEYS)
        trips.append(time.perf_counter() - started)
    reload_s, trip_s = statistics.median(reloads), statistics.median(trips)
    return {"reload_s": reload_s, "graphql_round_trip_s": trip_s, "reload_over_round_trip": reload_s / trip_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "redeploy.json")
    quick = f"one repeat of each, sensors every {QUICK_SENSOR_S:.0f} s"
    parser.add_argument("--quick", action="store_true", help=quick)
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    # N.B. Quick shortens the sensors' interval, which most of each wait is: it proves the benchmark works, no more.
    interval = QUICK_SENSOR_S if args.quick else Settings.sensor_interval
    with tempfile.TemporaryDirectory(prefix="modelpex-redeploy-") as tmp:
        project = make_project(Path(tmp))
        env = {
            **os.environ,
            "MODELPEX_PROJECT": str(project),
            "MODELPEX_STORE": str(base_store(Path(tmp))),
            "DAGSTER_HOME": str(Path(tmp) / "dagster_home"),
            "MODELPEX_SENSOR_INTERVAL": str(interval),
        }
        subprocess.run([str(PYTHON), "-m", "orchestrator.cli", "deploy"], env=env, check=True, capture_output=True)
        process, graphql = start_ui(project, env, Path(tmp) / "dagster-dev.log")
        try:
            edits = [edit(project, graphql, i) for i in range(repeats)]
            releases = [release(project, graphql, 2 + i) for i in range(repeats)]
            cost = reload_cost(graphql, 3)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
    figures = {
        "target_s": TARGET_S,
        "sensor_interval_s": interval,
        "edit_to_predictions_s": edits,
        "release_to_predictions_s": [r[0] for r in releases],
        "release_to_asset_s": [r[1] for r in releases],
        **cost,
    }
    for name in ("edit_to_predictions_s", "release_to_predictions_s", "release_to_asset_s"):
        figures[f"{name}_median"] = statistics.median(figures[name])
        figures[f"{name}_over_target"] = figures[f"{name}_median"] / TARGET_S
    write(args.json, figures)
    plot(figures, args.json.with_suffix(".png"))
    print(json.dumps(figures, indent=2))


def plot(figures: dict, path: Path) -> None:
    plt = pyplot()
    names = ["edit_to_predictions_s", "release_to_predictions_s", "release_to_asset_s"]
    labels = ["edit -> predictions", "release tag -> predictions", "release tag -> asset"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(labels, [figures[f"{n}_median"] for n in names], color="#4c72b0")
    for i, name in enumerate(names):
        ax.scatter([i] * len(figures[name]), figures[name], color="black", zorder=3, s=12)
    ax.axhline(TARGET_S, color="#c44e52", linestyle="--", label=f"target {TARGET_S:.0f} s")
    ax.set_ylabel("seconds, end to end on modelpex ui (dagster dev)")
    ax.set_title(f"Time to redeploy (reload costs {figures['reload_s']:.1f} s)")
    ax.legend()
    save(fig, path, dpi=120)


if __name__ == "__main__":
    main()
