"""Metrics: what a model's ``train`` reports about the model it fitted, returned beside the fitted state.

``train`` returns ``Trained(state, metrics={"auc": 0.83})`` instead of the bare state. The runtime persists the state
as usual and sends the metrics back with the call's result; the orchestrator shows each one as numeric metadata of
the state's materialisation (``metric/auc``), which Dagster plots across runs. Metrics are checked here, in the
model's process, so a bad one fails the call with the model's own traceback.

A model can report through Dagster Pipes instead, or as well: ``PipesContext.get().report_asset_materialization(
metadata={...})`` during ``train`` or ``predict`` adds metadata to the asset that call materialises.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from modelpex_runtime.protocol import CallError

__all__ = ["MAX_METRICS", "Trained", "checked_metrics", "split_trained"]

MAX_METRICS = 100
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,62}$")


@dataclass(frozen=True)
class Trained:
    """What ``train`` may return: the fitted state and numbers that say how good it is."""

    state: Any
    metrics: Mapping[str, float] = field(default_factory=dict)


def checked_metrics(metrics: object, where: str) -> dict[str, float]:
    """``metrics`` as ``{name: float}``; anything else raises a `CallError` naming the metric and the fix."""
    if not isinstance(metrics, Mapping):
        raise CallError(f"{where}: metrics must be a mapping of name to number, got {type(metrics).__name__}")
    if len(metrics) > MAX_METRICS:
        raise CallError(f"{where}: {len(metrics)} metrics; report at most {MAX_METRICS}")
    checked = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise CallError(f"{where}: metric name {name!r} must be 1-63 letters, digits, '_', '.' or '-'")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CallError(f"{where}: metric {name!r} = {value!r} is not a finite number")
        checked[name] = float(value)
    return checked


def split_trained(result: Any, where: str) -> tuple[Any, dict[str, float]]:
    """The fitted state and the checked metrics of what ``train`` returned (a bare state has none)."""
    if isinstance(result, Trained):
        return result.state, checked_metrics(result.metrics, where)
    return result, {}
