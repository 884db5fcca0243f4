"""Entry: a model process's main, run as ``python -m modelpex_runtime`` inside a model version's venv.

It learns which model it is from ``MODELPEX_MODEL`` (frozen into the pex at build time) and becomes the version's
fork server (`modelpex_runtime.forkserver`): it imports the base libraries the model names, then forks one child
per client. A child imports the model's ``train``/``predict`` and serves that client's calls over its own channel
until the orchestrator closes it: each call maps its input frames out of the segments it was handed, calls the
model, writes outputs and the fitted state into the segments it was given, and streams the call's Dagster Pipes
messages back.

Before anything else it arms its *lifeline*: a pipe whose other end only the orchestrator holds. When that end
closes, however the orchestrator died (kill -9 included), the kernel sends SIGKILL to this process's whole process
group (``O_ASYNC`` with ``F_SETSIG``), whatever the model's code is doing, even holding the GIL.

Between calls of one client nothing of the runtime's is kept: inputs, outputs and states are fresh objects per
call, and a segment stays mapped only while a frame views it. What a model keeps (module globals, files in its
private places) stays for that client's next call and never reaches another client's child. A model that must not
even share the server declares ``reuse = false`` and gets a cold process per call.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from modelpex_runtime.channel import Channel, ChannelClosed
from modelpex_runtime.containment import arm_call
from modelpex_runtime.metrics import split_trained
from modelpex_runtime.protocol import (
    CHANNEL_FD_ENV,
    LIFELINE_FD_ENV,
    MODEL_ENV,
    PROTOCOL_VERSION,
    READABLE_ENV,
    SANDBOXED_ENV,
    CallError,
    FrameRef,
    ModelCall,
    ModelFailure,
    ModelResult,
    StateRef,
)

__all__ = ["Model", "execute", "main"]

PREDICTIONS = "predictions"
# N.B. Linux's F_SETSIG, which Python's fcntl module does not name.
_F_SETSIG = 10


def _arm_lifeline(fd: int) -> None:
    """SIGKILL for this process group as soon as the orchestrator's end of the lifeline closes."""
    import fcntl

    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # N.B. In a sandbox's PID namespace our group's leader is outside: lead our own.

    fcntl.fcntl(fd, _F_SETSIG, signal.SIGKILL)
    fcntl.fcntl(fd, fcntl.F_SETOWN, -os.getpgrp())
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC | os.O_NONBLOCK)
    try:
        if os.read(fd, 1) == b"":  # N.B. Closed before we armed it: no signal will come, so act now.
            os.killpg(0, signal.SIGKILL)
    except BlockingIOError:
        pass


def _callable(target: str) -> Callable[..., Any]:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


class Model:
    """The model this process serves: its identity from ``MODELPEX_MODEL`` and its two callables."""

    def __init__(self, entry: Mapping[str, Any]) -> None:
        self.entry = entry
        self.label = f"{entry['name']} {entry['version']}"
        self.train = _callable(entry["train"])
        self.predict = _callable(entry["predict"])

    @staticmethod
    def entry_from_env() -> dict[str, Any]:
        try:
            entry = json.loads(os.environ[MODEL_ENV])
        except (KeyError, json.JSONDecodeError):
            raise CallError(f"{MODEL_ENV} is missing or not JSON: run a pex built by `modelpex build`") from None
        if not isinstance(entry, dict):
            raise CallError(f"{MODEL_ENV} is not a JSON object: run a pex built by `modelpex build`")
        return entry

    @classmethod
    def from_env(cls) -> Model:
        return cls(Model.entry_from_env())

    def encode(self, state: Any) -> tuple[str, bytes]:
        from modelpex_runtime.state import encode_state

        return encode_state(
            state, model=self.label, fmt=self.entry.get("state", "auto"), trusted=self.entry.get("trusted_types", [])
        )

    def decode(self, fmt: str, payload: bytes) -> Any:
        from modelpex_runtime.state import decode_state

        return decode_state(
            fmt,
            payload,
            model=self.label,
            frames=self.entry["frames"],
            trusted=self.entry.get("trusted_types", []),
            allow_pickle=self.entry.get("state") == "pickle",
        )


def _named_outputs(result: Any, wanted: Mapping[str, int]) -> dict[str, Any]:
    """``predict`` returns one frame (the ``predictions`` output) or a mapping of output name to frame."""
    frames = dict(result) if isinstance(result, Mapping) else {PREDICTIONS: result}
    unknown = sorted(set(frames) - set(wanted))
    if unknown:
        raise CallError(f"predict returned outputs {unknown} that were not asked for; expected {sorted(wanted)}")
    return frames


def _slot(fds: list[int], slot: int, what: str) -> int:
    if not isinstance(slot, int) or not 0 <= slot < len(fds):
        raise CallError(f"{what} names descriptor slot {slot!r} but the call came with {len(fds)}")
    return fds[slot]


def execute(
    model: Model,
    call: ModelCall,
    fds: list[int],
    log: logging.Logger,
    outgoing: list[Callable[[], None]] | None = None,
) -> ModelResult:
    """Run one call of the model in this process; everything the orchestrator needs comes back in the result.

    Outputs and the state that fit in their pipes are written at once; bigger ones go into their pipes after the
    result is sent (``outgoing``, in the order the result lists them, the state last): the orchestrator reads each
    pipe once it knows its size. Without ``outgoing``, all at once.
    """
    from modelpex_runtime.transport import fits_in_pipe, prepare_frame, read_bytes, read_frame, write_bytes

    sends: list[tuple[int, int, Callable[[], None]]] = []  # (pipe, bytes, the function that writes them)
    state_send: list[tuple[int, int, Callable[[], None]]] = []

    if call.get("protocol") != PROTOCOL_VERSION:
        raise CallError(
            f"the orchestrator speaks modelpex protocol {call.get('protocol')!r}, this base speaks "
            f"{PROTOCOL_VERSION}: rebuild the base and the model with the orchestrator's version"
        )
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - clock
        clock = now

    frames = model.entry["frames"]
    inputs = {
        name: read_frame(ref, _slot(fds, ref["slot"], f"input {name!r}"), frames, f"input {name!r} of {model.label}")
        for name, ref in call["inputs"].items()
    }
    lap("read")
    params, state_ref, metrics = call["params"], None, {}
    if call["action"] in ("train", "train_predict"):
        log.info(f"training {model.label} on {', '.join(inputs) or 'no inputs'}")
        state, metrics = split_trained(model.train(inputs, params), f"train of {model.label}")
        lap("train")
        if call["state_out"] is not None:
            fmt, payload = model.encode(state)
            fd, what = _slot(fds, call["state_out"], "state_out"), f"the fitted state of {model.label}"
            state_send.append((fd, len(payload), functools.partial(write_bytes, fd, payload, what)))
            state_ref = StateRef(slot=call["state_out"], format=fmt, size=len(payload))
            lap("state")
    else:
        ref = call["state_in"]
        if ref is None:
            raise CallError("predict needs a fitted state: train first, or pass the state of a training run")
        state = model.decode(ref["format"], read_bytes(_slot(fds, ref["slot"], "state_in"), ref["size"]))
        lap("state")
    outputs: dict[str, FrameRef] = {}
    if call["action"] in ("predict", "train_predict"):
        log.info(f"predicting with {model.label}")
        produced = _named_outputs(model.predict(inputs, state, params), call["outputs"])
        lap("predict")
        for name, frame in produced.items():
            slot = call["outputs"][name]
            what = f"output {name!r} of {model.label}"
            outputs[name], send = prepare_frame(frame, slot, what)
            fd = _slot(fds, slot, what)
            sends.append((fd, outputs[name]["size"], functools.partial(send, fd)))
        lap("write")
    for fd, size, send in sends + state_send:
        if outgoing is None or fits_in_pipe(fd, size):
            send()
        else:
            outgoing.append(send)
    rows_in = {name: int(ref["num_rows"]) for name, ref in call["inputs"].items()}
    return ModelResult(
        protocol=PROTOCOL_VERSION, outputs=outputs, state=state_ref, rows_in=rows_in, seconds=seconds, metrics=metrics
    )


def _failure(exc: BaseException) -> ModelFailure:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return ModelFailure(type=name, message=str(exc), traceback=_model_traceback(exc))


def _model_traceback(exc: BaseException) -> str:
    """The traceback from the model's own first frame: the runtime's frames above it are the same for every error
    and would push the model's lines out of a log view."""
    frames = exc.__traceback__
    runtime = os.path.dirname(__file__)
    while frames is not None and frames.tb_next is not None and frames.tb_frame.f_code.co_filename.startswith(runtime):
        frames = frames.tb_next
    return "".join(traceback.format_exception(type(exc), exc, frames))


@contextmanager
def _pipes(channel: Channel, call_id: int, bootstrap: Mapping[str, str]) -> Iterator[Any]:
    """A Dagster Pipes context for one call, whose messages travel over the channel; the model's loggers too."""
    from modelpex_runtime.pipes import open_call_pipes

    pipes = open_call_pipes(channel, call_id, bootstrap)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handlers = list(pipes.log.handlers)
    for handler in handlers:
        root.addHandler(handler)
    try:
        yield pipes
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        pipes.close()


def _answer(
    channel: Channel, model: Model, message: Mapping[str, Any], fds: list[int], outgoing: list[Callable[[], None]]
) -> dict[str, Any]:
    call_id = message.get("id")
    if message.get("kind") != "call" or not isinstance(message.get("call"), dict):
        raise CallError(f"expected a call on the channel, got {message.get('kind')!r}")
    with _pipes(channel, call_id, message.get("pipes") or {}) as pipes:
        try:
            result = execute(model, message["call"], fds, pipes.log, outgoing)
        except Exception as exc:  # noqa: BLE001 - the model's own error, reported with its traceback
            return {"kind": "failed", "id": call_id, "failure": _failure(exc)}
    return {"kind": "done", "id": call_id, "result": result}


def _send_outputs(outgoing: list[Callable[[], None]]) -> None:
    """Stream the call's outputs into their pipes; an orchestrator that stopped reading (it refused the call) ends
    it."""
    try:
        for send in outgoing:
            send()
    except (BrokenPipeError, ConnectionResetError):
        pass
    except Exception as exc:  # noqa: BLE001 - the call is answered: the orchestrator sees a short output
        sys.stderr.write(f"modelpex: could not send an output: {exc}\n")


def serve(channel: Channel, model: Model) -> int:
    """Answer calls until the orchestrator closes the channel; no process the model started outlives a call."""
    from modelpex_runtime.forkserver import end_descendants

    while True:
        try:
            message, fds = channel.receive()
        except ChannelClosed:
            return 0
        outgoing: list[Callable[[], None]] = []
        try:
            arm_call()
            reply = _answer(channel, model, message, fds, outgoing)
            # N.B. Before the answer, not after it: once the orchestrator has the call's end, nothing the model
            # started may still run (a daemon it left was found alive by a check made right after the call).
            end_descendants()
            channel.send(reply)
            _send_outputs(outgoing)
        finally:
            del outgoing  # N.B. The frames sent: nothing of the call is kept.
            for fd in fds:
                os.close(fd)
            end_descendants()


def _child_main(channel: Channel, private: bool, started: float) -> int:
    """A client's child of the fork server: import the model (here, never in the server), then serve its calls."""
    from modelpex_runtime.forkserver import THREADLESS_ENV

    for name in _FORCED:
        os.environ.pop(name, None)  # N.B. What the model starts gets the thread settings the orchestrator gave.
    if "OPENBLAS_NUM_THREADS" in _FORCED and "numpy" in sys.modules:
        _restore_blas_threads()
    assert set(_FORCED) <= set(THREADLESS_ENV)
    try:
        model = Model.from_env()
    except BaseException as exc:  # noqa: BLE001 - the model's modules fail to import: its own traceback
        channel.send({"kind": "failed", "id": 0, "failure": _failure(exc)})
        return 1
    seconds = {"import": time.perf_counter() - started}
    channel.send({"kind": "ready", "seconds": seconds, "pid": os.getpid(), "private": private})
    return serve(channel, model)


def _restore_blas_threads() -> None:
    """The server imported numpy with OpenBLAS on one thread (its pool would not survive the fork): give the
    child the pool it would have had."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=os.cpu_count() or 1, user_api="blas")
    except Exception:  # noqa: BLE001 - one thread is slower, never wrong
        pass


_FORCED: list[str] = []


def main() -> int:
    from modelpex_runtime.forkserver import (
        THREADLESS_ENV,
        not_dumpable,
        own_user_namespace,
        preload,
        serve_forks,
        thread_count,
    )

    if CHANNEL_FD_ENV not in os.environ or LIFELINE_FD_ENV not in os.environ:
        sys.stderr.write("modelpex: a model pex is started by the orchestrator: use `modelpex run MODEL ...`\n")
        return 2
    lifeline = int(os.environ.pop(LIFELINE_FD_ENV))
    _arm_lifeline(lifeline)
    private = own_user_namespace()  # N.B. Before any thread exists, and while /proc/self is still ours to write.
    not_dumpable()
    channel = Channel.from_fd(int(os.environ.pop(CHANNEL_FD_ENV)))
    started = time.perf_counter()
    try:
        entry = Model.entry_from_env()
        _FORCED[:] = [name for name in THREADLESS_ENV if name not in os.environ]
        preloaded = preload(entry)
    except BaseException as exc:  # noqa: BLE001 - reported to the orchestrator, which names the model
        channel.send({"kind": "failed", "id": 0, "failure": _failure(exc)})
        return 1
    readable = [p for p in os.environ.pop(READABLE_ENV, "").split(os.pathsep) if p]
    keep = [*readable, *sys.path, sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))]
    channel.send(
        {
            "kind": "ready",
            "seconds": {"import": time.perf_counter() - started},
            "private": private,
            "preloaded": preloaded,
            "threads": thread_count(),
        }
    )
    # N.B. Only inside a PID namespace of our own (our parent is its init) is this bubblewrap's sandbox.
    sandboxed = os.environ.pop(SANDBOXED_ENV, "") == "1" and os.getppid() == 1
    return serve_forks(
        channel,
        private=private,
        sandboxed=sandboxed,
        child_main=_child_main,
        workdir=os.getcwd(),
        keep=keep,
        close_in_child=(lifeline,),
    )
