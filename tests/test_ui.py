"""The UI right after `modelpex deploy`, as a new user opens it: the real `modelpex deploy` and `modelpex ui` (dagster
dev) on loopback, and Debian's Chromium driven by Playwright (headless), which reads the rendered pages.

One client pins m 1.0.0, a release without a prediction contract; the other follows latest, 1.1.0, which declares
one. Every asset is in sync (GraphQL `staleStatus`, and no "Unsynced" on the graph); a client's graph shows who runs
which version and whether it is pinned; the model versions' group names the clients that run them; the predictions'
page says the version, the pin and the missing contract first, in rendered Markdown, its client in the breadcrumbs
and the data's profile before the timings; `build_model`'s launchpad pre-fills the version alone, completes the
versions as a dropdown, and a build through it materialises the version's asset and leaves everything in sync.

Screenshots go to ``$MODELPEX_TEST_ARTIFACTS`` (default ``test-artifacts/`` in the repository), ``ui-*.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from orchestrator.store import LocalPexStore

from .conftest import REPO, CliResult, Project, free_port
from .test_dagster import client, m_model, write_deployments
from .test_quality import CONTRACT
from .test_webserver import QUIET, GraphQL

ARTIFACTS = Path(os.environ.get("MODELPEX_TEST_ARTIFACTS", REPO / "test-artifacts"))
NEVER = {"train": "0 2 1 1 *", "predict": "0 3 1 1 *"}  # N.B. No cron fires during the test: automation is on.
WAIT_MS = 120_000  # N.B. A loaded machine: the UI fetches what it shows after it loads.

STALE = "{ assetNodes { assetKey { path } staleStatus } }"
RUNS = """
query($job: String!) { runsOrError(filter: {pipelineName: $job}) { ... on Runs { results { runId status } } } }
"""
LATEST = """
query($path: [String!]!) { assetOrError(assetKey: {path: $path}) { ... on Asset {
    assetMaterializations(limit: 1) { runId }
} } }
"""


@pytest.fixture
def deployed(project: Project, cli: Callable[..., CliResult], tmp_path: Path) -> dict[str, str]:
    """The project after a real `modelpex deploy`: acme pins m 1.0.0 (released without a contract), globex follows
    latest (1.1.0, with a contract). Returns the environment `modelpex ui` runs with, and under ``lineage`` the path
    of the link to the lineage that deploy ends with."""
    m_model(project, "1.0.0")
    project.commit_and_tag("m 1.0.0", "m/v1.0.0")
    m_model(project, "1.1.0", CONTRACT)
    write_deployments(
        project,
        {
            "acme": {**client("1.0.0", threshold=0.4), "schedules": NEVER},
            "globex": {**client("latest"), "schedules": NEVER},
        },
    )
    shutil.copyfile(REPO / "workspace.yaml", project.root / "workspace.yaml")
    project.commit_and_tag("m 1.1.0")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(QUIET)  # N.B. No "join the community" dialog over the screenshots.
    env = {"DAGSTER_HOME": str(home)}
    done = cli("deploy", env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    (link,) = re.findall(r"http://127\.0\.0\.1:3000(/asset-groups\?expanded=\S+)", done.stdout)
    return {**env, "lineage": link}


@contextmanager
def ui(project: Project, store: LocalPexStore, env: dict[str, str], log: Path) -> Iterator[tuple[GraphQL, str]]:
    """`modelpex ui` on a free loopback port until GraphQL answers; SIGTERM at the end, which it must obey."""
    port = free_port()
    full = {**os.environ, "MODELPEX_PROJECT": str(project.root), "MODELPEX_STORE": str(store.root), **env}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port)],
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    graphql = GraphQL(port)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if graphql("{ version }")["version"]:
                    break
            except (urllib.error.URLError, ConnectionError):  # N.B. Not up yet; a GraphQL error is a failure.
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "dagster dev did not answer GraphQL within 180 s"
            time.sleep(0.5)
        yield graphql, f"http://127.0.0.1:{port}"
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=30) == 0, f"exit code {process.returncode} after SIGTERM"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def unsynced(graphql: GraphQL) -> list[str]:
    nodes = graphql(STALE)["assetNodes"]
    assert len(nodes) == 9, nodes  # N.B. base, two versions, and per client its data, state and predictions.
    return sorted("/".join(n["assetKey"]["path"]) for n in nodes if n["staleStatus"] != "FRESH")


@pytest.fixture
def browser() -> Iterator[object]:
    """Headless Chromium (Debian's, the one installed on the machine: Playwright downloads no browser here)."""
    from playwright.sync_api import sync_playwright

    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    assert found, "chromium not found: install Debian's chromium (apt-get install chromium), as .ci/run does"
    with sync_playwright() as playwright:
        # N.B. --no-sandbox: Chromium refuses to run as root otherwise (CI does); the pages are our own UI on loopback.
        chromium = playwright.chromium.launch(executable_path=found, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield chromium.new_page(viewport={"width": 1600, "height": 1100})
        finally:
            chromium.close()


def text(page) -> str:
    return page.inner_text("body")


def shows(page, *texts: str, absent: tuple[str, ...] = ()) -> str:
    """Wait until the page's visible text holds every one of ``texts`` and none of ``absent``; return that text."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        body = text(page)
        if all(t in body for t in texts) and not any(t in body for t in absent):
            return body
        if time.monotonic() > deadline:
            missing = [t for t in texts if t not in body]
            present = [t for t in absent if t in body]
            raise AssertionError(f"missing {missing}, present {present} on {page.url}:\n{body[:3000]}")
        page.wait_for_timeout(500)


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / name)
    assert (ARTIFACTS / name).stat().st_size > 10_000, f"{name} is blank"


@pytest.mark.timeout(1500)
def test_the_ui_after_a_deploy(
    deployed: dict[str, str], project: Project, store: LocalPexStore, browser, tmp_path: Path
) -> None:
    page = browser
    env = {k: v for k, v in deployed.items() if k != "lineage"}
    with ui(project, store, env, tmp_path / "dagster-dev.log") as (graphql, base):
        assert unsynced(graphql) == [], "a fresh deploy leaves every asset in sync"

        # The link deploy ends with: the global lineage, every group open (the UI alone opens them all collapsed).
        page.goto(base + deployed["lineage"])
        shows(page, "Global asset lineage", "m_v1_0_0")  # N.B. The UI draws only the nodes in view.
        lineage = set(text(page).split())
        nodes = {"base", "m_v1_0_0", "m_v1_1_0", "acme_m_state", "acme_m_predictions", "globex_m_state"}
        assert len(nodes & lineage) >= 3, f"collapsed groups show no node: {sorted(nodes & lineage)}"
        screenshot(page, "ui-lineage.png")

        # A client's graph: its nodes name the client and the model, and show the version they run and the pin.
        page.goto(f"{base}/locations/modelpex/asset-groups/acme/lineage")
        graph = shows(page, "acme_m_state", "acme_m_predictions", "m_v1_0_0", absent=("Loading",))
        assert graph.count("Materialized") == 3 and "Unsynced" not in graph, graph[:3000]
        labels = set(graph.split())
        assert {"v1.0.0", "pinned"} <= labels and "follows-latest" not in labels, "kinds under the nodes"
        screenshot(page, "ui-graph-acme.png")
        page.goto(f"{base}/locations/modelpex/asset-groups/globex/lineage")
        assert {"globex_m_state", "v1.1.0", "follows-latest"} <= set(shows(page, "globex_m_state", "v1.1.0").split())

        # The model versions' group: each version links to the state of the client that runs it, named so.
        page.goto(f"{base}/locations/modelpex/asset-groups/models/lineage")
        shows(page, "m_v1_0_0", "m_v1_1_0", "acme_m_state", "globex_m_state")
        screenshot(page, "ui-models.png")

        # The predictions' page: who runs what first, rendered, then the contract, the data, then the timings.
        page.goto(f"{base}/assets/acme/acme_m_predictions")
        asset = shows(page, "acme runs m 1.0.0 (pinned): its predictions.", "class_balance", "model_seconds")
        assert "m 1.0.0 declares no prediction contract" in asset
        assert "**" not in asset and "`" not in asset, "the description renders as Markdown"
        assert page.locator("code", has_text='{"threshold": 0.4}').first.is_visible(), "parameters, as code"
        crumbs = page.get_by_role("link", name="acme", exact=True).first
        assert crumbs.is_visible(), "the client is in the breadcrumbs"
        profile, timings = asset.index("class_balance"), asset.index("model_seconds")
        assert profile < timings and asset.index("preview") < asset.index("transport_time"), "data first"
        assert "model_time" not in asset, "one duration of the model's code, a number Dagster plots"
        screenshot(page, "ui-predictions.png")
        page.goto(f"{base}/assets/acme/acme_m_predictions?view=checks")
        shows(page, "rows_match_input", "declares no prediction contract")
        page.goto(f"{base}/assets/globex/globex_m_predictions")
        shows(page, "globex runs m 1.1.0 (follows latest): its predictions.", "against the contract m 1.1.0 declares")
        assert page.locator("code", has_text="score_range").first.is_visible(), "its checks, named as code"
        page.goto(f"{base}/assets/globex/globex_m_predictions?view=checks")
        shows(page, "no_nulls", "score_range", "band_values", absent=("declares no prediction contract",))

        # The catalog shows descriptions as plain words, not Markdown source.
        page.goto(f"{base}/assets")
        catalog = shows(page, "acme runs m 1.0.0 (pinned)", "globex runs m 1.1.0 (follows latest)")
        assert "**" not in catalog

        # build_model's launchpad: the version alone, an enum with a readable name that completes as a dropdown.
        page.goto(f"{base}/locations/modelpex/jobs/build_model/playground")
        editor = page.locator(".CodeMirror")
        editor.get_by_text("m@latest").wait_for(timeout=WAIT_MS)
        config = editor.inner_text()
        assert "model_version" in config and "resources" not in config and str(project.root) not in config, config
        editor.get_by_text("m@latest").click()
        page.keyboard.press("End")
        for _ in "m@latest":
            page.keyboard.press("Backspace")
        page.keyboard.type("m@")
        hints = page.locator(".CodeMirror-hints li")
        hints.first.wait_for(timeout=WAIT_MS)
        assert hints.all_inner_texts() == ["m@latest", "m@1.0.0", "m@1.1.0"]
        assert "ModelVersion" in text(page) and "ModelVersion_" not in text(page)
        screenshot(page, "ui-launchpad.png")
        hints.filter(has_text="m@1.0.0").click()
        page.get_by_role("button", name="Launch Run").click()
        run_id = wait_for_run(graphql, "build_model")
        (built,) = graphql(LATEST, path=["model", "m", "m_v1_0_0"])["assetOrError"]["assetMaterializations"]
        assert built["runId"] == run_id, "a build through build_model materialises the version's asset"
        assert unsynced(graphql) == [], "and leaves everything in sync"


def wait_for_run(graphql: GraphQL, job: str) -> str:
    """The one run of ``job``, once it succeeded."""
    deadline = time.monotonic() + 300
    while True:
        runs = graphql(RUNS, job=job)["runsOrError"]["results"]
        if runs and runs[0]["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            assert len(runs) == 1 and runs[0]["status"] == "SUCCESS", runs
            return runs[0]["runId"]
        assert time.monotonic() < deadline, f"{job}: {runs}"
        time.sleep(1)
