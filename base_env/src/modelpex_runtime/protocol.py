"""Protocol: the messages that cross the process boundary between the orchestrator and the model process.

Standard library only, so both sides import it: the orchestrator sends a `ModelCall` (as the ``modelpex`` Dagster
Pipes extra) whose frames are `FrameRef`s to shared-memory segments; the model answers with a `ModelResult` or a
`ModelFailure` (Pipes custom messages). ``PROTOCOL_VERSION`` changes when a message changes shape, independently
of the package version, so a base and an orchestrator that do not speak the same protocol refuse each other.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypedDict

PROTOCOL_VERSION = 1
# N.B. `mpx_<owner pid>_<64 random bits>`: unguessable, attributable to the process that must unlink it, and within
# macOS's 31-character limit for POSIX shared-memory names.
SEGMENT_PREFIX = "mpx_"
SEGMENT_NAME = re.compile(r"^mpx_(?P<pid>[0-9]{1,10})_[0-9a-f]{16}$")
FRAME_LIBRARIES = ("pandas", "polars", "pyarrow")


class ModelpexError(Exception):
    """Root of every error modelpex raises, on either side of the process boundary."""


class StateError(ModelpexError):
    """A fitted state file is missing, altered, or in a format this runtime cannot read."""


class CallError(ModelpexError):
    """The orchestrator's call is malformed or speaks another protocol version."""


class TransportError(ModelpexError):
    """A frame could not be moved through shared memory: a bad name, a malformed payload, a missing segment."""


class ShmSpaceError(TransportError):
    """/dev/shm has less free space than a frame needs."""


# --- frames: one Arrow IPC stream in one shared-memory segment ------------------------------------------------


class FrameRef(TypedDict):
    """Where a frame is and what it holds; the payload is an Arrow IPC stream at the start of the segment."""

    protocol: int
    segment: str  # a SEGMENT_NAME, created and unlinked by the orchestrator
    size: int  # payload bytes
    num_rows: int
    columns: list[str]  # "name: arrow type", for error messages and the UI; the IPC stream carries the schema


# --- run-level messages: one model call and its answer --------------------------------------------------------


class StateRef(TypedDict):
    """A fitted state file and the digest it must have when it is loaded again."""

    path: str
    format: Literal["json", "pickle"]
    sha256: str
    size: int


class ModelCall(TypedDict):
    """What the orchestrator asks of one model process (sent as the ``modelpex`` Pipes extra)."""

    protocol: int
    action: Literal["train", "predict", "train_predict"]
    inputs: dict[str, Any]  # name -> FrameRef
    outputs: dict[str, str]  # name -> segment name pre-assigned by the orchestrator
    params: dict[str, Any]
    state_in: StateRef | None
    state_out: str | None  # where ``train`` writes the fitted state


class ModelResult(TypedDict):
    """What the model process reports back (a Pipes custom message ``{"modelpex_result": ...}``)."""

    protocol: int
    outputs: dict[str, Any]  # name -> FrameRef
    state: StateRef | None
    rows_in: dict[str, int]
    seconds: dict[str, float]


class ModelFailure(TypedDict):
    """The model's own exception (a Pipes custom message ``{"modelpex_error": ...}``)."""

    type: str
    message: str
    traceback: str
