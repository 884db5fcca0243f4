"""Build benchmark: base build (cold and cached), model rebuild after a code-only change, cache hits, pex sizes,
and warm start of a layered model pex against a plain venv importing the same libraries, side by side in one run.

    python benchmarks/build.py --json benchmarks/results/build.json [--quick]

"Cold" base build means the key is not in the store; pex's own download cache is warm (the wheels are not fetched
again, as on any machine that built once); ``--empty-pex-cache`` also times a build that downloads everything.
Warm-start runs alternate between the two contenders, so machine noise hits both; the figure that counts is their
ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.plot import pyplot, save  # noqa: E402
from benchmarks.results import write  # noqa: E402
from orchestrator.build import Builder, Interpreter, layer_args, pex_command  # noqa: E402
from orchestrator.settings import Settings  # noqa: E402
from orchestrator.specs import ModelRef, load_base_env  # noqa: E402
from orchestrator.store import LocalPexStore  # noqa: E402
from orchestrator.versions import resolve_source  # noqa: E402

PROBE_IMPORTS = "import modelpex_runtime.entry, numpy, pandas, polars, pyarrow, sklearn.linear_model"
TARGETS = {"model_rebuild_s": 3.0, "cache_hit_s": 0.3, "own_bytes": 100_000, "warm_start_ratio": 1.2}


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def pex_sizes(pex: Path) -> dict[str, int]:
    with zipfile.ZipFile(pex) as archive:
        infos = archive.infolist()
    bootstrap = sum(i.compress_size for i in infos if i.filename.startswith(".bootstrap/"))
    total = pex.stat().st_size
    return {"total": total, "bootstrap": bootstrap, "own": total - bootstrap}


def packed_own_bytes(source: Path, base_filename: str, workdir: Path) -> int:
    """Bytes a redeploy would ship with pex's packed layout, where the bootstrap is a shared, cacheable blob."""
    out = workdir / "packed"
    subprocess.run(
        pex_command(
            "-D",
            str(source),
            *layer_args(base_filename),
            "-m",
            "modelpex_runtime",
            "--layout",
            "packed",
            "-o",
            str(out),
        ),
        check=True,
        capture_output=True,
        cwd=workdir,
    )
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and ".bootstrap" not in p.parts)


def build_probe(base_filename: str, workdir: Path) -> Path:
    """A pex with the model recipe whose entry point imports what a model imports, then exits."""
    src = workdir / "probe_src"
    (src / "probe").mkdir(parents=True)
    (src / "probe" / "__init__.py").write_text("")
    (src / "probe" / "__main__.py").write_text(PROBE_IMPORTS + "\n")
    output = workdir / "probe.pex"
    subprocess.run(
        pex_command("-D", str(src), *layer_args(base_filename), "-m", "probe", "-o", str(output)),
        check=True,
        capture_output=True,
        cwd=workdir,
    )
    return output


def run_seconds(command: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def warm_start(probe: Path, workdir: Path, repeats: int, cold: bool = True) -> dict[str, object]:
    """The probe against a plain venv; ``cold``: its first run unpacks the base into an empty PEX_ROOT (15-20 s),
    otherwise into the one set-up warmed (``modelpex warm``), and ``cold_first_run_s`` is None."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    pex_root = workdir / "pex_root" if cold else Settings.from_env(project=str(REPO)).model_pex_root
    env["PEX_ROOT"] = str(pex_root)
    venv = [sys.executable, "-c", PROBE_IMPORTS]
    first = run_seconds([str(probe)], env, workdir)  # N.B. Cold: unpacks the base into an empty PEX_ROOT.
    run_seconds(venv, env, workdir)
    pex_runs, venv_runs = [], []
    for _ in range(repeats):
        pex_runs.append(run_seconds([str(probe)], env, workdir))
        venv_runs.append(run_seconds(venv, env, workdir))
    pex_s, venv_s = statistics.median(pex_runs), statistics.median(venv_runs)
    return {
        "cold_first_run_s": first if cold else None,
        "model_pex_s": pex_s,
        "plain_venv_s": venv_s,
        "ratio": pex_s / venv_s,
        "model_pex_runs": pex_runs,
        "plain_venv_runs": venv_runs,
    }


def link_built_bases(store: Path) -> None:
    """This repository's built bases (set-up builds them) hard-linked into ``store``: never modified here."""
    for folder in ("bases", "index/base"):
        for path in (REPO / "pex_builds" / folder).glob("*"):
            (store / folder).mkdir(parents=True, exist_ok=True)
            os.link(path, store / folder / path.name)


def cli_cache_hit(project: Path, store: Path, repeats: int) -> float:
    env = {**os.environ, "MODELPEX_PROJECT": str(project), "MODELPEX_STORE": str(store)}
    command = [sys.executable, "-m", "orchestrator.cli", "build", "churn"]
    return statistics.median(run_seconds(command, env, project) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "build.json")
    parser.add_argument(
        "--quick", action="store_true", help="one repetition; the base and its unpacked copy taken as set-up left them"
    )
    parser.add_argument("--empty-pex-cache", action="store_true", help="also build the base with an empty PEX_ROOT")
    args = parser.parse_args()
    repeats = 1 if args.quick else 9
    figures: dict[str, object] = {"quick": args.quick, "python": sys.version.split()[0], "targets": TARGETS}
    with tempfile.TemporaryDirectory(prefix="modelpex-bench-") as tmp:
        work = Path(tmp)
        project = work / "project"
        shutil.copytree(
            REPO / "base_env", project / "base_env", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
        for name in ("churn", "demand", "credit_risk"):
            shutil.copytree(
                REPO / "model_packages" / name,
                project / "model_packages" / name,
                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache"),
            )
        store = LocalPexStore(work / "store")
        if args.quick:  # N.B. The cold build (a minute or more) is a full run's figure only.
            link_built_bases(store.root)
        builder = Builder(store, load_base_env(project / "base_env"), Interpreter.detect())
        if args.empty_pex_cache:  # N.B. Downloads every wheel of the base lock from the package index.
            os.environ["PEX_ROOT"] = str(work / "empty_pex_root")
            figures["base_build_empty_pex_cache_s"] = timed(
                Builder(LocalPexStore(work / "cold_store"), load_base_env(project / "base_env")).base
            )[0]
            del os.environ["PEX_ROOT"]
        cold, base = timed(builder.base)
        cold = None if args.quick else cold  # type: ignore[assignment]
        cached, _ = timed(builder.base)
        figures["base"] = {"cold_build_s": cold, "cached_s": cached, "size": base.record.size}  # type: ignore[union-attr]
        print(f"base: cold build {cold or 0:.1f} s, cached {cached * 1000:.1f} ms, {base.record.size / 1e6:.1f} MB")  # type: ignore[union-attr]

        def build(name: str):
            source = resolve_source(project, project / "model_packages", ModelRef(name), work / "exports")
            return builder.model(source)

        sizes = {}
        for name in ("churn", "demand", "credit_risk"):
            record = build(name).record
            sizes[name] = pex_sizes(store.local_path(record))
        figures["sizes"] = sizes
        model_py = project / "model_packages" / "churn" / "src" / "churn" / "model.py"
        rebuilds, hits = [], []
        for i in range(repeats):
            model_py.write_text(model_py.read_text() + f"\n# code-only change {i}\n")
            seconds, result = timed(build, "churn")
            assert not result.cached  # type: ignore[union-attr]
            rebuilds.append(seconds)
            seconds, result = timed(build, "churn")
            assert result.cached  # type: ignore[union-attr]
            hits.append(seconds)
        figures["model_rebuild_s"] = statistics.median(rebuilds)
        figures["cache_hit_in_process_s"] = statistics.median(hits)
        figures["cache_hit_cli_s"] = cli_cache_hit(project, store.root, repeats)
        (work / base.record.filename).symlink_to(store.fetch(base.record))  # type: ignore[union-attr]
        figures["packed_layout_own_bytes"] = packed_own_bytes(
            project / "model_packages" / "churn" / "src",
            base.record.filename,
            work,  # type: ignore[union-attr]
        )
        probe = build_probe(base.record.filename, work)  # type: ignore[union-attr]
        figures["warm_start"] = warm_start(probe, work, repeats, cold=not args.quick)
    report(figures, args.json)


def report(figures: dict, path: Path) -> None:
    warm = figures["warm_start"]
    if "base_build_empty_pex_cache_s" in figures:
        print(f"base build with an empty pex cache (downloads): {figures['base_build_empty_pex_cache_s']:.1f} s")
    print(f"model rebuild after a code-only change: {figures['model_rebuild_s']:.2f} s (target <= 3 s)")
    print(
        f"cache hit: {figures['cache_hit_in_process_s'] * 1000:.1f} ms in process, "
        f"{figures['cache_hit_cli_s'] * 1000:.0f} ms as a CLI command (target <= 300 ms)"
    )
    for name, size in figures["sizes"].items():
        print(
            f"{name:12s} pex {size['total'] / 1e6:.2f} MB = bootstrap {size['bootstrap'] / 1e6:.2f} MB "
            f"+ own {size['own'] / 1e3:.1f} KB"
        )
    print(
        f"packed layout, churn's own bytes (what a redeploy ships): {figures['packed_layout_own_bytes'] / 1e3:.1f} KB"
    )
    print(
        f"warm start: model pex {warm['model_pex_s']:.3f} s vs plain venv {warm['plain_venv_s']:.3f} s "
        f"= {warm['ratio']:.2f}x (target <= 1.2x); cold first run {warm['cold_first_run_s'] or 0:.1f} s"
    )
    write(path, figures)
    plot(figures, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def plot(figures: dict, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    warm = figures["warm_start"]
    labels = ["base cold build", "model rebuild", "cache hit (CLI)", "warm start: model pex", "warm start: plain venv"]
    values = [
        figures["base"]["cold_build_s"] or 0,  # N.B. None: a quick run, which takes the built base
        figures["model_rebuild_s"],
        figures["cache_hit_cli_s"],
        warm["model_pex_s"],
        warm["plain_venv_s"],
    ]
    left.barh(labels, values, color=["#888", "#4c72b0", "#4c72b0", "#dd8452", "#55a868"])
    left.set_xscale("log")
    left.set_xlabel("seconds (log)")
    left.set_title(f"build and start times (warm-start ratio {warm['ratio']:.2f}x)")
    names = list(figures["sizes"])
    own = [figures["sizes"][n]["own"] / 1e3 for n in names]
    boot = [figures["sizes"][n]["bootstrap"] / 1e3 for n in names]
    right.bar(names, boot, label="pex bootstrap (same in every pex)", color="#bbb")
    right.bar(names, own, bottom=boot, label="model's own bytes", color="#4c72b0")
    right.set_ylabel("KB")
    right.set_title("model pex size")
    right.legend()
    save(fig, path)


if __name__ == "__main__":
    main()
