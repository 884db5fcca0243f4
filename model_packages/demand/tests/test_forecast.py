from datetime import date, timedelta

import numpy as np
import polars as pl
import pytest
from demand.forecast import predict, train


def sales(stores: int = 3, days: int = 200) -> pl.DataFrame:
    start = date(2026, 1, 1)
    rows = []
    for store in range(stores):
        for offset in range(days):
            day = start + timedelta(days=offset)
            weekend = 30.0 if day.weekday() >= 5 else 0.0
            rows.append((store, day, 100 + 10 * store + 0.5 * offset + weekend))
    return pl.DataFrame(rows, schema={"store_id": pl.Int64, "day": pl.Date, "units": pl.Float64}, orient="row")


def test_recovers_trend_and_weekends() -> None:
    data = sales()
    state = train({"sales": data}, {"window_days": 120})
    out = predict({"sales": data}, state, {"horizon_days": 7})
    assert out.shape == (21, 3)
    store0 = out.filter(pl.col("store_id") == 0).sort("day")
    last = data["day"].max()
    expected = [100 + 0.5 * ((d - date(2026, 1, 1)).days) + (30 if d.weekday() >= 5 else 0) for d in store0["day"]]
    assert np.allclose(store0["forecast_units"].to_numpy(), expected, atol=1.0)
    assert store0["day"].min() == last + timedelta(days=1)


def test_empty_sales_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        train({"sales": sales().clear()}, {})
