import pyarrow as pa
import pytest
from credit_risk.scoring import BANDS, predict, train
from pydantic import ValidationError


def applicants(n: int = 1000) -> pa.Table:
    return pa.table(
        {
            "applicant_id": pa.array(range(n), pa.int64()),
            "income": pa.array([1000.0 + i for i in range(n)]),
            "debt": pa.array([float(i) for i in range(n)]),
        }
    )


def test_bands_follow_the_quantiles() -> None:
    book = applicants()
    state = train({"applicants": book}, {"quantiles": [0.25, 0.5, 0.75]})
    out = predict({"applicants": book}, state, {})
    counts = {band: out["band"].to_pylist().count(band) for band in BANDS}
    assert all(240 <= c <= 260 for c in counts.values()), counts


def test_bad_row_is_rejected() -> None:
    book = applicants().set_column(1, "income", pa.array([0.0] * 1000))
    with pytest.raises(ValidationError, match="income"):
        train({"applicants": book}, {})


def test_bad_params_are_rejected() -> None:
    with pytest.raises(ValidationError, match="increasing"):
        train({"applicants": applicants()}, {"quantiles": [0.9, 0.5, 0.1]})
