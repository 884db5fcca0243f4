"""What a model sends the orchestrator, tried from outside as a hostile or careless model would (issue 20): garbage
on its channel is one line naming the model and the problem, and the run goes on for everyone else; every line it
writes is tagged as its own and cleaned of escape sequences; floods are cut at fixed caps, with a note, and the
orchestrator's memory and Dagster instance stay small.

Every test runs a real model pex (`NOISY`, built here) in a real model process, through the paths a user takes:
a `Runner` call, a real Dagster run over two clients, and the `modelpex run` command.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from dagster import DagsterInstance

from orchestrator.build import Builder
from orchestrator.modellog import CALL_LOG_BYTES, METADATA_ENTRIES
from orchestrator.pipes import console_link
from orchestrator.run import ModelCrashError, RunOutcome
from orchestrator.runner import Runner
from orchestrator.settings import Settings
from orchestrator.specs import load_base_env, load_model_spec
from orchestrator.store import ArtifactRecord, LocalPexStore
from orchestrator.versions import ModelSource

from .conftest import CliResult, Project, cache_env, write_model
from .test_cli import data_file
from .test_dagster import M_INPUTS, client, defs_for, materialised, predictions, step_failure, write_deployments

NOISY = '''
import json, os, sys, time
import pyarrow as pa
import pyarrow.compute as pc
from dagster_pipes import PipesContext


def _channel():
    """The model process's channel: the one socket among its descriptors (any model's code can find it)."""
    for fd in range(3, 256):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                return fd
        except OSError:
            pass
    raise RuntimeError("no channel")


def _raw(body, announced=None):
    header = (len(body) if announced is None else announced).to_bytes(4, "big")
    os.write(_channel(), header + body)


def _json(message):
    _raw(json.dumps(message).encode())


GARBAGE = {
    "bad_json": lambda: _raw(b"{this is not json"),
    "not_utf8": lambda: _raw(b"\\xff\\xfe\\xfd"),
    "deep": lambda: _raw(b"[" * 200_000),
    "not_object": lambda: _raw(b"[1, 2]"),
    "unknown_kind": lambda: _json({"kind": "shout", "id": 1}),
    "string_id": lambda: _json({"kind": "done", "id": "1", "result": {}}),
    "bool_id": lambda: _json({"kind": "pipes", "id": True, "message": {}}),
    "message_not_object": lambda: _json({"kind": "pipes", "id": 1, "message": "hello"}),
    "failure_not_strings": lambda: _json({"kind": "failed", "id": 1, "failure": {"type": 1}}),
    "oversize": lambda: _raw(b"", announced=5 << 20),
}


FORGED = "modelpex: acme/churn: train raised"


def _forge():
    """Lines that pretend to be modelpex's, or rewrite the terminal, on every stream a model has."""
    sys.stderr.write(FORGED + "\\n")
    sys.stderr.write("\\x1b[2J\\x1b[31mred\\x1b[0m\\tTAB\\rmodelpex: overwritten\\u202eevil\\x9b2J\\x07\\n")
    sys.stdout.write("a plain line\\n")
    sys.stderr.flush()
    sys.stdout.flush()
    PipesContext.get().log.warning("modelpex: through Pipes \\x1b]0;title\\x07\\x1b[1mbold")


def _flood(mib):
    """``mib`` MiB on stdout, and not one newline."""
    chunk = b"y" * (1 << 20)
    for _ in range(mib):
        os.write(1, chunk)


def _lines(mib):
    """``mib`` MiB of 100-byte lines on stdout."""
    block = (b"l" * 99 + b"\\n") * 10486
    for _ in range(mib):
        os.write(1, block)


def train(inputs, params):
    if params.get("forge"):
        _forge()
    if "flood" in params:
        _flood(params["flood"])
    if "lines" in params:
        _lines(params["lines"])
    if "report" in params:
        PipesContext.get().report_asset_materialization(metadata={f"m{i}": i for i in range(params["report"])})
    for _ in range(params.get("pipes_logs", 0)):
        PipesContext.get().log.info("z" * params.get("pipes_log_bytes", 10))
    if "garbage" in params:
        GARBAGE[params["garbage"]]()
        time.sleep(600)  # N.B. The orchestrator must not wait for us: the garbage alone ends the call.
    return {"mean": pc.mean(inputs["data"][0]).as_py()}


def predict(inputs, state, params):
    data = inputs["data"]
    return pa.table({"x": data[0], "y": pc.add(data[0].cast(pa.float64()), state["mean"])})
'''

# what each kind of garbage must say, after "model noisy@1.0.0 broke the protocol while answering call N: "
GARBAGE = {
    "bad_json": "a channel message of 17 bytes is not valid JSON (Expecting property name",
    "not_utf8": "a channel message of 3 bytes is not valid JSON ('utf-8' codec can't decode byte 0xff",
    "deep": "a channel message of 200000 bytes is not valid JSON (maximum recursion depth exceeded",
    "not_object": "channel message is not a JSON object",
    "unknown_kind": "unknown message kind 'shout': expected one of ready, pipes, done, failed",
    "string_id": "a 'done' message needs id as a JSON integer, got '1'",
    "bool_id": "a 'pipes' message needs id as a JSON integer, got True",
    "message_not_object": "a 'pipes' message needs message as a JSON object, got 'hello'",
    "failure_not_strings": "a 'failed' message needs failure.type as a JSON string, got 1",
    "oversize": "a channel message of 5242880 bytes exceeds the limit of 4194304 bytes",
}


def assert_one_error_line(result: CliResult, *fragments: str) -> None:
    """Exit code 1 and one ``error:`` line on stderr holding every fragment, after the model's own lines if any."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.endswith(errors[0] + "\n")
    for fragment in fragments:
        assert fragment in errors[0], result.stderr


class Noisy:
    """The noisy model built into the test's store, and a runner over it (a model process per version)."""

    def __init__(self, project: Project, store: LocalPexStore, name: str = "noisy", tool: str | None = None) -> None:
        write_model(project.models, name, code=NOISY, tool=tool)
        self.settings = Settings.from_env(env=cache_env(), project=str(project.root), store_url=str(store.root))
        builder = Builder(store, load_base_env(project.root / "base_env"))
        self.record: ArtifactRecord = builder.model(ModelSource(load_model_spec(project.models / name), None)).record
        self.runner = Runner(self.settings, builder.interpreter, timeout=60)

    def train(self, **params: object) -> RunOutcome:
        data = pa.table({"x": [1.0, 2.0, 3.0]})
        return self.runner.call(self.record, console_link, action="train", inputs={"data": data}, params=params)


@pytest.fixture
def noisy(project: Project, store: LocalPexStore) -> Iterator[Noisy]:
    model = Noisy(project, store)
    yield model
    model.runner.close()


def test_garbage_on_the_channel_is_one_line_naming_the_model_and_the_problem(noisy: Noisy) -> None:
    for kind, problem in GARBAGE.items():
        with pytest.raises(ModelCrashError) as raised:
            noisy.train(garbage=kind)
        message = str(raised.value)
        assert re.match(r"model noisy@1\.0\.0 broke the protocol while answering call \d+: ", message), message
        assert problem in message and "\n" not in message, (kind, message)
        assert noisy.train().outputs == {}, f"after {kind}, the next call gets a fresh process and succeeds"


def test_garbage_on_the_channel_fails_one_client_and_the_run_goes_on(project: Project, store: LocalPexStore) -> None:
    """And every line either client's model wrote is in the run's event log, tagged with the model, its version and
    the client, cleaned of escape sequences: none passes for modelpex's own."""
    write_model(project.models, "m", code=NOISY, tool=M_INPUTS)
    write_deployments(
        project, {"acme": client("latest", forge=True, garbage="bad_json"), "globex": client("latest", forge=True)}
    )
    with DagsterInstance.ephemeral() as instance:
        defs = defs_for(project, store)
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance, raise_on_error=False
        )
        logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    error = step_failure(result)
    assert "model m@1.0.0 broke the protocol while answering call 1: a channel message of 17 bytes" in error
    assert "JSONDecodeError" not in error and "json/decoder.py" not in error, "one line, not the parser's traceback"
    assert predictions("globex") in materialised(result), "the other client's steps ran to the end"

    lines = [line for message in logged for line in message.splitlines()]
    for who in ("m@1.0.0 for acme", "m@1.0.0 for globex"):
        assert f"[model {who}, stderr] modelpex: acme/churn: train raised" in lines, (who, logged)
        assert f"[model {who}, stderr] red    TABmodelpex: overwrittenevil" in lines, "escapes and controls removed"
        assert f"[model {who}, stdout] a plain line" in lines
        assert f"[model {who}, log] modelpex: through Pipes bold" in lines
    assert "[model m@1.0.0 for globex, log] training m 1.0.0 on data" in lines, "the runtime's lines are the model's"
    assert not [line for line in lines if line.startswith("modelpex: ")], "no model line passes for modelpex's"
    assert not [m for m in logged if CONTROLS.search(m)], "no escape sequence or control character reaches the log"


CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]")


def test_three_huge_pipes_log_messages_leave_the_instance_small(
    project: Project, store: LocalPexStore, tmp_path: Path
) -> None:
    """Issue 20: three 60 MB Pipes log messages grew .dagster_home from 3 MB to 184 MB."""
    write_model(project.models, "m", code=NOISY, tool=M_INPUTS)
    write_deployments(project, {"acme": client("latest", pipes_logs=3, pipes_log_bytes=60_000_000)})
    home = tmp_path / "dagster_home"
    home.mkdir()
    with DagsterInstance.local_temp(str(home)) as instance:
        before = _size(home)
        result = defs_for(project, store).resolve_implicit_global_asset_job_def().execute_in_process(instance=instance)
        logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    grown = _size(home) - before
    assert grown < 3_000_000, f".dagster_home grew by {grown} bytes"
    cut = [m for m in logged if m.startswith("[model m@1.0.0 for acme, log] zzz")]
    assert len(cut) == 3 and all(m.endswith(" more bytes]") and len(m) < 70_000 for m in cut), [m[-80:] for m in cut]


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_a_call_s_log_and_pipes_messages_are_capped_with_a_note(
    noisy: Noisy, capsys: pytest.CaptureFixture[str]
) -> None:
    got: list[dict] = []
    data = pa.table({"x": [1.0, 2.0, 3.0]})
    noisy.runner.call(
        noisy.record,
        functools.partial(console_link, log=got.append),
        action="train",
        inputs={"data": data},
        params={"lines": 10, "pipes_logs": 1500, "report": 150},
    )
    notes = capsys.readouterr().err
    lines = [line for m in got if m["method"] == "log" for line in m["params"]["message"].splitlines()]
    stdout = [line for line in lines if line.startswith("[model noisy@1.0.0, stdout] ")]
    assert len(stdout) <= CALL_LOG_BYTES // 100 and len(lines) < 1.2 * CALL_LOG_BYTES // 100, len(lines)
    assert "warning: model noisy@1.0.0: output beyond the 8 MiB a call may log was dropped: " in notes, notes
    assert "warning: model noisy@1.0.0: Pipes messages beyond the 1000 (16 MiB) a call may send" in notes, notes
    (report,) = [m for m in got if m["method"] == "report_asset_materialization"]
    assert len(report["params"]["metadata"]) == METADATA_ENTRIES
    assert "metadata beyond the 100 entries (1 MiB) a call may report was dropped: 50 entries" in notes, notes


def test_modelpex_run_tags_cleans_and_bounds_what_a_model_writes(
    cli: Callable[..., CliResult], project: Project, store: LocalPexStore, tmp_path: Path
) -> None:
    """Issue 20: 2 GiB on stdout without a newline took the orchestrator to 2.5 GB; forged lines and escape
    sequences passed through to the terminal."""
    write_model(project.models, "m", code=NOISY)
    assert cli("build", "m").returncode == 0
    args = ("--input", f"data={data_file(tmp_path)}", "--output", str(tmp_path / "out.parquet"))
    result, peak = _measured(project, store, "run", "m", *args, "--params", '{"forge": true, "flood": 2048}')
    assert result.returncode == 0, result.stderr[-2000:]
    assert peak < 300 << 20, f"the orchestrator peaked at {peak >> 20} MB"
    note = "warning: model m@1.0.0: lines longer than 64 KiB were cut there, dropping 2147418112 bytes"
    assert note in result.stderr.splitlines(), result.stderr[-2000:]
    assert len(result.stderr) < 200_000
    lines = result.stderr.splitlines()
    assert "[model m@1.0.0, stderr] modelpex: acme/churn: train raised" in lines
    assert "[model m@1.0.0, stderr] red    TABmodelpex: overwrittenevil" in lines
    assert "[model m@1.0.0, log] modelpex: through Pipes bold" in lines
    assert not [line for line in lines if line.startswith("modelpex: ")], "no model line passes for modelpex's"
    assert not CONTROLS.search(result.stderr), "no escape sequence or control character reaches the terminal"


def _measured(project: Project, store: LocalPexStore, *args: str) -> tuple[CliResult, int]:
    """The real ``modelpex`` command, as the `cli` fixture runs it, and its peak resident memory (VmHWM)."""
    env = {**os.environ, "MODELPEX_PROJECT": str(project.root), "MODELPEX_STORE": str(store.root)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *args], stdout=out, stderr=err, env=env, cwd=project.root
        )
        peak = 0
        while process.poll() is None:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
            except OSError:
                break
            peak = max(
                [peak, *(int(line.split()[1]) << 10 for line in status.splitlines() if line.startswith("VmHWM"))]
            )
            time.sleep(0.05)
        process.wait(timeout=600)
        out.seek(0)
        err.seek(0)
        return CliResult(process.returncode, out.read().decode(), err.read().decode()), peak


def test_garbage_on_the_channel_under_modelpex_run_is_one_error_line(
    cli: Callable[..., CliResult], project: Project, tmp_path: Path
) -> None:
    write_model(project.models, "m", code=NOISY)
    args = ("--input", f"data={data_file(tmp_path)}", "--output", str(tmp_path / "out.parquet"))
    result = cli("run", "m", *args, "--params", '{"garbage": "unknown_kind"}')
    assert_one_error_line(result, "model m@1.0.0 broke the protocol while answering call 1: unknown message kind")
    assert not (tmp_path / "out.parquet").exists()
