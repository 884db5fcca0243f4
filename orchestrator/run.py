"""Run: one call of a model pex as a subprocess against its verified base, through Dagster Pipes.

The orchestrator owns everything the call touches (shared-memory segments, a private working directory, the
process group) and releases all of it on every path: success, the model raising, a crash, a timeout, or the
orchestrator itself being interrupted. The model process gets an explicit environment built from an allow-list,
never the orchestrator's own (which holds database and cloud credentials).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from dagster import (
    AssetExecutionContext,
    OpExecutionContext,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    open_pipes_session,
)
from modelpex_runtime.protocol import PROTOCOL_VERSION, ModelCall, ModelFailure, ModelResult, StateRef

from orchestrator.errors import ModelpexError
from orchestrator.store import ArtifactRecord, PexStore

__all__ = [
    "DEFAULT_ENV_ALLOW",
    "ModelCrashError",
    "ModelRaisedError",
    "ModelTimeoutError",
    "RunOutcome",
    "run_model",
]

# N.B. Raised by Dagster's own Pipes message handler on every session, about an attribute we never use.
warnings.filterwarnings("ignore", message=".*expected_writer_count.*")

Action = Literal["train", "predict", "train_predict"]
# N.B. Locale, time zone and thread-count knobs only: nothing that can carry a credential.
DEFAULT_ENV_ALLOW = (
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "OPENBLAS_CORETYPE",
    "MKL_NUM_THREADS",
    "POLARS_MAX_THREADS",
)
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
STDERR_TAIL_LINES = 40
KILL_GRACE_SECONDS = 3.0


class ModelRunError(ModelpexError):
    """A model call did not produce a result; the subclasses say why."""


class ModelRaisedError(ModelRunError):
    """The model's own code raised: the message carries its exception type, message and traceback."""

    def __init__(self, label: str, failure: ModelFailure) -> None:
        self.failure = failure
        super().__init__(
            f"model {label} raised {failure['type']}: {failure['message']}\n\nmodel traceback:\n{failure['traceback']}"
        )


class ModelCrashError(ModelRunError):
    """The model process died or exited without reporting a result (it never spoke the protocol)."""


class ModelTimeoutError(ModelRunError):
    """The model process ran past its timeout and was killed."""


@dataclass
class RunOutcome:
    """What one call produced, with the figures the Dagster materialisation shows."""

    outputs: dict[str, Any]
    state: StateRef | None
    rows_in: dict[str, int]
    rows_out: dict[str, int]
    bytes_in: int
    bytes_out: int
    transport_seconds: float
    model_seconds: dict[str, float]
    wall_seconds: float
    stderr_tail: list[str] = field(default_factory=list)

    @property
    def bytes_moved(self) -> int:
        return self.bytes_in + self.bytes_out


def model_env(
    workdir: Path, python: str, pex_root: str | None, allow: Sequence[str], extra: Mapping[str, str]
) -> dict[str, str]:
    """The model process's whole environment: allow-listed names, our fixed values, then the caller's."""
    env = {name: os.environ[name] for name in allow if name in os.environ}
    env.update(
        PATH=f"{Path(python).parent}:{SYSTEM_PATH}",
        HOME=str(workdir),
        TMPDIR=str(workdir),
        # N.B. Explicit, or sh-boot would look under the private HOME above and unpack the base on every run.
        PEX_ROOT=pex_root or os.path.expanduser("~/.cache/pex"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@contextmanager
def _workdir(base_path: Path, base: ArtifactRecord) -> Iterator[Path]:
    """A private directory holding the verified base under the name the model pex was built against."""
    workdir = Path(tempfile.mkdtemp(prefix="modelpex-run-"))
    try:
        (workdir / base.filename).symlink_to(base_path)
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _pump(stream: IO[bytes], sink: IO[str], tail: deque[str]) -> None:
    """Forward a child's output line by line (Dagster captures it) and keep the last lines for errors."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace")
        tail.append(line.rstrip("\n"))
        sink.write(line)
        sink.flush()


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate the model's whole process group, then kill it if it does not go quietly."""
    if process.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_SECONDS), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _launch(model_path: Path, workdir: Path, env: dict[str, str], timeout: float, label: str) -> tuple[int, list[str]]:
    process = subprocess.Popen(
        [str(model_path)],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    pumps = [
        threading.Thread(target=_pump, args=(process.stdout, sys.stdout, deque(maxlen=1)), daemon=True),
        threading.Thread(target=_pump, args=(process.stderr, sys.stderr, tail), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(process)
        raise ModelTimeoutError(
            f"model {label} ran longer than its timeout of {timeout:g} s and was killed: raise the timeout "
            "(MODELPEX_TIMEOUT, or the runner's timeout_seconds) or make the model faster"
        ) from None
    finally:
        _stop(process)
        for pump in pumps:
            pump.join(timeout=5)
    return returncode, list(tail)


def _result(label: str, messages: Sequence[Any], returncode: int, tail: list[str]) -> ModelResult:
    for message in messages:
        if isinstance(message, dict) and "modelpex_error" in message:
            raise ModelRaisedError(label, message["modelpex_error"])
    results = [m["modelpex_result"] for m in messages if isinstance(m, dict) and "modelpex_result" in m]
    if returncode == 0 and results:
        return results[-1]
    how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with code {returncode}"
    if returncode == 0:
        how = "exited without reporting a result (it never opened Dagster Pipes)"
    stderr = "\n".join(tail[-15:]) or "(no output)"
    raise ModelCrashError(f"model {label} {how}; last lines of its stderr:\n{stderr}")


def run_model(
    context: OpExecutionContext | AssetExecutionContext,
    store: PexStore,
    model: ArtifactRecord,
    *,
    action: Action,
    inputs: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
    state_in: StateRef | None = None,
    state_out: Path | None = None,
    outputs: Sequence[str] = ("predictions",),
    output_library: str = "pyarrow",
    python: str | None = None,
    pex_root: str | None = None,
    timeout: float = 3600.0,
    env_allow: Sequence[str] = DEFAULT_ENV_ALLOW,
    env: Mapping[str, str] | None = None,
) -> RunOutcome:
    """Run ``action`` of a model version on ``inputs`` and return its outputs read back from shared memory.

    Both artifacts are verified against the index before the process starts; a model that raises surfaces as
    `ModelRaisedError` with its own traceback, one that dies or never reports as `ModelCrashError`.
    """
    from orchestrator.transport import FrameExchange  # N.B. pyarrow and shared memory: only when a model runs.

    started = time.perf_counter()
    if model.base_key is None:
        raise ModelpexError(f"{model.label} has no base key in the index: rebuild it with `modelpex build`")
    base = store.record("base", "base", model.base_key)
    if base is None:
        raise ModelpexError(
            f"{model.label} was built against base {model.base_key}, which is not in {store.url}: "
            f"rebuild the model with `modelpex build {model.label}`"
        )
    model_path, base_path = store.fetch(model), store.fetch(base)
    python = python or sys.executable
    want_outputs = list(outputs) if action != "train" else []
    with _workdir(base_path, base) as workdir, FrameExchange() as exchange:
        transport_started = time.perf_counter()
        refs = {name: exchange.put(name, frame) for name, frame in inputs.items()}
        call = ModelCall(
            protocol=PROTOCOL_VERSION,
            action=action,
            inputs=dict(refs),
            outputs={name: exchange.reserve_output(name) for name in want_outputs},
            params=dict(params or {}),
            state_in=state_in,
            state_out=str(state_out) if state_out else None,
        )
        transport_seconds = time.perf_counter() - transport_started
        with open_pipes_session(
            context=context,
            context_injector=PipesTempFileContextInjector(),
            message_reader=PipesTempFileMessageReader(),
            extras={"modelpex": call},
        ) as session:
            child_env = model_env(
                workdir, python, pex_root, env_allow, {**(env or {}), **session.get_bootstrap_env_vars()}
            )
            returncode, tail = _launch(model_path, workdir, child_env, timeout, model.label)
        result = _result(model.label, session.get_custom_messages(), returncode, tail)
        transport_started = time.perf_counter()
        frames = {name: exchange.get(ref, output_library) for name, ref in result["outputs"].items()}
        transport_seconds += time.perf_counter() - transport_started
    return RunOutcome(
        outputs=frames,
        state=result["state"],
        rows_in=result["rows_in"],
        rows_out={name: int(ref["num_rows"]) for name, ref in result["outputs"].items()},
        bytes_in=sum(int(ref["size"]) for ref in refs.values()),
        bytes_out=sum(int(ref["size"]) for ref in result["outputs"].values()),
        transport_seconds=transport_seconds + sum(result["seconds"].get(k, 0.0) for k in ("read", "write")),
        model_seconds={k: v for k, v in result["seconds"].items() if k not in ("read", "write")},
        wall_seconds=time.perf_counter() - started,
        stderr_tail=tail,
    )
