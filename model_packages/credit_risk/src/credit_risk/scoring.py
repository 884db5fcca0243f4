"""Train and predict for the credit risk model on pyarrow tables, with pydantic-validated inputs and params.

Training reports its cut points through Dagster Pipes (``report_asset_materialization``), the other way a model
can report metrics: they land on the state's materialisation beside modelpex's own metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from dagster_pipes import PipesContext
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

BANDS = ("low", "medium", "high", "very_high")


class Params(BaseModel):
    """Client parameters: the quantiles of debt-to-income that separate the four bands."""

    model_config = ConfigDict(extra="forbid")
    quantiles: list[float] = Field(default=[0.5, 0.8, 0.95], min_length=3, max_length=3)

    @field_validator("quantiles")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        if not all(0 < a < b < 1 for a, b in zip(value, value[1:], strict=False)) or not 0 < value[0] < 1:
            raise ValueError("quantiles must be strictly increasing and between 0 and 1")
        return value


class Applicant(BaseModel):
    applicant_id: int
    income: float = Field(gt=0)
    debt: float = Field(ge=0)


_ROWS = TypeAdapter(list[Applicant])


def _validated(table: pa.Table) -> pa.Table:
    """Reject the whole table, naming the first bad row, if any row breaks the `Applicant` schema."""
    _ROWS.validate_python(table.select(["applicant_id", "income", "debt"]).to_pylist())
    return table


def _ratio(table: pa.Table) -> pa.ChunkedArray:
    return pc.divide(pc.cast(table["debt"], pa.float64()), pc.cast(table["income"], pa.float64()))


def train(inputs: Mapping[str, pa.Table], params: Mapping[str, Any]) -> dict[str, Any]:
    """Learn the debt-to-income cut points of the client's book of ``applicants``."""
    settings = Params.model_validate(dict(params))
    book = _validated(inputs["applicants"])
    if book.num_rows == 0:
        raise ValueError("credit_risk: input 'applicants' is empty; cut points need at least one applicant")
    cuts = pc.quantile(_ratio(book), q=settings.quantiles).to_pylist()
    if PipesContext.is_initialized():  # N.B. Not when called from a test or a notebook.
        metrics = {f"cut_{q:g}": cut for q, cut in zip(settings.quantiles, cuts, strict=True)}
        PipesContext.get().report_asset_materialization(metadata={**metrics, "trained_rows": book.num_rows})
    return {"cuts": cuts, "quantiles": settings.quantiles, "trained_rows": book.num_rows}


def predict(inputs: Mapping[str, pa.Table], state: Mapping[str, Any], params: Mapping[str, Any]) -> pa.Table:
    """A risk band per applicant from the learned cut points."""
    table = _validated(inputs["applicants"])
    ratio = _ratio(table)
    band = pa.array([BANDS[sum(r > c for c in state["cuts"])] for r in ratio.to_pylist()], pa.string())
    return pa.table({"applicant_id": table["applicant_id"], "debt_to_income": ratio, "band": band})
