"""What a model sends the orchestrator, tried from outside as a hostile or careless model would (issue 20): garbage
on its channel is one line naming the model and the problem, and the run goes on for everyone else.

Every test runs a real model pex (`NOISY`, built here) in a real model process, through the paths a user takes:
a `Runner` call, a real Dagster run over two clients, and the `modelpex run` command.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from dagster import DagsterInstance

from orchestrator.build import Builder
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


def train(inputs, params):
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
    write_model(project.models, "m", code=NOISY, tool=M_INPUTS)
    write_deployments(project, {"acme": client("latest", garbage="bad_json"), "globex": client("latest")})
    with DagsterInstance.ephemeral() as instance:
        defs = defs_for(project, store)
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance, raise_on_error=False
        )
    error = step_failure(result)
    assert "model m@1.0.0 broke the protocol while answering call 1: a channel message of 17 bytes" in error
    assert "JSONDecodeError" not in error and "json/decoder.py" not in error, "one line, not the parser's traceback"
    assert predictions("globex") in materialised(result), "the other client's steps ran to the end"


def test_garbage_on_the_channel_under_modelpex_run_is_one_error_line(
    cli: Callable[..., CliResult], project: Project, tmp_path: Path
) -> None:
    write_model(project.models, "m", code=NOISY)
    args = ("--input", f"data={data_file(tmp_path)}", "--output", str(tmp_path / "out.parquet"))
    result = cli("run", "m", *args, "--params", '{"garbage": "unknown_kind"}')
    assert_one_error_line(result, "model m@1.0.0 broke the protocol while answering call 1: unknown message kind")
    assert not (tmp_path / "out.parquet").exists()
