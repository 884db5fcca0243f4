"""Containment: every process a model starts ends, in every mode (a setsid daemon, a fast fork chain; after a call,
and after `kill -9` of the orchestrator once the next command or `modelpex gc` runs), and no model can starve
another (memory, processes, CPU time, disk), each limit hit being one line that names the model, the limit, its
value and where to raise it.

Every hog is bounded (at most 2 GB and 200 processes), so a failing test cannot take the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.build import Builder
from orchestrator.pipes import console_link
from orchestrator.runner import Runner
from orchestrator.sandbox import can_switch_users
from orchestrator.settings import Settings
from orchestrator.specs import load_base_env, load_model_spec
from orchestrator.store import LocalPexStore
from orchestrator.versions import ModelSource

from .conftest import Project, write_model
from .servers import spawn

STRAYS = '''
import ctypes, os, time
import pyarrow as pa

_libc = ctypes.CDLL(None)


def _name(name):
    _libc.prctl(15, name.encode(), 0, 0, 0)  # N.B. PR_SET_NAME: /proc/<pid>/comm, how the test finds them.


def _daemon(marker):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            _name(marker + "d")
            time.sleep(600)
        os._exit(0)


def _chain(marker, generations=200):
    """A fork chain: each generation forks the next and exits, so no snapshot of the processes holds all of it."""
    if os.fork() == 0:
        os.setsid()
        _name(marker + "c")
        for _ in range(generations):
            time.sleep(0.05)
            if os.fork() != 0:
                os._exit(0)
        os._exit(0)


def train(inputs, params):
    if params.get("strays"):
        _daemon(params["strays"])
        _chain(params["strays"])
        time.sleep(0.3)
    if params.get("hang"):
        time.sleep(600)
    return {"mean": sum(inputs["data"]["x"].to_pylist()) / max(inputs["data"].num_rows, 1)}


def predict(inputs, state, params):
    x = inputs["data"]["x"]
    return pa.table({"x": x, "y": [v + state["mean"] for v in x.to_pylist()]})
'''

needs_user_switch = pytest.mark.skipif(not can_switch_users(), reason="needs root or CAP_SETUID (CI runs as root)")
MODES = ["bwrap", "none"]


def _tool(name: str, extra: str = "") -> str:
    calls = f'train = "{name}.model:train"\npredict = "{name}.model:predict"'
    return f'[tool.modelpex]\n{calls}\nframes = "pyarrow"\n{extra}'


def strays(marker: str) -> list[int]:
    """Live (not zombie) processes whose name starts with ``marker``, anywhere on the machine."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if comm.startswith(marker) and state not in ("Z", "X"):
                found.append(int(entry))
    return found


def _wait_for(predicate: Callable[[], object], seconds: float, what: str) -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Bench:
    """A project with the strays model (and any other), built, and a runner over them in one sandbox mode."""

    def __init__(
        self, project: Project, store: LocalPexStore, tmp_path: Path, cache: dict[str, str], sandbox: str
    ) -> None:
        self.project, self.store = project, store
        write_model(project.models, "strays", code=STRAYS, tool=_tool("strays"))
        self.env = {
            **cache,
            "MODELPEX_SANDBOX": sandbox,
            "MODELPEX_SIGNING_KEY_FILE": str(tmp_path / "keys" / "signing.key"),
        }
        self.settings = Settings.from_env(env=self.env, project=str(project.root), store_url=str(store.root))
        self.builder = Builder(store, load_base_env(project.root / "base_env"))
        self.records: dict[str, object] = {}
        self.runner = Runner(self.settings, self.builder.interpreter, timeout=120)
        self.data = pa.table({"x": [1.0, 2.0, 3.0]})

    def add(self, name: str, code: str, extra: str = "") -> None:
        write_model(self.project.models, name, code=code, tool=_tool(name, extra))

    def record(self, name: str) -> object:
        if name not in self.records:
            source = ModelSource(load_model_spec(self.project.models / name), None)
            self.records[name] = self.builder.model(source).record
        return self.records[name]

    def call(self, model: str, **kwargs: object):
        kwargs.setdefault("inputs", {"data": self.data})
        kwargs.setdefault("params", {})
        kwargs.setdefault("action", "train")
        return self.runner.call(self.record(model), console_link, **kwargs)

    def cli_env(self) -> dict[str, str]:
        pq_path = self.project.root / "data.parquet"
        pq.write_table(self.data, pq_path)
        return {
            **os.environ,
            **self.env,
            "MODELPEX_PROJECT": str(self.project.root),
            "MODELPEX_STORE": str(self.store.root),
            "DATA": str(pq_path),
        }


@pytest.fixture(params=MODES)
def bench(
    request: pytest.FixtureRequest, project: Project, store: LocalPexStore, tmp_path: Path, fresh_cache: dict[str, str]
) -> Iterator[Bench]:
    bench = Bench(project, store, tmp_path, fresh_cache, request.param)
    if request.param == "bwrap" and not bench.runner.sandbox.bwrap:
        pytest.skip("bubblewrap cannot run here")
    yield bench
    bench.runner.close()


def _marker() -> str:
    return "mpx" + os.urandom(4).hex()


@needs_user_switch
def test_a_setsid_daemon_and_a_fork_chain_are_gone_after_the_call(bench: Bench) -> None:
    marker = _marker()
    try:
        bench.call("strays", params={"strays": marker})
        assert strays(marker) == [], "a child the model started outlived its call"
        assert bench.call("strays").state is None
    finally:
        bench.runner.close()
        leftover = strays(marker)
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
    assert leftover == [], "and after the model process closed"


def _run(env: dict[str, str], params: dict, output: Path) -> subprocess.Popen:
    return spawn(
        [sys.executable, "-m", "orchestrator.cli", "run", "strays", "--input", f"data={env['DATA']}",
         "--output", str(output), "--params", json.dumps(params)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@needs_user_switch
@pytest.mark.parametrize("next_command", ["gc", "run"])
def test_strays_of_a_killed_orchestrator_end_at_the_next_command(
    bench: Bench, tmp_path: Path, next_command: str
) -> None:
    """kill -9 of `modelpex run` while its model hangs: the lifeline kills the model's group, and the daemon and the
    chain, which left it with setsid, are ended by the next command that starts a model, or by `modelpex gc`."""
    env = bench.cli_env()
    marker = _marker()
    cli = _run(env, {"strays": marker, "hang": True}, tmp_path / "out.parquet")
    try:
        _wait_for(lambda: len(strays(marker)) >= 2, 240, "the model's daemon and chain")
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=30)
        if next_command == "gc":
            done = subprocess.run(
                [sys.executable, "-m", "orchestrator.cli", "gc"], env=env, capture_output=True, text=True, timeout=300
            )
        else:
            done = subprocess.run(
                [sys.executable, "-m", "orchestrator.cli", "run", "strays", "--input", f"data={env['DATA']}",
                 "--output", str(tmp_path / "next.parquet")],
                env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert strays(marker) == [], f"{next_command} left them running"
    finally:
        cli.kill()
        for pid in strays(marker):
            os.kill(pid, signal.SIGKILL)


@needs_user_switch
def test_a_model_of_another_cache_is_never_taken_for_a_dead_runs(tmp_path: Path) -> None:
    """Uids are the host's: an orchestrator with another MODELPEX_CACHE (another project, each test's own cache)
    neither ends a live model's processes as strays of a dead run nor leases its uid while it runs."""
    from orchestrator.sandbox import Sandbox

    first = Sandbox.create(tmp_path / "first-cache", isolation="user", sandbox="none")
    second = Sandbox.create(tmp_path / "second-cache", isolation="user", sandbox="none")
    if not first.uids:
        pytest.skip("the model user has no uid range of its own here")
    with first.identity() as identity:
        live = subprocess.Popen(["sleep", "300"], user=identity.uid, group=identity.gid, extra_groups=[])
        try:
            assert identity.uid not in second.end_orphans()
            assert live.poll() is None, "another cache's orchestrator killed a live model's process"
            leased = second._lock_uid(identity.uid)
            assert leased is None, f"uid {identity.uid} was leased twice at once"
        finally:
            live.kill()
            live.wait()
    control = second._lock_uid(identity.uid)  # N.B. The control: once released, the uid is free to lease.
    assert control is not None
    for fd in control:
        os.close(fd)


# --- limits ---------------------------------------------------------------------------------------------------

HOG = """
import os, time
import pyarrow as pa


def train(inputs, params):
    hog = params.get("hog")
    if hog == "memory":
        blob = bytearray(1536 * 2**20)  # N.B. 1.5 GiB, over a 256 MiB limit
        blob[::4096] = b"x" * len(blob[::4096])
    elif hog == "processes":
        children = []
        for _ in range(200):
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children.append(pid)
    elif hog == "cpu":
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pass
    elif hog == "fill":  # N.B. Memory up to the last page the limit allows, kept: nothing is left to answer with
        global HELD
        HELD = []
        for size in (2**20, 4096, 64):
            try:
                while True:
                    HELD.append(bytearray(size))
            except MemoryError:
                pass
    elif hog == "disk":
        chunk = b"x" * 2**20
        with open("hog.bin", "wb") as out:
            for _ in range(400):  # N.B. 400 MiB at most
                out.write(chunk)
                out.flush()
    return {"mean": 1.0}


def predict(inputs, state, params):
    return pa.table({"x": inputs["data"]["x"]})
"""
LIMITS = """
[tool.modelpex.limits]
memory = "256MiB"
processes = 32
cpu = "2s"
file_size = "128MiB"
folder = "64MiB"
output = "64MiB"
"""


@needs_user_switch
@pytest.mark.parametrize("hog", ["memory", "processes", "cpu", "disk"])
def test_a_hog_fails_in_one_line_while_a_model_beside_it_runs_unchanged(bench: Bench, hog: str) -> None:
    """The hog's call fails with one line naming the model, the limit, its value and where to raise it; a second
    model's call, run at the same time in another runner, answers exactly what it answers alone."""
    import threading

    from orchestrator.run import ModelLimitError

    bench.add("hog", HOG, LIMITS)
    bench.record("hog")
    alone = bench.call("strays", action="train_predict", keep_state=False).outputs["predictions"]
    beside: dict[str, object] = {}
    neighbour = Runner(bench.settings, bench.builder.interpreter, timeout=120)

    def run_beside() -> None:
        time.sleep(0.5)
        link = console_link
        beside["out"] = neighbour.call(
            bench.record("strays"), link, action="train_predict", inputs={"data": bench.data}, params={}
        ).outputs["predictions"]

    thread = threading.Thread(target=run_beside)
    thread.start()
    try:
        with pytest.raises(ModelLimitError) as caught:
            bench.call("hog", params={"hog": hog})
    finally:
        thread.join(timeout=300)
        neighbour.close()
    message = str(caught.value)
    assert "\n" not in message
    expected = {
        "memory": "memory limit of 256 MiB (RLIMIT_DATA)",
        "processes": "processes limit of 32 (RLIMIT_NPROC of its own uid)",
        "cpu": "cpu limit of 2 s (RLIMIT_CPU",
        # N.B. A private folder of its own (bubblewrap's, or the fork server child's tmpfs) fills first.
        "disk": "folder limit of 64 MiB (a sized tmpfs)",
    }[hog]
    assert message.startswith(f"model hog@1.0.0 hit its {expected}"), message
    assert message.endswith("raise " + message.split(": raise ", 1)[1]) and "[tool.modelpex.limits] of hog's" in message
    assert beside["out"].equals(alone), "the model beside the hog answered differently"


@needs_user_switch
def test_a_clients_limit_wins_and_is_named(bench: Bench) -> None:
    from orchestrator.limits import ClientLimits, parse_limits
    from orchestrator.run import ModelLimitError

    bench.add("hog", HOG, LIMITS)
    where = "deployments.yaml clients.acme.models.hog.limits"
    client = ClientLimits(parse_limits({"memory": "2GiB", "cpu": 30}, where), where)
    outcome = bench.call("hog", params={"hog": "memory"}, client_limits=client)
    assert outcome.state is None, "1.5 GiB fits under the client's 2 GiB"
    client = ClientLimits(parse_limits({"memory": "128 MiB"}, where), where)
    with pytest.raises(
        ModelLimitError,
        match=r"hit its memory limit of 128 MiB .*raise memory in deployments.yaml "
        r"clients.acme.models.hog.limits \(this client\) or \[tool.modelpex.limits\] of hog's",
    ):
        bench.call("hog", params={"hog": "memory"}, client_limits=client)


@needs_user_switch
def test_a_model_that_keeps_all_its_memory_is_named(bench: Bench) -> None:
    """A model that fills its memory limit and keeps it leaves its process nothing to answer with: the process ends on
    an allocation that fails after the model returned (MemoryError, or an OSError ENOMEM from a system call), and the
    call fails in the memory limit's one line, not as a crash with the runtime's last words in stderr."""
    from orchestrator.run import ModelLimitError

    bench.add("hog", HOG, LIMITS)
    with pytest.raises(ModelLimitError, match=r"^model hog@1.0.0 hit its memory limit of 256 MiB "):
        bench.call("hog", params={"hog": "fill"})


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ({"memory": "4 gigs"}, r"limits\].memory = '4 gigs' must be a size such as \"4GiB\""),
        ({"memroy": "4GiB"}, r"unknown limits \['memroy'\]; known are memory, processes"),
        ({"processes": 2}, r"processes = 2 must be a whole number of processes, at least 8"),
        ({"cpu": "forever"}, r"cpu = 'forever' must be CPU seconds"),
        ("4GiB", r"must be a table of limits"),
    ],
)
def test_limits_are_validated_in_one_line(table: object, error: str) -> None:
    from orchestrator.errors import SpecError
    from orchestrator.limits import parse_limits

    with pytest.raises(SpecError, match=error):
        parse_limits(table, "[tool.modelpex.limits]")
    from orchestrator.limits import parse_size

    assert parse_size("4GiB", "m") == 4 * 2**30 and parse_size("512 MB", "m") == 512 * 10**6


def test_a_bad_limit_in_pyproject_or_deployments_is_one_line(project: Project) -> None:
    from orchestrator.errors import SpecError

    folder = write_model(project.models, "hog", code=HOG, tool=_tool("hog", '\n[tool.modelpex.limits]\nmemory = "x"\n'))
    with pytest.raises(SpecError, match=r"pyproject.toml: \[tool.modelpex.limits\].memory = 'x' must be a size"):
        load_model_spec(folder)
