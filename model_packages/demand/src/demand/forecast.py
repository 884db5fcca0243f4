"""Train and predict for the demand model on polars frames.

The fitted state is plain numbers (a dict), so it is small and easy to inspect in the run's metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, timedelta
from typing import Any

import numpy as np
import polars as pl

COLUMNS = {"store_id", "day", "units"}


def _sales(inputs: Mapping[str, pl.DataFrame]) -> pl.DataFrame:
    sales = inputs["sales"]
    missing = sorted(COLUMNS - set(sales.columns))
    if missing:
        raise ValueError(f"demand: input 'sales' lacks columns {missing}; it has {sales.columns}")
    return sales.select(pl.col("store_id"), pl.col("day").cast(pl.Date), pl.col("units").cast(pl.Float64))


def _fit_store(days: np.ndarray, units: np.ndarray, weekdays: np.ndarray) -> dict[str, Any]:
    design = np.column_stack([np.ones_like(days), days])
    (intercept, slope), *_ = np.linalg.lstsq(design, units, rcond=None)
    residual = units - (intercept + slope * days)
    profile = [float(residual[weekdays == d].mean()) if (weekdays == d).any() else 0.0 for d in range(7)]
    return {"intercept": float(intercept), "slope": float(slope), "weekday": profile}


def train(inputs: Mapping[str, pl.DataFrame], params: Mapping[str, Any]) -> dict[str, Any]:
    """Fit a trend and a weekday profile per store on the last ``window_days`` (default 180) of sales."""
    sales = _sales(inputs)
    last = sales["day"].max()
    if last is None:
        raise ValueError("demand: input 'sales' is empty; at least one day of sales is needed to train")
    window = int(params.get("window_days", 180))
    recent = sales.filter(pl.col("day") > last - timedelta(days=window))
    epoch = last - timedelta(days=window)
    stores = {}
    for (store,), group in recent.group_by("store_id", maintain_order=True):
        days = np.array([(d - epoch).days for d in group["day"]], dtype="float64")
        weekdays = group["day"].dt.weekday().to_numpy() - 1
        stores[str(store)] = _fit_store(days, group["units"].to_numpy(), weekdays)
    return {"epoch": epoch.isoformat(), "last_day": last.isoformat(), "stores": stores}


def predict(inputs: Mapping[str, pl.DataFrame], state: Mapping[str, Any], params: Mapping[str, Any]) -> pl.DataFrame:
    """Forecast ``horizon_days`` (default 14) after the last trained day for every store in ``inputs['sales']``."""
    horizon = int(params.get("horizon_days", 14))
    epoch, last = date.fromisoformat(state["epoch"]), date.fromisoformat(state["last_day"])
    rows: dict[str, list[Any]] = {"store_id": [], "day": [], "forecast_units": []}
    for store in _sales(inputs)["store_id"].unique(maintain_order=True).to_list():
        fit = state["stores"].get(str(store))
        if fit is None:
            continue
        for step in range(1, horizon + 1):
            day = last + timedelta(days=step)
            value = fit["intercept"] + fit["slope"] * (day - epoch).days + fit["weekday"][day.weekday()]
            rows["store_id"].append(store)
            rows["day"].append(day)
            rows["forecast_units"].append(max(value, 0.0))
    return pl.DataFrame(rows, schema={"store_id": pl.Int64, "day": pl.Date, "forecast_units": pl.Float64})
