"""Attack suite: a hostile model package, written here, tries to reach what it must not; every attempt fails and
nothing changes. Then the containment paths (kill -9 and SIGTERM of the orchestrator, children left behind, a
sweeper in another PID namespace) and warm reuse (state isolated between calls, a crash replaced cleanly).

The suite runs as root in CI, so models run as their own uid in a bubblewrap sandbox there; a machine where that is
not possible skips what needs it, and `test_guarantees_say_what_does_not_hold` checks the log says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.build import Builder
from orchestrator.errors import IntegrityError, SandboxError
from orchestrator.pipes import console_link
from orchestrator.run import FittedState, ModelCrashError, ModelRaisedError
from orchestrator.runner import Runner
from orchestrator.sandbox import can_switch_users, guarantees
from orchestrator.settings import Settings
from orchestrator.specs import load_base_env, load_model_spec
from orchestrator.states import StateRecord, state_id
from orchestrator.store import LocalPexStore
from orchestrator.versions import ModelSource

from .conftest import Project, cache_env, shm_held, store_snapshot, write_model
from .servers import spawn
from .system import requires

SECRET = "modelpex-test-secret-hunter2"

HOSTILE = '''
import glob, json, os, signal, socket, subprocess, sys, time
import pyarrow as pa
import pyarrow.parquet as pq

TOKEN = os.urandom(8).hex()  # N.B. One per process: tells a warm process from a new one.
KEPT = []


def _try(action):
    try:
        result = action()
    except Exception as exc:
        return f"denied: {type(exc).__name__}: {exc}"[:300]
    return f"ALLOWED: {result!r}"[:300]


def _append(path):
    with open(path, "a") as handle:
        handle.write("planted by a hostile model\\n")
    return path


def _foreign_segments():
    """Open every shared-memory descriptor of every other process we can see."""
    opened = []
    for link in glob.glob("/proc/[0-9]*/fd/*"):
        if link.startswith(f"/proc/{os.getpid()}/") or link.startswith("/proc/self/"):
            continue
        try:
            target = os.readlink(link)
        except OSError:
            continue
        if target.startswith(("/dev/shm/", "/memfd:")):
            try:
                os.close(os.open(link, os.O_RDONLY))
                opened.append(target)
            except OSError:
                pass
    if opened:
        return opened
    raise PermissionError("no other process's segment could be opened")


def _is_socket(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    except OSError:
        return False


def _parent_of(pid):
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def _signal_others():
    # N.B. Its own fork server (same uid: README says a child can signal it) and the sandbox's init are its own.
    server = os.getppid()
    mine = {os.getpid(), server, 1 if _parent_of(server) == 1 else -1}
    reached = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in mine:
            try:
                os.kill(int(entry), 0)
                reached.append(int(entry))
            except OSError:
                pass
    if reached:
        return reached
    raise PermissionError("no other process could be signalled")


ATTACKS = {
    "env_secret": lambda p: os.environ[p["secret_name"]],
    "parent_environ": lambda p: open(f"/proc/{p['orchestrator_pid']}/environ", "rb").read()[:40],
    "parent_mem": lambda p: open(f"/proc/{p['orchestrator_pid']}/mem", "rb").close(),
    "parent_fds": lambda p: os.listdir(f"/proc/{p['orchestrator_pid']}/fd"),
    "signal_orchestrator": lambda p: os.kill(p["orchestrator_pid"], signal.SIGTERM),
    "signal_others": lambda p: _signal_others(),
    "foreign_segments": lambda p: _foreign_segments(),
    "store_index": lambda p: _append(p["index_record"]),
    "store_plant": lambda p: _append(os.path.join(p["store"], "planted")),
    "store_artifact": lambda p: _append(p["artifact"]),
    "store_state": lambda p: open(p["state"], "rb").read(),
    "signing_key": lambda p: open(p["signing_key"], "rb").read(),
    "project_plant": lambda p: _append(os.path.join(p["project"], "model_packages", "planted.py")),
    "own_venv": lambda p: _append(os.path.realpath(pa.__file__)),
    "other_venv": lambda p: _append(p["other_venv_file"]),
    "pex_root_plant": lambda p: _append(os.path.join(p["pex_root"], "planted")),
    "workdir_parent": lambda p: _append(os.path.join(os.getcwd(), "..", "planted")),
    "network": lambda p: socket.create_connection(("127.0.0.1", p["port"]), timeout=3).close(),
}


def train(inputs, params):
    if params.get("attacks"):
        return {"results": {name: _try(lambda: ATTACKS[name](params)) for name in params["attacks"]}}
    if params.get("escape"):
        for path in ("/tmp/modelpex-planted", "/var/tmp/modelpex-planted", "/dev/shm/modelpex-planted"):
            try:
                _append(path)
            except OSError:
                pass
    if params.get("children"):
        subprocess.Popen(["sleep", "600"])  # N.B. Inherits our stdout and stderr: a pipe the call must not wait on.
        subprocess.Popen(["sleep", "601"], start_new_session=True)
    if params.get("hang"):
        subprocess.Popen(["sleep", "602"])
        time.sleep(600)
    if params.get("crash"):
        os._exit(3)
    if params.get("forge"):
        channel = next(fd for fd in range(3, 64) if _is_socket(fd))
        if params["forge"] == "huge":
            os.write(channel, b"\\xff\\xff\\xff\\xff")  # N.B. A 4 GB message announced.
        else:
            answer = {"kind": "done", "id": 1, "result": {"outputs": {"predictions": {"protocol": 2, "slot": 0,
                      "size": 10, "num_rows": 1, "columns": []}}, "state": None, "rows_in": {}, "seconds": {}}}
            body = json.dumps(answer).encode()
            os.write(channel, len(body).to_bytes(4, "big") + body)  # N.B. Claims the input segment as its output.
        time.sleep(600)
    if params.get("keep"):
        KEPT.append(inputs["data"])
    return {"token": TOKEN, "mean": sum(inputs["data"]["x"].to_pylist()) / max(inputs["data"].num_rows, 1)}


def predict(inputs, state, params):
    state.setdefault("calls", 0)
    state["calls"] += 1  # N.B. A state object is fresh in every call: this is always 1.
    x = inputs["data"]["x"]
    return pa.table({"x": x, "token": [TOKEN] * len(x), "calls": [state["calls"]] * len(x)})
'''


def _tool(name: str, extra: str = "") -> str:
    return (
        f'[tool.modelpex]\ntrain = "{name}.model:train"\npredict = "{name}.model:predict"\nframes = "pyarrow"\n{extra}'
    )


@pytest.fixture(scope="module")
def env_secret() -> Iterator[str]:
    os.environ["MODELPEX_TEST_SECRET"] = SECRET
    yield "MODELPEX_TEST_SECRET"
    del os.environ["MODELPEX_TEST_SECRET"]


class Lab:
    """A project with a hostile model and a bystander, built, and a runner over them."""

    def __init__(self, project: Project, store: LocalPexStore, tmp_path: Path, cache: dict[str, str]) -> None:
        self.project, self.store = project, store
        self.saved: StateRecord | None = None  # the last state `train` kept in the store
        write_model(project.models, "hostile", code=HOSTILE, tool=_tool("hostile"))
        write_model(project.models, "bystander", tool=_tool("bystander"))
        write_model(project.models, "fresh", code=HOSTILE, tool=_tool("fresh", "reuse = false\n"))
        env = {**cache, "MODELPEX_SIGNING_KEY_FILE": str(tmp_path / "keys" / "signing.key")}
        self.settings = Settings.from_env(env=env, project=str(project.root), store_url=str(store.root))
        builder = Builder(store, load_base_env(project.root / "base_env"))
        self.records = {
            name: builder.model(ModelSource(load_model_spec(project.models / name), None)).record
            for name in ("hostile", "bystander", "fresh")
        }
        self.runner = Runner(self.settings, builder.interpreter, timeout=120)
        self.data = pa.table({"x": [1.0, 2.0, 3.0]})

    def call(self, model: str, **kwargs: object):
        kwargs.setdefault("inputs", {"data": self.data})
        kwargs.setdefault("params", {})
        return self.runner.call(self.records[model], console_link, **kwargs)

    def train(self, model: str, params: dict) -> dict:
        """Train, keep the state in the store as a run would, and return it."""
        outcome = self.call(model, action="train", params=params, keep_state=True)
        self.saved = self.runner.states.save(self.records[model], "", "test-run", outcome.state)
        return json.loads(outcome.state.payload)


@pytest.fixture
def lab(project: Project, store: LocalPexStore, tmp_path: Path, fresh_cache: dict[str, str]) -> Iterator[Lab]:
    """A cache of the test's own (`fresh_cache`): what it finds in ``runs/`` is its own, and `modelpex gc` there
    sweeps nothing of anyone else's."""
    lab = Lab(project, store, tmp_path, fresh_cache)
    yield lab
    lab.runner.close()


needs_user_switch = pytest.mark.skipif(not can_switch_users(), reason="needs root or CAP_SETUID (CI runs as root)")


def _listener() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    return server, server.getsockname()[1]


@needs_user_switch
def test_every_attack_fails_and_nothing_changes(lab: Lab, env_secret: str) -> None:
    bystander = lab.train("bystander", {})  # N.B. A live neighbour: its process, its state in the store.
    assert "mean" in bystander
    (state_file,) = lab.store.root.glob("states/bystander/*.state")
    other_venv = lab.runner.prepare(lab.records["bystander"]).python.parent.parent
    server, port = _listener()
    attacks = [
        "env_secret", "parent_environ", "parent_mem", "parent_fds", "signal_orchestrator", "signal_others",
        "foreign_segments", "store_index", "store_plant", "store_artifact", "store_state", "signing_key",
        "project_plant", "own_venv", "other_venv", "pex_root_plant", "workdir_parent", "network",
    ]  # fmt: skip
    params = {
        "attacks": attacks,
        "secret_name": env_secret,
        "orchestrator_pid": os.getpid(),
        "index_record": str(next(lab.store.root.glob("index/hostile/*.json"))),
        "store": str(lab.store.root),
        "artifact": str(lab.store.local_path(lab.records["bystander"])),
        "state": str(state_file),
        "signing_key": str(lab.settings.signing_key_path),
        "project": str(lab.project.root),
        "other_venv_file": str(next(other_venv.glob("lib/python*/site-packages/bystander/model.py")).resolve()),
        "pex_root": str(lab.settings.model_pex_root),
        "port": port,
    }
    project_files = {p: p.read_bytes() for p in lab.project.root.rglob("*") if p.is_file() and ".git" not in p.parts}
    before = store_snapshot(lab.store)
    venv = lab.runner.prepare(lab.records["hostile"]).python.parent.parent
    (pyarrow_init,) = [p.resolve() for p in venv.glob("lib/python*/site-packages/pyarrow/__init__.py")]
    pyarrow_before = pyarrow_init.read_bytes()
    try:
        results = lab.train("hostile", params)["results"]
    finally:
        server.close()
    allowed = {name: outcome for name, outcome in results.items() if not outcome.startswith("denied")}
    if not lab.runner.sandbox.bwrap:
        allowed.pop("network", None)  # N.B. Only a network namespace stops it; guarantees() says so.
    assert not allowed, allowed
    assert set(results) == set(attacks)
    after = store_snapshot(lab.store)
    assert lab.saved is not None
    saved = {f"states/hostile/{lab.saved.state_id}{suffix}" for suffix in (".state", ".json")}
    assert saved <= after.keys() and after.keys() - before.keys() <= {"states/hostile", *saved}
    assert {name: after.get(name) for name in before} == before, "the store holds the trained state, nothing else"
    assert {p: p.read_bytes() for p in project_files} == project_files
    assert not (lab.settings.model_pex_root / "planted").exists()
    assert pyarrow_init.read_bytes() == pyarrow_before


@needs_user_switch
@requires("bwrap")
def test_a_model_cannot_write_outside_its_private_folder(lab: Lab) -> None:
    if not lab.runner.sandbox.bwrap:
        pytest.skip("bubblewrap cannot start a sandbox here (user namespaces?): /tmp, /var/tmp and /dev/shm stay open")
    lab.train("hostile", {"escape": True})
    for path in ("/tmp/modelpex-planted", "/var/tmp/modelpex-planted", "/dev/shm/modelpex-planted"):
        assert not Path(path).exists(), f"{path} was written from inside the sandbox"


def test_guarantees_say_what_does_not_hold() -> None:
    held = dict(guarantees("none", bwrap=False, own_uids=False))
    assert not held["the model cannot write the store, PEX_ROOT, the verified artifacts or the project"]
    assert held["the model cannot open a shared-memory segment it was not handed (segments have no names)"]
    assert all(dict(guarantees("user", bwrap=True, own_uids=True)).values())


# --- fitted states -------------------------------------------------------------------------------------------


def test_a_state_swapped_together_with_its_record_is_refused(lab: Lab) -> None:
    lab.train("bystander", {})
    (record_file,) = lab.store.root.glob("states/bystander/*.json")
    record = json.loads(record_file.read_text())
    payload = b"cos\nsystem\n(S'touch /tmp/modelpex-pwned'\ntR."  # N.B. A pickle that runs a command.
    digest = hashlib.sha256(payload).hexdigest()
    record.update(sha256=digest, size=len(payload), format="pickle")
    forged = state_id("bystander", record["version"], "", digest)  # N.B. No secret: anyone can compute where it goes.
    (record_file.parent / f"{forged}.state").write_bytes(payload)
    (record_file.parent / f"{forged}.json").write_text(json.dumps(record))
    with pytest.raises(IntegrityError, match="signature does not match"):
        lab.runner.states.load(lab.records["bystander"], digest, client="")
    assert not Path("/tmp/modelpex-pwned").exists()


def test_a_pickled_state_without_the_opt_in_is_refused(lab: Lab) -> None:
    """Even signed (say, a record relabelled by someone holding the key): the model does not unpickle it."""
    payload = b"cos\nsystem\n(S'touch /tmp/modelpex-pwned'\ntR."
    with pytest.raises(
        ModelRaisedError, match='refusing a pickled state: the model does not opt in with state = "pickle"'
    ):
        lab.call("bystander", action="predict", state_in=FittedState("pickle", payload))
    assert not Path("/tmp/modelpex-pwned").exists()


def test_an_untrusted_state_type_names_both_fixes_and_pickle_is_opt_in(
    project: Project, store: LocalPexStore, tmp_path: Path
) -> None:
    code = "class Fitted:\n    pass\n\ndef train(inputs, params):\n    return Fitted()\n\ndef predict(i, s, p): ...\n"
    write_model(project.models, "odd", code=code, tool=_tool("odd"))
    write_model(project.models, "opted", code=code, tool=_tool("opted", 'state = "pickle"\n'))
    settings = Settings.from_env(
        env=cache_env(MODELPEX_SIGNING_KEY_FILE=str(tmp_path / "k")),
        project=str(project.root),
        store_url=str(store.root),
    )
    builder = Builder(store, load_base_env(project.root / "base_env"))
    with Runner(settings, builder.interpreter, timeout=120) as runner:
        odd, opted = (
            builder.model(ModelSource(load_model_spec(project.models / n), None)).record for n in ("odd", "opted")
        )
        with pytest.raises(
            ModelRaisedError, match=r"types that skops does not trust by default: \['odd.model.Fitted'\]"
        ):
            runner.call(odd, console_link, action="train", inputs={}, params={}, keep_state=True)
        outcome = runner.call(opted, console_link, action="train", inputs={}, params={}, keep_state=True)
        record = runner.states.save(opted, "acme", "run-1", outcome.state)
        assert (
            record.format == "pickle"
            and runner.states.load(opted, record.sha256, "acme").payload == outcome.state.payload
        )


# --- containment ---------------------------------------------------------------------------------------------


def _model_processes(marker: str, cache: Path | str) -> list[int]:
    """Processes whose command line names ``marker`` and that work in a private folder of ``cache`` (a model process
    and whatever it starts): this test's own, never those of another test or of anyone else on the machine."""
    runs = str(Path(cache) / "runs") + "/"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    if (os.readlink(f"/proc/{entry}/cwd") + "/").startswith(runs):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def test_children_die_after_every_call_and_are_never_waited_on(lab: Lab) -> None:
    started = time.monotonic()
    lab.train("hostile", {"children": True})
    assert time.monotonic() - started < 30, "the call did not wait on its children's pipes"
    time.sleep(0.5)
    cache = lab.settings.cache_dir
    assert not _model_processes("sleep\x00600", cache) and not _model_processes("sleep\x00601", cache)


def test_a_hanging_model_and_its_children_die_at_the_timeout(lab: Lab) -> None:
    lab.runner.timeout = 3
    from orchestrator.run import ModelTimeoutError

    with pytest.raises(ModelTimeoutError, match="ran longer than its timeout of 3 s"):
        lab.train("hostile", {"hang": True})
    time.sleep(0.5)
    assert not _model_processes("sleep\x00602", lab.settings.cache_dir)
    lab.runner.timeout = 120
    assert lab.train("hostile", {})["mean"] == 2.0, "the next call gets a fresh process"


@pytest.fixture
def cli_env(project: Project, store: LocalPexStore, tmp_path: Path, fresh_cache: dict[str, str]) -> dict[str, str]:
    """The CLI's environment, on a cache of the test's own: what it finds in ``runs/`` is its own."""
    write_model(project.models, "hostile", code=HOSTILE, tool=_tool("hostile"))
    pq_path = tmp_path / "data.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0]}), pq_path)
    return {
        **os.environ,
        "MODELPEX_PROJECT": str(project.root),
        "MODELPEX_STORE": str(store.root),
        "MODELPEX_SIGNING_KEY_FILE": str(tmp_path / "signing.key"),
        "DATA": str(pq_path),
        **fresh_cache,
    }


def _start_cli(env: dict[str, str], params: dict, output: Path) -> subprocess.Popen:
    return spawn(
        [sys.executable, "-m", "orchestrator.cli", "run", "hostile", "--input", f"data={env['DATA']}",
         "--output", str(output), "--params", json.dumps(params)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(predicate: Callable[[], object], seconds: float, what: str) -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _runs(settings_env: dict[str, str]) -> list[Path]:
    runs = Settings.from_env(env=settings_env).cache_dir / "runs"
    return sorted(p for p in runs.glob("run-*") if p.is_dir())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_model_dies_with_its_orchestrator(cli_env: dict[str, str], tmp_path: Path, sig: int) -> None:
    before_runs, before_shm = set(_runs(cli_env)), shm_held()
    cli = _start_cli(cli_env, {"hang": True}, tmp_path / "out.parquet")
    try:
        _wait_for(lambda: _model_processes("sleep\x00602", cli_env["MODELPEX_CACHE"]), 120, "the model to start")
        started = time.monotonic()
        os.kill(cli.pid, sig)
        cli.wait(timeout=30)
        _wait_for(
            lambda: not _model_processes("sleep\x00602", cli_env["MODELPEX_CACHE"]), 5, "the model's children to die"
        )
        assert time.monotonic() - started < 2.5, "the model died within about a second"
    finally:
        if cli.poll() is None:
            cli.kill()
    assert not _model_processes("modelpex_runtime", cli_env["MODELPEX_CACHE"]), (
        "no model process outlives its orchestrator"
    )
    left = set(_runs(cli_env)) - before_runs
    if sig == signal.SIGTERM:
        assert cli.returncode == 143 and "terminated" in cli.stderr.read()
        assert not left, "SIGTERM cleans up like Ctrl-C: the private folder is gone"
    else:
        assert len(left) == 1, "kill -9 leaves the private folder; gc removes it (below)"
        gc = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "gc"],
            env={**cli_env, "MODELPEX_GC_GRACE": "0.001"}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert gc.returncode == 0, gc.stderr
        assert not set(_runs(cli_env)) - before_runs
    assert shm_held() <= before_shm + (1 << 20)
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="unshare --pid needs root")
def test_gc_in_another_pid_namespace_leaves_a_live_run_alone(cli_env: dict[str, str], tmp_path: Path) -> None:
    """A sweeper that judged owners by pid would see this run's orchestrator as dead from there."""
    cli_env = {**cli_env, "MODELPEX_GC_GRACE": "0.001"}
    before = set(_runs(cli_env))
    cli = _start_cli(cli_env, {"hang": True}, tmp_path / "out.parquet")
    try:
        _wait_for(lambda: _model_processes("sleep\x00602", cli_env["MODELPEX_CACHE"]), 120, "the model to start")
        (live,) = set(_runs(cli_env)) - before
        gc = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "orchestrator.cli", "gc"],
            env=cli_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert gc.returncode == 0, gc.stderr
        assert live.is_dir() and _model_processes("sleep\x00602", cli_env["MODELPEX_CACHE"]), (
            "the live run and its model are untouched"
        )
        other = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "orchestrator.cli", "run", "hostile",
             "--input", f"data={cli_env['DATA']}", "--output", str(tmp_path / "other.parquet")],
            env=cli_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert other.returncode == 0, other.stderr
        assert live.is_dir() and _model_processes("sleep\x00602", cli_env["MODELPEX_CACHE"]), (
            "a first run in another namespace sweeps nothing live"
        )
    finally:
        cli.terminate()
        cli.wait(timeout=30)


# --- warm within a run ---------------------------------------------------------------------------------------


def test_one_process_serves_every_call_with_fresh_state(lab: Lab) -> None:
    trained = lab.call("hostile", action="train", keep_state=True)
    first = lab.call("hostile", action="predict", state_in=trained.state)
    second = lab.call("hostile", action="predict", state_in=trained.state, inputs={"data": pa.table({"x": [5.0]})})
    tokens = {json.loads(trained.state.payload)["token"], *first.outputs["predictions"]["token"].to_pylist()}
    tokens |= set(second.outputs["predictions"]["token"].to_pylist())
    assert len(tokens) == 1, "train and both predictions ran in one warm process"
    assert first.outputs["predictions"]["calls"].to_pylist() == [1, 1, 1]
    assert second.outputs["predictions"]["calls"].to_pylist() == [1], "the state object was fresh"
    assert trained.process_started and not first.process_started


def test_a_model_that_declares_itself_unsafe_to_reuse_gets_a_process_per_call(lab: Lab) -> None:
    tokens = {lab.train("fresh", {})["token"] for _ in range(2)}
    assert len(tokens) == 2


@pytest.mark.parametrize(("forge", "error"), [("huge", "exceeds the limit"), ("slot", "did not reserve for it")])
def test_a_model_that_breaks_the_protocol_is_ended(lab: Lab, forge: str, error: str) -> None:
    with pytest.raises(ModelCrashError, match=error):
        lab.call("hostile", action="train", params={"forge": forge}, keep_state=True)
    assert lab.train("hostile", {})["mean"] == 2.0, "the next call gets a fresh process"


def test_a_crash_mid_run_is_replaced_cleanly(lab: Lab) -> None:
    before = lab.train("hostile", {})["token"]
    with pytest.raises(ModelCrashError, match="exited with code 3"):
        lab.train("hostile", {"crash": True})
    after = lab.train("hostile", {})["token"]
    assert after != before, "the run went on with a fresh process"


def test_the_cli_runs_a_model_in_a_sandboxed_warm_process(cli_env: dict[str, str], tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", "hostile", "--input", f"data={cli_env['DATA']}",
         "--output", str(tmp_path / "out.parquet")],
        env=cli_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "info: training hostile 1.0.0" in done.stderr


def test_terminating_a_dagster_run_cleans_up_like_ctrl_c(
    cli_env: dict[str, str], project: Project, tmp_path: Path
) -> None:
    """The run worker gets SIGTERM (Dagster maps it to an interrupt): the model, its folder and segments go."""
    (project.root / "deployments.yaml").write_text(
        "clients:\n  acme:\n    datasets:\n      data: {generate: customers, rows: 50}\n"
        "    models:\n      hostile: {version: latest, params: {hang: true}, inputs: {data: data}}\n"
    )
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("")
    before_runs, before_shm = set(_runs(cli_env)), shm_held()
    run = spawn(
        [str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "-m", "orchestrator.definitions",
         "-a", "defs", "--select", "group:acme"],
        env={**cli_env, "DAGSTER_HOME": str(home)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(
            lambda: _model_processes("sleep\x00602", cli_env["MODELPEX_CACHE"]),
            180,
            "the model to start in the Dagster run",
        )
        assert set(_runs(cli_env)) - before_runs, "the model process has its private folder"
        os.kill(run.pid, signal.SIGTERM)
        output = run.communicate(timeout=60)[0]
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0
    assert "Execution was interrupted" in output or "DagsterExecutionInterruptedError" in output, output[-2000:]
    _wait_for(lambda: not _model_processes("sleep\x00602", cli_env["MODELPEX_CACHE"]), 5, "the model's children to die")
    assert not _model_processes("modelpex_runtime", cli_env["MODELPEX_CACHE"])
    assert not set(_runs(cli_env)) - before_runs, "the private folder was removed on the way out"
    assert shm_held() <= before_shm + (1 << 20)


def test_gc_removes_what_dead_runs_left_only_after_the_grace_period(lab: Lab, cli_env: dict[str, str]) -> None:
    from orchestrator.leases import lease_dir

    runs = lab.settings.cache_dir / "runs"
    work = lab.store.root / "work"
    work.mkdir(exist_ok=True)
    tag = os.urandom(4).hex()
    dead = [runs / f"run-0-dead-{tag}", work / f"build-0-dead-{tag}"]
    for folder in dead:
        folder.mkdir()
        (folder / "scratch").write_text("left by a run that was killed")
    old = time.time() - 7200
    for data in (pa.table({"x": [1.0]}), pa.table({"x": [2.0]})):
        state = lab.call("bystander", action="train", inputs={"data": data}, keep_state=True).state
        lab.runner.states.save(lab.records["bystander"], "acme", "run", state)
        time.sleep(1.1)  # N.B. Records are stamped to the second: the second one is the newer.
    assert len(list(lab.store.root.glob("states/bystander/*.state"))) == 2
    env = {**cli_env, "MODELPEX_SIGNING_KEY_FILE": str(lab.settings.signing_key_path)}
    gc = [sys.executable, "-m", "orchestrator.cli", "gc"]
    with lease_dir(runs, "run-") as live:
        os.utime(live, (old, old))
        kept = subprocess.run(gc, env=env, capture_output=True, text=True, timeout=120)
        assert kept.returncode == 0, kept.stderr
        assert all(folder.exists() for folder in dead), "younger than the grace period (an hour): kept"
        swept = subprocess.run(gc, env={**env, "MODELPEX_GC_GRACE": "0.001"}, capture_output=True, text=True)
        assert swept.returncode == 0, swept.stderr
        assert not any(folder.exists() for folder in dead) and live.is_dir(), "a held lease is never swept"
    assert len(list(lab.store.root.glob("states/bystander/*.state"))) == 1, "the newest state of a client stays"
    assert "fitted state bystander@1.0.0 for acme" in swept.stdout


def test_two_cold_runs_at_once_share_a_new_cache_under_tmp(cli_env: dict[str, str], tmp_path: Path) -> None:
    """An empty cache (PEX_ROOT too) under /tmp, which the sandbox replaces with a private /tmp: two runs at once
    unpack the base and the model once between them, both see it read-only, and both answer alike."""
    cache = Path(tempfile.mkdtemp(prefix="modelpex-cold-"))
    cache.chmod(0o755)
    env = {**cli_env, "MODELPEX_CACHE": str(cache)}
    del env["MODELPEX_PEX_ROOT"]  # N.B. Empty too: the default, in the cache.
    outputs = [tmp_path / "one.parquet", tmp_path / "two.parquet"]
    try:
        runs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "orchestrator.cli",
                    "run",
                    "hostile",
                    "--input",
                    f"data={env['DATA']}",
                    "--output",
                    str(output),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for output in outputs
        ]
        for run in runs:
            stdout, stderr = run.communicate(timeout=300)
            assert run.returncode == 0, stderr
        import pyarrow.parquet as pq

        one, two = (pq.read_table(output) for output in outputs)
        assert one["x"].equals(two["x"]) and one["token"] != two["token"], "two processes, one answer"
        assert len(list((cache / "pex_root" / "venvs").rglob("bin/python"))) == 2, "one base venv, one model venv"
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_a_model_carrying_a_startup_hook_is_never_unpacked(
    project: Project, store: LocalPexStore, tmp_path: Path
) -> None:
    """A .pth file would run as the orchestrator while it unpacks the venv: refused before anything runs."""
    folder = write_model(project.models, "hooked", tool=_tool("hooked"))
    marker = tmp_path / "ran"
    (folder / "src" / "hooked.pth").write_text(f"import os; open({str(marker)!r}, 'w').close()\n")
    settings = Settings.from_env(
        env=cache_env(MODELPEX_SIGNING_KEY_FILE=str(tmp_path / "k")),
        project=str(project.root),
        store_url=str(store.root),
    )
    builder = Builder(store, load_base_env(project.root / "base_env"))
    record = builder.model(ModelSource(load_model_spec(folder), None)).record
    with Runner(settings, builder.interpreter, timeout=120) as runner:
        with pytest.raises(SandboxError, match=r"start-up hooks that Python would execute .*hooked\.pth"):
            runner.call(record, console_link, action="train", inputs={}, params={}, keep_state=True)
    assert not marker.exists()


# --- clients share nothing: what one client's call leaves is out of every other client's reach --------------------

STASHER = """
import json, os
import pyarrow as pa
import pyarrow.parquet as pq

PLACES = {
    "workdir": "modelpex-stash.json",  # N.B. Relative: the private folder the call works in.
    "tmp": "/tmp/modelpex-stash.json",
    "var_tmp": "/var/tmp/modelpex-stash.json",
    "dev_shm": "/dev/shm/modelpex-stash.json",
}
KEPT = []  # N.B. A module global: lives as long as the process that imported the model.


def _read(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return []


def _stash(rows):
    KEPT.extend(rows)
    os.environ["MODELPEX_STASH"] = json.dumps(json.loads(os.environ.get("MODELPEX_STASH", "[]")) + rows)
    for path in PLACES.values():
        try:
            old = _read(path)
            with open(path, "w") as handle:
                json.dump(old + rows, handle)
        except OSError:
            pass


def _found():
    found = {"global": list(KEPT), "env": json.loads(os.environ.get("MODELPEX_STASH", "[]"))}
    found.update({name: _read(path) for name, path in PLACES.items()})
    return found


def train(inputs, params):
    _stash(inputs["data"]["who"].to_pylist())
    return {"n": inputs["data"].num_rows}


def predict(inputs, state, params):
    found = _found()  # N.B. Before this call's own rows: what earlier calls of this process left.
    _stash(inputs["data"]["who"].to_pylist())
    n = inputs["data"].num_rows
    with open("/proc/1/cmdline", "rb") as handle:
        init = handle.read().split(bytes(1))[0].decode()
    columns = {f"found_{name}": [json.dumps(sorted(set(rows)))] * n for name, rows in found.items()}
    return pa.table({"x": inputs["data"]["x"], "init": [init] * n, **columns})
"""
STASH_PLACES = ("global", "env", "workdir", "tmp", "var_tmp", "dev_shm")
STASH_FILES = ("/tmp/modelpex-stash.json", "/var/tmp/modelpex-stash.json", "/dev/shm/modelpex-stash.json")


def _client_rows(client: str, tag: str) -> pa.Table:
    return pa.table({"x": [1.0, 2.0, 3.0], "who": [f"{client}-row-{i}-{tag}" for i in range(3)]})


def _found(predictions: pa.Table) -> dict[str, set[str]]:
    """What the model found stashed, per place, when it predicted."""
    return {place: set(json.loads(predictions[f"found_{place}"][0].as_py())) for place in STASH_PLACES}


def _mode(sandbox: str) -> str:
    """The sandbox a test runs in, as the test's id says and its assertions require: bubblewrap must really be
    used when asked for (never a silent fallback), and never when not."""
    if sandbox == "bwrap" and not shutil.which("bwrap"):
        pytest.skip("no bwrap: apt-get install --no-install-recommends bubblewrap (.ci/setup does as root)")
    return sandbox


def _assert_sandbox(predictions: pa.Table, sandbox: str) -> None:
    init = predictions["init"][0].as_py()
    if sandbox == "bwrap":
        assert "bwrap" in init, f"asked for bubblewrap, but the model's PID 1 is {init!r}"
    else:
        assert "bwrap" not in init, f"MODELPEX_SANDBOX=none, but the model's PID 1 is {init!r}"


@pytest.fixture
def stash_files_clean() -> Iterator[None]:
    """The host's /tmp, /var/tmp and /dev/shm hold no stash before and after (a failed denial would leave one)."""
    for path in STASH_FILES:
        Path(path).unlink(missing_ok=True)
    yield
    left = [path for path in STASH_FILES if Path(path).exists()]
    for path in left:
        Path(path).unlink()
    assert not left, f"a model's stash reached the host: {left}"


@pytest.mark.parametrize("sandbox", ["bwrap", "none"])
def test_one_clients_rows_never_reach_another_clients_predictions_under_deploy(
    cli_env: dict[str, str], project: Project, tmp_path: Path, sandbox: str, stash_files_clean: None
) -> None:
    """`modelpex deploy` over two clients of one model version: a model that stashes each client's rows in a module
    global, its environment, its private folder, /tmp, /var/tmp and /dev/shm, and writes whatever it finds into its
    predictions. Control: one client's train -> predict finds its own rows in every place (the stash works, and the
    two calls share a warm process). Denial: neither client's stored predictions hold a row of the other's."""
    mode = _mode(sandbox)
    write_model(project.models, "stasher", code=STASHER, tool=_tool("stasher"))
    tag = os.urandom(4).hex()
    clients = ("acme", "globex")
    for client in clients:
        pq.write_table(_client_rows(client, tag), tmp_path / f"{client}.parquet")
    (project.root / "deployments.yaml").write_text(
        "clients:\n"
        + "".join(
            f"  {client}:\n    datasets:\n      data: {{path: {tmp_path / f'{client}.parquet'}}}\n"
            "    models:\n      stasher: {version: latest, inputs: {data: data}}\n"
            for client in clients
        )
    )
    env = {**cli_env, "MODELPEX_SANDBOX": mode, "DAGSTER_HOME": str(project.root / ".dagster_home")}
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "deploy"],
        env=env, cwd=project.root, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stored = {
        client: pq.read_table(next((project.root / ".dagster_home").rglob(f"*{client}_stasher_predictions*.parquet")))
        for client in clients
    }
    for client, predictions in stored.items():
        _assert_sandbox(predictions, mode)
        own = {f"{client}-row-{i}-{tag}" for i in range(3)}
        found = _found(predictions)
        assert all(own <= rows for rows in found.values()), f"control: {client}'s train -> predict found {found}"
        other = next(c for c in clients if c != client)
        leaked = {place: rows for place, rows in found.items() if any(r.startswith(f"{other}-row-") for r in rows)}
        assert not leaked, f"{other}'s rows reached {client}'s stored predictions through {sorted(leaked)}"
        assert f"{other}-row-" not in str(predictions.to_pylist()), f"{client}'s predictions hold {other}'s rows"


@pytest.mark.parametrize("sandbox", ["bwrap", "none"])
def test_one_clients_rows_never_reach_the_next_modelpex_run(
    cli_env: dict[str, str], tmp_path: Path, sandbox: str, stash_files_clean: None, project: Project
) -> None:
    """`modelpex run` for acme, then for globex: within one run train stashes and predict finds (the control); the
    next run, another client's, finds nothing of acme's in any place."""
    mode = _mode(sandbox)
    write_model(project.models, "stasher", code=STASHER, tool=_tool("stasher"))
    tag = os.urandom(4).hex()
    found = {}
    for client in ("acme", "globex"):
        data = tmp_path / f"{client}.parquet"
        pq.write_table(_client_rows(client, tag), data)
        output = tmp_path / f"{client}-predictions.parquet"
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "run", "stasher", "--input", f"data={data}",
             "--output", str(output)],
            env={**cli_env, "MODELPEX_SANDBOX": mode}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        predictions = pq.read_table(output)
        _assert_sandbox(predictions, mode)
        found[client] = _found(predictions)
    acme = {f"acme-row-{i}-{tag}" for i in range(3)}
    assert all(acme <= rows for rows in found["acme"].values()), f"control: acme's own run found {found['acme']}"
    leaked = {place: rows for place, rows in found["globex"].items() if rows & acme}
    assert not leaked, f"acme's rows reached globex's run through {sorted(leaked)}"
