import numpy as np
import pandas as pd
import pytest
from churn.model import predict, train


def customers(n: int = 400, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "customer_id": np.arange(n),
            "tenure_months": rng.integers(1, 72, n),
            "monthly_charges": rng.uniform(20, 120, n),
            "support_calls": rng.poisson(2, n),
            "contract_months": rng.choice([1, 12, 24], n),
        }
    )
    risk = 0.04 * frame.support_calls + 0.01 * frame.monthly_charges - 0.03 * frame.tenure_months
    frame["churned"] = (risk + rng.normal(0, 0.3, n) > 0).astype(int)
    return frame


def test_learns_the_signal() -> None:
    data = customers()
    trained = train({"customers": data}, {})
    assert trained.metrics["holdout_auc"] > 0.8 and trained.metrics["holdout_rows"] == 80
    state = trained.state
    out = predict({"customers": data}, state, {"threshold": 0.5})
    assert list(out.columns) == ["customer_id", "churn_probability", "will_churn", "risk_band"]
    assert set(out.risk_band) <= {"low", "medium", "high"}
    assert (out.risk_band == "high").sum() == out.will_churn.sum()
    assert len(out) == len(data)
    assert ((out.churn_probability >= 0.5) == data.churned).mean() > 0.8


def test_threshold_moves_the_decision() -> None:
    data = customers()
    state = train({"customers": data}, {}).state
    low = predict({"customers": data}, state, {"threshold": 0.1}).will_churn.sum()
    high = predict({"customers": data}, state, {"threshold": 0.9}).will_churn.sum()
    assert low > high


@pytest.mark.parametrize("column", ["tenure_months", "monthly_charges", "support_calls", "contract_months", "churned"])
def test_missing_column_is_named(column: str) -> None:
    with pytest.raises(ValueError, match=f"lacks columns \\['{column}'\\]"):
        train({"customers": customers().drop(columns=[column])}, {})
