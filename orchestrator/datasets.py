"""Datasets: the example input data (generated in code, seeded) and reading a client's own files.

Each client's dataset is a small, replaceable Dagster asset; a real deployment points ``path`` at its own data
(or replaces the asset) without touching anything downstream, which only ever sees an Arrow table.
"""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet

from orchestrator.errors import ModelpexError

__all__ = ["applicants", "customers", "load_dataset", "sales"]


def customers(rows: int = 2000, seed: int = 0) -> pa.Table:
    """Customers with churn drivers and a noisy ``churned`` label (for the churn model)."""
    rng = np.random.default_rng(seed)
    tenure = rng.integers(1, 72, rows)
    charges = rng.uniform(20, 120, rows)
    calls = rng.poisson(2, rows)
    contract = rng.choice([1, 12, 24], rows)
    risk = 0.5 * calls + 0.02 * charges - 0.05 * tenure - 0.05 * contract
    return pa.table(
        {
            "customer_id": np.arange(rows, dtype="int64"),
            "tenure_months": tenure,
            "monthly_charges": charges,
            "support_calls": calls,
            "contract_months": contract,
            "churned": (risk + rng.normal(0, 0.7, rows) > 0).astype("int64"),
        }
    )


def sales(stores: int = 5, days: int = 365, seed: int = 0, end: str = "2026-11-01") -> pa.Table:
    """Daily units per store: a trend, a weekend bump and noise (for the demand model)."""
    rng = np.random.default_rng(seed)
    last = date.fromisoformat(end)
    day = np.array([last - timedelta(days=days - 1 - i) for i in range(days)] * stores)
    store = np.repeat(np.arange(stores, dtype="int64"), days)
    offset = np.tile(np.arange(days), stores)
    weekend = np.array([d.weekday() >= 5 for d in day]) * 25.0
    units = 80 + 15 * store + 0.1 * offset + weekend + rng.normal(0, 5, stores * days)
    return pa.table({"store_id": store, "day": pa.array(day, pa.date32()), "units": np.maximum(units, 0)})


def applicants(rows: int = 2000, seed: int = 0) -> pa.Table:
    """Loan applicants with income and debt (for the credit_risk model)."""
    rng = np.random.default_rng(seed)
    income = rng.lognormal(10.5, 0.4, rows)
    return pa.table(
        {
            "applicant_id": np.arange(rows, dtype="int64"),
            "income": income,
            "debt": income * rng.beta(2, 5, rows),
        }
    )


_GENERATORS = {"customers": customers, "sales": sales, "applicants": applicants}


def load_dataset(generate: str | None, path: Path | None, options: dict[str, Any]) -> pa.Table:
    """The table a dataset source describes; a bad file or option is a one-line error naming it."""
    if generate is not None:
        try:
            return _GENERATORS[generate](**options)
        except TypeError as exc:
            raise ModelpexError(f"dataset generator {generate!r} rejected options {options}: {exc}") from None
    assert path is not None
    try:
        return pyarrow.csv.read_csv(path) if path.suffix == ".csv" else pyarrow.parquet.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ModelpexError(f"dataset file {path} cannot be read ({exc}): fix the path in deployments.yaml") from None
