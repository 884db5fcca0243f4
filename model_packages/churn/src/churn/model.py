"""Train and predict for the churn model.

The modelpex contract: ``train(inputs, params)`` returns a fitted state, here with metrics (``Trained``);
``predict(inputs, state, params)`` returns a frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from modelpex_runtime import Trained
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split
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


def _pipeline(params: Mapping[str, Any]) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=float(params.get("C", 1.0)), max_iter=1000))


def train(inputs: Mapping[str, pd.DataFrame], params: Mapping[str, Any]) -> Trained:
    """Fit a scaled logistic regression on ``inputs['customers']`` (features plus the ``churned`` label).

    1.1.0 reports how well it separates churners on a fifth of the customers held out (``holdout_auc``,
    ``holdout_accuracy``), then fits the model it returns on all of them.
    """
    customers = inputs["customers"]
    x, y = _features(customers, with_label=True), customers[LABEL].astype("int64")
    x_fit, x_held, y_fit, y_held = train_test_split(x, y, test_size=0.2, random_state=0)
    probability = _pipeline(params).fit(x_fit, y_fit).predict_proba(x_held)[:, 1]
    metrics = {"holdout_accuracy": accuracy_score(y_held, probability >= 0.5), "holdout_rows": len(y_held)}
    if y_held.nunique() == 2:  # N.B. AUC needs both classes in the holdout.
        metrics["holdout_auc"] = roc_auc_score(y_held, probability)
    return Trained(_pipeline(params).fit(x, y), metrics)


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
