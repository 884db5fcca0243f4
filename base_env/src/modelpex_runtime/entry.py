"""Entry: the model process's main, run as ``python -m modelpex_runtime`` inside every model pex.

It reads which model it is from ``MODELPEX_MODEL`` (frozen into the pex at build time), the call from the
``modelpex`` Pipes extra, maps the input frames out of shared memory, calls the model's ``train``/``predict``,
writes the outputs and fitted state back, and reports a `ModelResult` or the model's own exception as Pipes
custom messages, so the orchestrator can show the model's traceback rather than an exit code.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from modelpex_runtime.protocol import PROTOCOL_VERSION, CallError, ModelCall, ModelFailure, ModelResult
from modelpex_runtime.state import load_state, save_state

__all__ = ["execute", "main"]

PREDICTIONS = "predictions"


def _entry() -> dict[str, str]:
    try:
        return json.loads(os.environ["MODELPEX_MODEL"])
    except (KeyError, json.JSONDecodeError):
        raise CallError("MODELPEX_MODEL is missing or not JSON: run a pex built by `modelpex build`") from None


def _callable(target: str) -> Callable[..., Any]:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _call(extras: Mapping[str, Any]) -> ModelCall:
    call = extras.get("modelpex")
    if not isinstance(call, dict):
        raise CallError("the Pipes extras carry no 'modelpex' call: launch models through modelpex's runner")
    if call.get("protocol") != PROTOCOL_VERSION:
        raise CallError(
            f"the orchestrator speaks modelpex protocol {call.get('protocol')!r}, this base speaks "
            f"{PROTOCOL_VERSION}: rebuild the base and the model with the orchestrator's version"
        )
    return call  # type: ignore[return-value]


def _named_outputs(result: Any, wanted: Mapping[str, str]) -> dict[str, Any]:
    """``predict`` returns one frame (the ``predictions`` output) or a mapping of output name to frame."""
    frames = dict(result) if isinstance(result, Mapping) else {PREDICTIONS: result}
    unknown = sorted(set(frames) - set(wanted))
    if unknown:
        raise CallError(f"predict returned outputs {unknown} that were not asked for; expected {sorted(wanted)}")
    return frames


def execute(entry: Mapping[str, str], call: ModelCall, log: logging.Logger) -> ModelResult:
    """Run one call of the model in this process; everything the orchestrator needs comes back in the result."""
    from modelpex_runtime.transport import read_frame, write_frame

    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - clock
        clock = now

    train, predict = _callable(entry["train"]), _callable(entry["predict"])
    lap("import")
    inputs = {name: read_frame(ref, entry["frames"]) for name, ref in call["inputs"].items()}
    lap("read")
    params, state_ref = call["params"], None
    if call["action"] in ("train", "train_predict"):
        log.info(f"training {entry['name']} {entry['version']} on {', '.join(inputs) or 'no inputs'}")
        state = train(inputs, params)
        lap("train")
        if call["state_out"]:
            state_ref = save_state(state, call["state_out"])
            lap("state")
    else:
        if call["state_in"] is None:
            raise CallError("predict needs a fitted state: train first, or pass the state of a training run")
        state = load_state(call["state_in"])
        lap("state")
    outputs = {}
    if call["action"] in ("predict", "train_predict"):
        log.info(f"predicting with {entry['name']} {entry['version']}")
        frames = _named_outputs(predict(inputs, state, params), call["outputs"])
        lap("predict")
        outputs = {
            name: write_frame(frame, call["outputs"][name], f"output {name!r} of {entry['name']} {entry['version']}")
            for name, frame in frames.items()
        }
        lap("write")
    rows_in = {name: int(ref["num_rows"]) for name, ref in call["inputs"].items()}
    return ModelResult(protocol=PROTOCOL_VERSION, outputs=outputs, state=state_ref, rows_in=rows_in, seconds=seconds)


def _failure(exc: BaseException) -> ModelFailure:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return ModelFailure(type=name, message=str(exc), traceback="".join(traceback.format_exception(exc)))


def main() -> int:
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        sys.stderr.write("modelpex: a model pex is started by the orchestrator: use `modelpex run MODEL ...`\n")
        return 2
    with open_dagster_pipes() as pipes:
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        for handler in pipes.log.handlers:  # N.B. The model's own loggers reach Dagster too.
            root.addHandler(handler)
        try:
            result = execute(_entry(), _call(pipes.extras), pipes.log)
        except BaseException as exc:
            pipes.report_custom_message({"modelpex_error": _failure(exc)})
            raise
        pipes.report_custom_message({"modelpex_result": result})
    return 0
