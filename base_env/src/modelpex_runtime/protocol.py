"""The process-boundary protocol between the orchestrator and the model process (placeholder until merge)."""

from __future__ import annotations

from typing import Any, Literal, TypedDict

PROTOCOL_VERSION = 1


class ModelpexError(Exception):
    """Root of every error modelpex raises, on either side of the process boundary."""


class StateError(ModelpexError):
    """A fitted state file is missing, altered, or in a format this runtime cannot read."""


class CallError(ModelpexError):
    """The orchestrator's call is malformed or speaks another protocol version."""


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
