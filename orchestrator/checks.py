"""Checks: the asset checks on a deployment's predictions, declared from its model version, run on the output frame.

A predictions asset gets, where they apply:

- ``rows_match_input``: as many rows as the input the model's contract names (by default its only input; a model
  whose output has its own length, a forecast, declares ``rows = "any"``);
- ``no_nulls``: every column the model declares is present and holds no null;
- ``<column>_range`` / ``<column>_values``: what the model declares in ``[tool.modelpex.predictions.checks]``.

Severity ``error`` (the default) makes a check blocking: Dagster fails the prediction step when it fails and skips
what depends on the predictions in that run. ``warn`` shows the failure and blocks nothing. A null counts as outside
a range or a value set: it is not a value the model promised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetKey, MetadataValue

from orchestrator.deployments import ModelDeployment
from orchestrator.specs import ROWS_ANY, ROWS_INPUT, ColumnCheck, PredictionContract

__all__ = ["PredictionCheck", "declares_contract", "no_contract_note", "prediction_checks"]

MAX_LISTED = 10


@dataclass(frozen=True)
class PredictionCheck:
    """One check of one deployment's predictions: what it promises and how to test a frame against it."""

    name: str
    description: str
    severity: str  # "error" (blocking) or "warn"
    input: str | None = None  # rows_match_input: the input whose row count the predictions match
    columns: tuple[str, ...] = ()  # no_nulls: the declared columns
    rule: ColumnCheck | None = None  # a declared range or value set

    def spec(self, key: AssetKey) -> AssetCheckSpec:
        return AssetCheckSpec(self.name, asset=key, description=self.description, blocking=self.severity == "error")

    def result(self, key: AssetKey, table: pa.Table, rows_in: Mapping[str, int]) -> AssetCheckResult:
        """Run the check on the predictions frame; ``rows_in`` is each input's row count in the same call."""
        if self.input is not None:
            passed, metadata = _rows(table, self.input, rows_in)
        elif self.rule is not None:
            passed, metadata = _rule(table, self.rule)
        else:
            passed, metadata = _no_nulls(table, self.columns)
        severity = AssetCheckSeverity.ERROR if self.severity == "error" else AssetCheckSeverity.WARN
        return AssetCheckResult(
            asset_key=key, check_name=self.name, passed=passed, severity=severity, metadata=metadata
        )


def declares_contract(contract: PredictionContract) -> bool:
    """Whether a version declares what its predictions promise (``[tool.modelpex.predictions]``) beyond the default
    row count."""
    return contract != PredictionContract()


def no_contract_note(model: str, version: str) -> str:
    """Said on the predictions and on their checks of a version that declares no contract: a release keeps the
    checks it was released with, so its checks are few and nothing else would say why."""
    return (
        f"{model} {version} declares no prediction contract ([tool.modelpex.predictions] in its pyproject.toml), "
        "so its predictions' columns and values are not checked."
    )


def prediction_checks(d: ModelDeployment, contract: PredictionContract, version: str = "") -> list[PredictionCheck]:
    """The checks of ``d``'s predictions under the contract of the model version it runs (``version``, named in the
    checks' descriptions when it declares no contract)."""
    checks = []
    rows_input = _rows_input(d, contract)
    if rows_input is not None:
        description = f"as many rows as the input {rows_input!r}"
        if not declares_contract(contract):
            description += f". {no_contract_note(d.model, version or d.version)}"
        checks.append(PredictionCheck("rows_match_input", description, "error", input=rows_input))
    if contract.columns:
        described = ", ".join(contract.columns)
        checks.append(
            PredictionCheck("no_nulls", f"columns {described} present, never null", "error", columns=contract.columns)
        )
    checks += [PredictionCheck(c.name, c.describe(), c.severity, rule=c) for c in contract.checks]
    return checks


def _rows_input(d: ModelDeployment, contract: PredictionContract) -> str | None:
    """The input the predictions must match row for row, or ``None`` (``rows = "any"``, or no single input)."""
    if contract.rows == ROWS_ANY:
        return None
    if contract.rows == ROWS_INPUT:
        return next(iter(d.inputs)) if len(d.inputs) == 1 else None
    return contract.rows if contract.rows in d.inputs else None


def _rows(table: pa.Table, name: str, rows_in: Mapping[str, int]) -> tuple[bool, dict[str, Any]]:
    expected = rows_in.get(name)
    return table.num_rows == expected, {"rows": table.num_rows, f"rows of {name}": expected}


def _no_nulls(table: pa.Table, columns: tuple[str, ...]) -> tuple[bool, dict[str, Any]]:
    missing = [c for c in columns if c not in table.column_names]
    nulls = {c: table[c].null_count for c in columns if c in table.column_names}
    metadata: dict[str, Any] = {"nulls": MetadataValue.json(nulls)}
    if missing:
        metadata["missing columns"] = ", ".join(missing)
    return not missing and not any(nulls.values()), metadata


def _rule(table: pa.Table, rule: ColumnCheck) -> tuple[bool, dict[str, Any]]:
    if rule.column not in table.column_names:
        return False, {"problem": f"the predictions have no column {rule.column!r}"}
    column = table[rule.column]
    if rule.values:
        return _in_set(column, rule.values)
    return _in_range(column, rule.min, rule.max)


def _in_range(column: pa.ChunkedArray, low: float | None, high: float | None) -> tuple[bool, dict[str, Any]]:
    try:
        values = pc.cast(column, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False, {"problem": f"the column is {column.type}, not numeric"}
    outside = values.null_count
    if low is not None:
        outside += pc.sum(pc.less(values, low)).as_py() or 0
    if high is not None:
        outside += pc.sum(pc.greater(values, high)).as_py() or 0
    observed = {k: v for k, v in pc.min_max(values).as_py().items() if v is not None}
    return outside == 0, {"rows outside": outside, **observed}


def _in_set(column: pa.ChunkedArray, allowed: tuple[object, ...]) -> tuple[bool, dict[str, Any]]:
    """N.B. Compared in Python on the distinct values: a frame's few classes, whatever their Arrow type."""
    unexpected = [v for v in pc.unique(column).to_pylist() if v is not None and v not in allowed]
    outside = column.null_count
    if unexpected:
        kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        outside += pc.sum(pc.is_in(column, value_set=pa.array(unexpected, type=kind))).as_py() or 0
    metadata: dict[str, Any] = {"rows outside": outside}
    if unexpected:
        metadata["unexpected values"] = ", ".join(map(str, unexpected[:MAX_LISTED]))
    return outside == 0, metadata
