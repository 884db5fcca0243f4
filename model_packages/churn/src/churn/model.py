"""Train and predict for the churn model.

The modelpex contract: ``train(inputs, params)`` returns a fitted state; ``predict(inputs, state, params)`` a frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

FEATURES = ["tenure_months", "monthly_charges", "support_calls", "contract_months"]
LABEL = "churned"


def _features(frame: pd.DataFrame, *, with_label: bool = False) -> pd.DataFrame:
    needed = [*FEATURES, LABEL] if with_label else FEATURES
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"churn: input 'customers' lacks columns {missing}; it has {list(frame.columns)}")
    return frame[FEATURES].astype("float64")


def train(inputs: Mapping[str, pd.DataFrame], params: Mapping[str, Any]) -> Pipeline:
    """Fit a scaled logistic regression on ``inputs['customers']`` (features plus the ``churned`` label)."""
    customers = inputs["customers"]
    x = _features(customers, with_label=True)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=float(params.get("C", 1.0)), max_iter=1000))
    model.fit(x, customers[LABEL].astype("int64"))
    return model


RISK_BANDS = ["low", "medium", "high"]


def predict(inputs: Mapping[str, pd.DataFrame], state: Pipeline, params: Mapping[str, Any]) -> pd.DataFrame:
    """Churn probability per customer, whether it crosses the client's ``threshold`` (default 0.5), and a band.

    1.1.0 adds ``risk_band`` (low below half the threshold, high above it) for the retention team's call lists.
    """
    customers = inputs["customers"]
    probability = state.predict_proba(_features(customers))[:, 1]
    threshold = float(params.get("threshold", 0.5))
    band = pd.cut(probability, [-0.01, threshold / 2, threshold, 1.01], labels=RISK_BANDS).astype(str)
    return pd.DataFrame(
        {
            "customer_id": customers["customer_id"].to_numpy(),
            "churn_probability": probability,
            "will_churn": probability >= threshold,
            "risk_band": band,
        }
    )
