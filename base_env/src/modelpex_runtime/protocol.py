"""Protocol: the messages that cross the process boundary between the orchestrator and a model process.

Standard library only, so both sides import it. The orchestrator starts a model process once and sends it one
`ModelCall` per call over a Unix socket (`modelpex_runtime.channel`), with the call's descriptors attached: inputs
and states in sealed segments it can only read, outputs as pipes it writes into. A frame or a state is named by its
*slot*, its position in the descriptors that came with the call, never by a path or a segment name, so a model
process can reach no segment it was not handed. The model answers with a `ModelResult` or a `ModelFailure`, and
streams Dagster Pipes messages for the call in between. ``PROTOCOL_VERSION`` changes when a message changes shape,
independently of the package version, so a base and an orchestrator that do not speak the same protocol refuse each
other.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

# 3: ModelResult carries metrics; 4: the process is a fork server; 5: outputs and state go into pipes after the result
PROTOCOL_VERSION = 5
FRAME_LIBRARIES = ("pandas", "polars", "pyarrow")
# N.B. How a fitted state is persisted: plain data as JSON, frames as Arrow IPC, scikit-learn objects with skops
# (only the types skops trusts plus those the model declares), pickle only for a model that opts in.
STATE_FORMATS = ("json", "arrow", "skops", "pickle")

# Environment of a model process: where its channel and lifeline are, and which model it is.
CHANNEL_FD_ENV = "MODELPEX_CHANNEL_FD"
LIFELINE_FD_ENV = "MODELPEX_LIFELINE_FD"
MODEL_ENV = "MODELPEX_MODEL"
READABLE_ENV = "MODELPEX_READABLE"  # folders a child must still read under its private /tmp (PEX_ROOT), os.pathsep
# N.B. The messages-params marker the orchestrator's Pipes reader hands out: messages travel over the channel.
PIPES_CHANNEL_PARAMS = {"modelpex": "channel"}


class ModelpexError(Exception):
    """Root of every error modelpex raises, on either side of the process boundary."""


class StateError(ModelpexError):
    """A fitted state cannot be saved or loaded: a type nobody trusts, an unknown format, a failed check."""


class CallError(ModelpexError):
    """The orchestrator's call is malformed or speaks another protocol version."""


class TransportError(ModelpexError):
    """A frame could not be moved through shared memory: a malformed payload, a missing descriptor."""


class ShmSpaceError(TransportError):
    """/dev/shm has less free space than a frame needs."""


class FrameRef(TypedDict):
    """Where a frame is and what it holds; the payload is an Arrow IPC stream at the start of the segment."""

    protocol: int
    slot: int  # index into the descriptors sent with the call
    size: int  # payload bytes
    num_rows: int
    columns: list[str]  # "name: arrow type", for error messages and the UI; the IPC stream carries the schema


class StateRef(TypedDict):
    """A fitted state in a segment: its format and length (the orchestrator hashes and signs the bytes itself)."""

    slot: int
    format: str  # one of STATE_FORMATS
    size: int


class ModelCall(TypedDict):
    """What the orchestrator asks of a model process in one call."""

    protocol: int
    action: Literal["train", "predict", "train_predict"]
    inputs: dict[str, FrameRef]
    outputs: dict[str, int]  # output name -> slot of the write end of a pipe for it
    params: dict[str, Any]
    state_in: StateRef | None  # a read-only segment holding the fitted state, for predict
    state_out: int | None  # slot of a pipe's write end for the state ``train`` returns


class ModelResult(TypedDict):
    """What a call produced: output frames and the fitted state in the segments it was given."""

    protocol: int
    outputs: dict[str, FrameRef]
    state: StateRef | None
    rows_in: dict[str, int]
    seconds: dict[str, float]
    metrics: dict[str, float]  # what train reported beside the state (`modelpex_runtime.metrics`)


class ModelFailure(TypedDict):
    """The model's own exception."""

    type: str
    message: str
    traceback: str


# --- channel messages: {"kind": ...} -----------------------------------------------------------------------------
# The process the orchestrator starts is a fork server (`modelpex_runtime.forkserver`), on its control channel:
# server -> orchestrator: {"kind": "ready", "seconds": {...}, "private": bool, "preloaded": [module], "threads": int}
#                         once, after the base libraries the model names are imported (or "failed", id 0);
# orchestrator -> server: {"kind": "fork", "id": int} with 3 descriptors (the child's channel, stdout, stderr),
#                         answered {"kind": "forked", "id": int, "pid": int};
#                         {"kind": "end", "id": int, "pid": int, "grace": float}: the child is killed (after up to
#                         grace seconds to exit by itself), answered {"kind": "ended", "id": int, "returncode": int}.
# On a child's own channel:
# orchestrator -> model: {"kind": "call", "id": int, "call": ModelCall, "pipes": {env name: encoded params}}
# model -> orchestrator: {"kind": "ready", "seconds": {...}, "pid": int, "private": bool} once, after the model's
#                        modules are imported;
#                        {"kind": "pipes", "id": int, "message": a Dagster Pipes message} during a call;
#                        {"kind": "done", "id": int, "result": ModelResult}, then each output's bytes into its
#                        pipe, in the result's order, the state last; or
#                        {"kind": "failed", "id": int, "failure": ModelFailure} to end it.
# A failure before the first call (the model's modules do not import) is {"kind": "failed", "id": 0, ...}.
