"""Run: model processes, a fork server per model version within a run and a child of it per client.

A `ForkServer` is started in the sandbox (`orchestrator.sandbox`) from a prepared venv (`orchestrator.cache`) with
an environment built from an allow-list, never the orchestrator's own. It imports the base libraries the model
names, before any client's data, and forks a fresh child per client (`ModelProcess`), which imports the model and
answers that client's calls: train, predict, each call a Pipes session of its own (`orchestrator.pipes`). Frames
and fitted states cross in segments handed over as descriptors (`orchestrator.transport`). `ModelProcesses` keeps
them warm by (model version, client): nothing one client's child holds or writes reaches another client's.

Containment, on every path:
- the server's lifeline (`modelpex_runtime.entry`) makes the kernel kill its whole process group, children
  included, the moment this orchestrator's end closes: on `close`, on a timeout, and when this process dies, kill
  -9 included;
- after every call, success included, every process the model started is killed (by the child, their subreaper,
  and from here: of the server's group or uid, sparing the server and its children); no call waits on a pipe a
  child holds;
- a call past its timeout, a crash, or a malformed answer ends the server and its children; the next call starts
  a fresh one.

This module imports no Dagster: the CLI runs models without paying for it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from modelpex_runtime.channel import Channel, ChannelClosed
from modelpex_runtime.metrics import checked_metrics
from modelpex_runtime.protocol import (
    CHANNEL_FD_ENV,
    LIFELINE_FD_ENV,
    MODEL_ENV,
    PROTOCOL_VERSION,
    READABLE_ENV,
    SANDBOXED_ENV,
    STATE_FORMATS,
    CallError,
    ModelCall,
    ModelFailure,
    ShmSpaceError,
    StateRef,
    TransportError,
    check_model_message,
    check_server_message,
)

from orchestrator.cache import SYSTEM_PATH, Prepared
from orchestrator.errors import ModelpexError
from orchestrator.limits import (
    ClientLimits,
    Limits,
    delegated_cgroup,
    describe_value,
    limit_hit,
    limit_line,
    mechanisms,
    parse_limits,
    resolve,
)
from orchestrator.modellog import ModelOutput, clean, clean_lines
from orchestrator.sandbox import Identity, Sandbox
from orchestrator.transport import FrameExchange, SegmentPool

__all__ = [
    "DEFAULT_ENV_ALLOW",
    "FittedState",
    "ForkServer",
    "ModelCrashError",
    "ModelProcess",
    "ModelProcesses",
    "ModelRaisedError",
    "ModelTimeoutError",
    "PipesLink",
    "RunOutcome",
]

log = logging.getLogger("modelpex")
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
STDERR_TAIL_LINES = 40
STATE_OUTPUT = "fitted state"
_SHM_SPACE = f"{ShmSpaceError.__module__}.{ShmSpaceError.__qualname__}"


class ModelRunError(ModelpexError):
    """A model call did not produce a result; the subclasses say why."""


class ModelRaisedError(ModelRunError):
    """The model's own code raised: the message carries its exception type, message and traceback."""

    def __init__(self, label: str, failure: ModelFailure) -> None:
        # N.B. Every field is the model's own text: cleaned of escape sequences and cut before anyone prints it.
        failure = ModelFailure(
            type=clean(str(failure.get("type")))[:200],
            message=clean_lines(str(failure.get("message")), 16 << 10),
            traceback=clean_lines(str(failure.get("traceback")), 64 << 10, keep="tail"),
        )
        self.failure = failure
        super().__init__(
            f"model {label} raised {failure.get('type')}: {failure.get('message')}\n\n"
            f"model traceback:\n{failure.get('traceback')}"
        )


class ModelCrashError(ModelRunError):
    """The model process died, or answered something that is not the protocol."""


class ModelTimeoutError(ModelRunError):
    """The model process ran past its timeout and was killed."""


class ModelLimitError(ModelRunError):
    """The model hit one of its limits (memory, processes, CPU time, a file's or a folder's size)."""


@dataclass(frozen=True)
class FittedState:
    """A fitted state's bytes and format (see `modelpex_runtime.state`), as the orchestrator holds it."""

    format: str
    payload: bytes


@dataclass
class RunOutcome:
    """What one call produced, with the figures the Dagster materialisation shows."""

    outputs: dict[str, Any]
    state: FittedState | None
    rows_in: dict[str, int]
    rows_out: dict[str, int]
    bytes_in: int
    bytes_out: int
    transport_seconds: float
    model_seconds: dict[str, float]
    wall_seconds: float
    start_seconds: float = 0.0  # starting the model process (its imports), when this call started it
    stderr_tail: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # what train reported beside its state

    @property
    def process_started(self) -> bool:
        return self.start_seconds > 0

    @property
    def bytes_moved(self) -> int:
        return self.bytes_in + self.bytes_out


class PipesLink(Protocol):
    """One call's Pipes session as the runner sees it: parameters for the model, and where its messages go."""

    bootstrap: Mapping[str, str]

    def handle(self, message: Mapping[str, Any]) -> None: ...


def model_env(workdir: Path, python: Path, allow: Sequence[str], extra: Mapping[str, str]) -> dict[str, str]:
    """The model process's whole environment: allow-listed names, our fixed values, then the caller's."""
    env = {name: os.environ[name] for name in allow if name in os.environ}
    env.update(PATH=f"{python.parent}:{SYSTEM_PATH}", HOME=str(workdir), TMPDIR=str(workdir))
    env.update(extra)
    return env


def _members(*, pgid: int | None = None, uid: int | None = None) -> list[int]:
    """Processes in process group ``pgid`` or owned by ``uid`` (real uid), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        try:
            if (pgid is not None and int(fields["NSpgid"].split()[-1]) == pgid) or (
                uid is not None and int(fields["Uid"].split()[0]) == uid
            ):
                found.append(int(entry))
        except (KeyError, ValueError, IndexError):
            continue
    return found


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True  # N.B. Gone.


def _kill(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class ForkServer:
    """The warm process of one model version: it imports the base libraries the model names, then forks one fresh
    child per client (`fork`), which imports the model and serves that client's calls (`ModelProcess`).

    It runs in the sandbox as one identity with one private folder; its children share both, and each mounts fresh
    /tmp, /var/tmp, /dev/shm and private folder of its own when the server has a user namespace (``private``)."""

    def __init__(
        self,
        prepared: Prepared,
        sandbox: Sandbox,
        *,
        env_allow: Sequence[str] = DEFAULT_ENV_ALLOW,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 600.0,
        limits: Limits | None = None,
    ) -> None:
        self.prepared = prepared
        self.sandbox = sandbox
        self.limits = limits  # N.B. The model's: they size the sandbox's tmpfs; each child applies its client's.
        self.tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.children: dict[int, ModelProcess] = {}
        self._stack = ExitStack()
        self._requests = 0
        self._lock = threading.Lock()
        self.forks = 0
        try:
            self._start(env_allow, env or {}, startup_timeout)
        except BaseException:
            self.close()
            raise

    @property
    def label(self) -> str:
        return self.prepared.label

    def _start(self, env_allow: Sequence[str], extra: Mapping[str, str], timeout: float) -> None:
        started = time.perf_counter()
        self.sandbox.end_orphans_once()
        self.identity: Identity = self._stack.enter_context(self.sandbox.identity())
        self.workdir = workdir = self._stack.enter_context(self.sandbox.workdir(self.identity))
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        lifeline_read, self._lifeline = os.pipe()
        self.channel = Channel(parent)
        self._stack.callback(self.channel.close)
        env = model_env(workdir, self.prepared.python, env_allow, extra)
        env.update(
            {
                CHANNEL_FD_ENV: str(child.fileno()),
                LIFELINE_FD_ENV: str(lifeline_read),
                MODEL_ENV: json.dumps(self.prepared.entry),
                READABLE_ENV: str(self.prepared.pex_root),
            }
        )
        if self.sandbox.bwrap:
            env[SANDBOXED_ENV] = "1"
        try:
            self.process = subprocess.Popen(
                self.sandbox.command(
                    [str(self.prepared.python), "-I", "-u", "-m", "modelpex_runtime"],
                    workdir,
                    [self.prepared.pex_root],
                    self.limits,
                ),
                pass_fds=(child.fileno(), lifeline_read),
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                **self.sandbox.popen_kwargs(self.identity),  # type: ignore[arg-type]
            )
        finally:
            child.close()
            os.close(lifeline_read)
        # N.B. Read in bounded pieces, cleaned and tagged as the model's (`orchestrator.modellog`).
        self.output = ModelOutput(self.label, self.process.stdout, self.process.stderr)  # type: ignore[arg-type]
        self.tail = self.output.tail
        try:
            ready = self._reply("ready", 0, time.monotonic() + timeout, "starting")
        except TimeoutError:
            raise ModelTimeoutError(
                f"model {self.label} did not start within {timeout:g} s (its imports ran longer) and was killed"
            ) from None
        self.private = ready.get("private") is True
        self.preloaded = [str(name) for name in ready.get("preloaded") or []]
        self.threads = int(ready.get("threads") or 0)
        self.start_seconds = time.perf_counter() - started

    def _reply(self, kind: str, request: int, deadline: float, doing: str) -> dict[str, Any]:
        """The server's answer ``kind`` to ``request`` (0: its start-up)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.channel.sock.settimeout(remaining)
            try:
                message, fds = self.channel.receive()
                for fd in fds:
                    os.close(fd)
                check_server_message(message)
            except ChannelClosed:
                raise _crashed(self.label, self.process, self.tail, doing) from None
            except CallError as exc:
                raise ModelCrashError(f"model {self.label} broke the protocol while {doing}: {exc}") from None
            if message.get("kind") == "failed" and request == 0:
                raise _failed(self.label, message.get("failure") or {})
            if message.get("kind") == kind and message.get("id", 0) == request:
                return message

    def fork(self, timeout: float, limits: Limits | None = None, limits_where: str = "") -> ModelProcess:
        """A fresh child for one client: forked from the server as it was before any client, the model imported;
        with ``limits``, which it applies to itself before it imports the model."""
        started = time.perf_counter()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        with self._lock:
            self._requests += 1
            request = self._requests
            try:
                request_limits = (
                    {**limits.for_runtime(), "own_uid": self.identity.lock is not None} if limits is not None else {}
                )
                self.channel.send(
                    {"kind": "fork", "id": request, "limits": request_limits}, [child.fileno(), out_write, err_write]
                )
            except OSError:
                for fd in (out_read, err_read):
                    os.close(fd)
                parent.close()
                raise _crashed(self.label, self.process, self.tail, "forking a child") from None
            finally:
                child.close()
                os.close(out_write)
                os.close(err_write)
            try:
                pid = int(self._reply("forked", request, time.monotonic() + 30, "forking a child")["pid"])
            except BaseException:
                parent.close()
                os.close(out_read)
                os.close(err_read)
                raise
        self.forks += 1
        process = ModelProcess(self, Channel(parent), pid, out_read, err_read)
        process.limits, process.limits_where = limits, limits_where
        self.children[pid] = process
        try:
            process.await_ready(time.monotonic() + timeout)
        except BaseException:
            process.close()
            raise
        process.start_seconds = time.perf_counter() - started + (self.start_seconds if self.forks == 1 else 0.0)
        return process

    def end(self, pid: int, grace: float = 0.0) -> int | None:
        """Kill child ``pid`` (after ``grace`` seconds to end by itself); its return code, when the server knew it."""
        self.children.pop(pid, None)
        if not self.alive:
            return None
        with self._lock:
            self._requests += 1
            request = self._requests
            try:
                self.channel.send({"kind": "end", "id": request, "pid": pid, "grace": grace})
                reply = self._reply("ended", request, time.monotonic() + grace + 10, "ending a child")
            except (OSError, TimeoutError, ModelpexError):
                return None
        code = reply.get("returncode")
        return code if isinstance(code, int) else None

    def kill_stragglers(self) -> None:
        """Every process the model left behind: of the server's group, or with a uid of its own, of that uid; never
        the server or its live children.

        N.B. In a bubblewrap sandbox each child does this itself (it is the subreaper of everything it starts):
        from here the sandbox's processes cannot be told apart.
        """
        if self.sandbox.bwrap:
            return
        own_uid = self.identity.lock is not None
        spared = {self.process.pid, *self.children}
        for _ in range(1000):  # N.B. Until none is left: a fork chain's next generation is not in one snapshot.
            pids = _members(uid=self.identity.uid) if own_uid else _members(pgid=self.process.pid)
            pids = [pid for pid in pids if pid not in spared and not _zombie(pid)]
            if not pids:
                return
            _kill(pids)

    @property
    def alive(self) -> bool:
        process = getattr(self, "process", None)
        return process is not None and process.poll() is None

    def close(self) -> None:
        """End the server, its children and everything they started, then release their segments, the folder and
        the uid."""
        lifeline = getattr(self, "_lifeline", None)
        if lifeline is not None:
            os.close(lifeline)  # N.B. The kernel now sends SIGKILL to the model's whole process group.
            self._lifeline = None
        process = getattr(self, "process", None)
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self.sandbox.end_processes(self.identity)  # N.B. With a uid of its own: everything of that uid.
            self.kill_stragglers()
            _close_output(getattr(self, "output", None), (process.stdout, process.stderr))
        for child in list(self.children.values()):
            child.release()  # N.B. Once they are dead: their output ends at once, their segments are no one's.
        self.children.clear()
        self._stack.close()


def _close_output(output: ModelOutput | None, streams: Sequence[IO[bytes] | None]) -> None:
    """Read what the process left in its pipes, stop reading, close them."""
    if output is not None:
        output.close()
    for stream in streams:
        if stream is not None:
            stream.close()


def _crashed(label: str, process: subprocess.Popen | None, tail: deque[str], doing: str, code: int | None = None):
    """The error for a model process that died or closed its channel, with the last lines of its stderr."""
    if process is not None:
        try:
            code = process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
    how = (
        "closed its channel"
        if code is None
        else f"was killed by signal {-code}"
        if code < 0
        else f"exited with code {code}"
    )
    time.sleep(0.05)  # N.B. Let the pumps forward the last lines of stderr.
    stderr = "\n".join(list(tail)[-15:]) or "(no output)"
    return ModelCrashError(f"model {label} {how} while {doing}; last lines of its stderr:\n{stderr}")


def _failed(label: str, failure: ModelFailure) -> ModelpexError:
    """The model's own exception, except running out of shared memory for an output (the runtime grows each output
    to what the model wrote): that is the transport's, and its one line says how to make room."""
    if failure.get("type") == _SHM_SPACE:
        return ShmSpaceError(str(failure.get("message")))
    return ModelRaisedError(label, failure)


class ModelProcess:
    """One client's child of a `ForkServer`: the model imported, fresh from the server; `call` as often as that
    client needs, then `close`. Its stdout and stderr are its own, so no line of one client's shows in another's."""

    def __init__(self, server: ForkServer, channel: Channel, pid: int, stdout: int, stderr: int) -> None:
        self.server = server
        self.prepared = server.prepared
        self.sandbox = server.sandbox
        self.channel = channel
        self.pid = pid  # N.B. As the server sees it: in a bubblewrap sandbox, in its PID namespace.
        self.pool = SegmentPool()
        self.tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._streams = (os.fdopen(stdout, "rb"), os.fdopen(stderr, "rb"))
        self.output = ModelOutput(self.label, *self._streams)
        self.tail = self.output.tail
        self._calls = 0
        self._closed = False
        self.start_seconds = 0.0
        self.private = False
        self.limits: Limits | None = None
        self.limits_where = ""

    @property
    def label(self) -> str:
        return self.prepared.label

    @property
    def identity(self) -> Identity:
        return self.server.identity

    def await_ready(self, deadline: float) -> None:
        try:
            ready = self._next(0, None, deadline, "starting")
        except TimeoutError:
            raise ModelTimeoutError(
                f"model {self.label} did not import within the timeout (its imports ran longer) and was killed"
            ) from None
        self.private = ready.get("private") is True

    def _check_output_sizes(self, outputs: Mapping[str, Any]) -> None:
        """An output announced larger than the ``output`` limit is refused before a byte of it is read."""
        if self.limits is None:
            return
        for name, ref in outputs.items():
            size = ref.get("size") if isinstance(ref, dict) else None
            if isinstance(size, int) and size > self.limits.output:
                line = limit_line(self.label, "output", self.limits, self._how("output"), self.limits_where)
                raise ModelLimitError(f"{line} (output {name!r} is {size / 2**20:.1f} MiB)")

    def _limit(self, kind: str, message: str, signal: int | None = None) -> ModelLimitError | None:
        """The one-line error of a limit the model hit, if its failure shows one."""
        name = limit_hit(kind, message, signal) if self.limits is not None else None
        if name is None or self.limits is None:
            return None
        return ModelLimitError(limit_line(self.label, name, self.limits, self._how(name), self.limits_where))

    def _how(self, name: str) -> str:
        """What enforces limit ``name`` for this process."""
        return mechanisms(own_uid=self.identity.lock is not None, sized=self.private or bool(self.sandbox.bwrap))[name]

    def _crashed(self, doing: str) -> ModelRunError:
        code = self.server.end(self.pid, grace=2.0)
        self._closed = True
        # N.B. A child that could not even start under its limits (a memory limit below what a fork server's child
        # inherits) says why in its last line of stderr, once the pumps have forwarded it.
        time.sleep(0.05)
        last = self.tail[-1] if self.tail else ""
        kind = last.partition("could not start: ")[2].partition(":")[0]
        hit = self._limit(kind, last, -code if code is not None and code < 0 else None)
        return hit or _crashed(self.label, None, self.tail, doing, code)

    def _next(self, call_id: int, link: PipesLink | None, deadline: float, doing: str) -> dict[str, Any]:
        """The next message that ends a call (or the start-up), forwarding the call's Pipes messages on the way."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.channel.sock.settimeout(remaining)
            try:
                message, fds = self.channel.receive()
                for fd in fds:  # N.B. Nothing a model sends us is a descriptor we asked for.
                    os.close(fd)
                check_model_message(message)
            except ChannelClosed:
                raise self._crashed(doing) from None
            except CallError as exc:
                raise ModelCrashError(f"model {self.label} broke the protocol while {doing}: {exc}") from None
            kind, ours = message.get("kind"), message.get("id") == call_id
            if kind == "failed" and ours:
                raise self._failed(message.get("failure") or {})
            if kind == "pipes" and ours and link is not None:
                self._forward(link, message.get("message"), doing)
            elif (kind == "done" and ours) or (kind == "ready" and call_id == 0):
                return message

    def _failed(self, failure: ModelFailure) -> ModelpexError:
        hit = self._limit(str(failure.get("type")), str(failure.get("message")))
        return hit or _failed(self.label, failure)

    def _forward(self, link: PipesLink, message: object, doing: str) -> None:
        """One Pipes message to the call's session; one it refuses is the model breaking the protocol."""
        try:
            if not isinstance(message, dict):
                raise TypeError(f"{message!r} is not a Pipes message")
            link.handle(message)
        except Exception as exc:  # noqa: BLE001 - Dagster's handler raises its own kinds for bad messages
            raise ModelCrashError(
                f"model {self.label} sent a Pipes message that was refused while {doing}: {clean(str(exc))[:500]}"
            ) from None

    def call(
        self,
        link: PipesLink,
        *,
        action: Action,
        inputs: Mapping[str, Any],
        params: Mapping[str, Any],
        timeout: float,
        state_in: FittedState | None = None,
        keep_state: bool = False,
        outputs: Sequence[str] = ("predictions",),
        output_library: str = "pyarrow",
    ) -> RunOutcome:
        """One call; the frames come back copied out of shared memory, in ``output_library``."""
        started = time.perf_counter()
        self._calls += 1
        call_id = self._calls
        want = list(outputs) if action != "train" else []
        with FrameExchange(self.pool) as exchange:
            refs = {name: exchange.put(name, frame) for name, frame in inputs.items()}
            call = ModelCall(
                protocol=PROTOCOL_VERSION,
                action=action,
                inputs=refs,
                outputs={name: exchange.reserve(name) for name in want},
                params=dict(params),
                state_in=None
                if state_in is None
                else StateRef(
                    slot=exchange.put_bytes(state_in.payload, "the fitted state"),
                    format=state_in.format,
                    size=len(state_in.payload),
                ),
                state_out=exchange.reserve(STATE_OUTPUT) if keep_state and action != "predict" else None,
            )
            sent = time.perf_counter()
            try:
                with self.output.routed(getattr(link, "log", None)):
                    reply = self._exchange(call_id, call, exchange, link, timeout)
                    answered = time.perf_counter()
                    frames, state, seconds, bytes_out, metrics = self._read(
                        exchange, reply.get("result"), call, want, output_library
                    )
            finally:
                self.kill_stragglers()
            done = time.perf_counter()
        return RunOutcome(
            outputs=frames,
            state=state,
            rows_in={name: ref["num_rows"] for name, ref in refs.items()},
            rows_out={name: _rows(frame) for name, frame in frames.items()},
            bytes_in=sum(ref["size"] for ref in refs.values()),
            bytes_out=bytes_out,
            transport_seconds=(sent - started)
            + (done - answered)
            + seconds.get("read", 0.0)
            + seconds.get("write", 0.0),
            model_seconds={k: v for k, v in seconds.items() if k not in ("read", "write")},
            wall_seconds=time.perf_counter() - started,
            start_seconds=self.start_seconds if call_id == 1 else 0.0,
            stderr_tail=list(self.tail),
            metrics=metrics,
        )

    def _exchange(
        self, call_id: int, call: ModelCall, exchange: FrameExchange, link: PipesLink, timeout: float
    ) -> dict[str, Any]:
        """Send the call with its descriptors and wait for its end, forwarding its Pipes messages."""
        try:
            self.channel.sock.settimeout(timeout)
            self.channel.send(
                {"kind": "call", "id": call_id, "call": call, "pipes": dict(link.bootstrap)}, exchange.fds
            )
            return self._next(call_id, link, time.monotonic() + timeout, f"answering call {call_id}")
        except TimeoutError:
            raise ModelTimeoutError(
                f"model {self.label} ran longer than its timeout of {timeout:g} s and was killed: raise the "
                "timeout (MODELPEX_TIMEOUT, or the resource's timeout_seconds) or make the model faster"
            ) from None
        except (BrokenPipeError, ConnectionResetError):
            raise self._crashed(f"receiving call {call_id}") from None

    def _read(
        self, exchange: FrameExchange, result: Any, call: ModelCall, want: list[str], library: str
    ) -> tuple[dict[str, Any], FittedState | None, dict[str, float], int, dict[str, float]]:
        """The call's outputs, state and metrics, copied out of their segments; anything malformed is the model
        crashing."""
        try:
            if not isinstance(result, dict) or not isinstance(result.get("outputs"), dict):
                raise TypeError("the result carries no outputs")
            missing = sorted(set(want) - set(result["outputs"]))
            if missing:
                raise ValueError(f"outputs {missing} were asked for and not written")
            self._check_output_sizes(result["outputs"])
            frames = {
                name: exchange.get(name, ref, library, f"output {name!r} of {self.label}")
                for name, ref in result["outputs"].items()
            }
            state = None
            if call["state_out"] is not None:
                ref = result.get("state")
                if not isinstance(ref, dict) or ref.get("format") not in STATE_FORMATS:
                    raise ValueError(f"the fitted state reference {ref!r} is not one modelpex knows")
                what = f"the state of {self.label}"
                state = FittedState(
                    ref["format"], exchange.get_bytes(STATE_OUTPUT, ref.get("slot"), ref.get("size"), what)
                )
            seconds = {str(k): float(v) for k, v in result.get("seconds", {}).items()}
            bytes_out = sum(int(ref["size"]) for ref in result["outputs"].values())
            metrics = checked_metrics(result.get("metrics") or {}, f"the metrics of {self.label}")
        except (TransportError, CallError, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ModelCrashError(f"model {self.label} answered malformed: {exc}") from None
        return frames, state, seconds, bytes_out, metrics

    def kill_stragglers(self) -> None:
        """Every process the model left behind (the child ends its own descendants itself; this catches what it
        could not)."""
        self.server.kill_stragglers()

    @property
    def alive(self) -> bool:
        return not self._closed and self.server.alive

    def release(self) -> None:
        """Close our ends (the server is ending it, or has): the channel, the pumps, the segments."""
        self._closed = True
        self.channel.close()
        _close_output(self.output, self._streams)
        self.pool.close()

    def close(self) -> None:
        """End this child and everything it started; the server and its other children go on."""
        if not self._closed:
            self._closed = True
            self.channel.close()
            self.server.end(self.pid)
        self.server.children.pop(self.pid, None)
        self.release()


_announced: set[str] = set()


def announce_limits(process: ModelProcess) -> None:
    """Each limit of a model process and what enforces it, in the log once per distinct set of limits."""
    limits, where, label = process.limits, process.limits_where, process.label
    if limits is None:
        return
    own_uid = process.identity.lock is not None
    how = mechanisms(own_uid=own_uid, sized=process.private or bool(process.sandbox.bwrap))
    line = f"modelpex limits of {label}: " + "; ".join(
        f"{name} {describe_value(name, getattr(limits, name))} ({how[name]})" for name in how
    )
    line += "; oom_score_adj 1000 (the kernel ends a model process before the orchestrator); cgroup v2: " + (
        delegated_cgroup() or "none"
    )
    if line not in _announced:
        _announced.add(line)
        log.info(line + f"; raise them in {where}")


def model_limits(prepared: Prepared, client: ClientLimits | None) -> tuple[Limits, str]:
    """The limits of ``prepared``'s process for a client: the defaults, the model's, the client's; and where to
    raise them."""
    name = prepared.entry.get("name", prepared.label)
    where = f"[tool.modelpex.limits] of {name}'s pyproject.toml"
    model = parse_limits(prepared.entry.get("limits"), where)
    if client is not None and client.values:
        where = f"{client.where} (this client) or {where}"
    return resolve(model, client.values if client else None), where


def _rows(frame: Any) -> int:
    return frame.num_rows if hasattr(frame, "num_rows") else len(frame)


class ModelProcesses:
    """The model processes of one run: a fork server per model version, and a child of it per (version, client),
    started on first use, re-used for that client's later calls, all closed at the end.

    A server whose children cannot have private places of their own (no user namespaces) serves one client only:
    each client then gets a server of its own. A model that declares ``reuse = false`` gets a cold process per
    call."""

    def __init__(
        self,
        sandbox: Sandbox,
        *,
        env_allow: Sequence[str] = DEFAULT_ENV_ALLOW,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.env_allow = list(env_allow)
        self.env = dict(env or {})
        self._servers: dict[object, ForkServer] = {}
        self._children: dict[tuple[str, str], ModelProcess] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> ModelProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_server(self, prepared: Prepared, timeout: float) -> ForkServer:
        limits = model_limits(prepared, None)[0]
        return ForkServer(
            prepared, self.sandbox, env_allow=self.env_allow, env=self.env, startup_timeout=timeout, limits=limits
        )

    def _server(self, prepared: Prepared, client: str, timeout: float) -> ForkServer:
        """The version's server, or the client's own where children cannot have private places."""
        digest = prepared.record.sha256
        with self._lock:
            for key in (digest, (digest, client)):
                server = self._servers.get(key)
                if server is not None and server.alive:
                    return server
                if server is not None:
                    del self._servers[key]
                    server.close()
        server = self._start_server(prepared, timeout)
        with self._lock:
            self._servers[digest if server.private else (digest, client)] = server
        return server

    def _process(self, prepared: Prepared, client: str, timeout: float, limits: ClientLimits | None) -> ModelProcess:
        limited = model_limits(prepared, limits)
        with self._lock:
            process = self._children.pop((prepared.record.sha256, client), None)
        if process is not None and process.alive and process.limits == limited[0]:
            return process
        if process is not None:
            process.close()  # N.B. Dead, or limited otherwise: a child applies its limits once, before the model.
        server = self._server(prepared, client, timeout)
        process = server.fork(timeout, *limited)
        announce_limits(process)
        return process

    def call(
        self,
        prepared: Prepared,
        link: Callable[[], AbstractContextManager[PipesLink]],
        *,
        timeout: float,
        client: str = "",
        client_limits: ClientLimits | None = None,
        **kwargs: Any,
    ) -> RunOutcome:
        """Run one call on the client's child of the version's server; a child that crashed or timed out takes its
        server down with it (a fresh one next time)."""
        if not prepared.reuse:
            return self._cold(prepared, link, timeout, client_limits, **kwargs)
        process = self._process(prepared, client, timeout, client_limits)
        healthy = False
        try:
            with link() as pipes:
                outcome = process.call(pipes, timeout=timeout, **kwargs)
            healthy = True
            return outcome
        except ModelRaisedError:
            healthy = True  # N.B. The model raised and answered: its process is still sound.
            raise
        finally:
            if healthy and process.alive:
                with self._lock:
                    self._children[(prepared.record.sha256, client)] = process
            else:
                self._drop(process.server)

    def _cold(
        self,
        prepared: Prepared,
        link: Callable[[], AbstractContextManager[PipesLink]],
        timeout: float,
        limits: ClientLimits | None,
        **kwargs: Any,
    ) -> RunOutcome:
        """A process of its own for one call, for a model that must not share even the server."""
        server = self._start_server(prepared, timeout)
        try:
            process = server.fork(timeout, *model_limits(prepared, limits))
            announce_limits(process)
            with link() as pipes:
                return process.call(pipes, timeout=timeout, **kwargs)
        finally:
            server.close()

    def _drop(self, server: ForkServer) -> None:
        with self._lock:
            for key in [k for k, s in self._servers.items() if s is server]:
                del self._servers[key]
            for key in [k for k, p in self._children.items() if p.server is server]:
                del self._children[key]
        server.close()

    def close(self) -> None:
        with self._lock:
            servers, self._servers, self._children = list(self._servers.values()), {}, {}
        for server in servers:
            server.close()
