"""Fitted states: each kind of state in the format that loads it without running code, skops' trust list, and
pickle only for a model that opts in."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from modelpex_runtime.protocol import StateError
from modelpex_runtime.state import decode_state, encode_state
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

TREE_PREDICTOR = "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"
X = np.random.default_rng(0).normal(size=(200, 3))
Y = (X[:, 0] + X[:, 1] > 0).astype(int)


def test_plain_data_is_json_and_frames_are_arrow() -> None:
    assert encode_state({"mean": 1.5, "n": [1, 2]}, model="m") == ("json", b'{"mean": 1.5, "n": [1, 2]}')
    fmt, payload = encode_state(pd.DataFrame({"a": [1, 2]}), model="m")
    assert fmt == "arrow"
    back = decode_state(fmt, payload, model="m", frames="polars")
    assert back["a"].to_list() == [1, 2] and type(back).__module__.startswith("polars")
    assert encode_state((1, 2), model="m")[0] == "skops", "a tuple does not come back from JSON as itself"


def test_a_scaled_logistic_regression_needs_no_trusted_type() -> None:
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, Y)
    fmt, payload = encode_state(model, model="churn 1.1.0")
    assert fmt == "skops"
    back = decode_state(fmt, payload, model="churn 1.1.0", frames="pandas")
    np.testing.assert_array_equal(back.predict_proba(X), model.predict_proba(X))


def test_a_gradient_boosting_model_needs_its_type_declared() -> None:
    model = HistGradientBoostingClassifier(max_iter=5).fit(X, Y)
    with pytest.raises(StateError, match=f"does not trust by default: \\['{TREE_PREDICTOR}'\\].*trusted_types"):
        encode_state(model, model="m 1.0.0")
    fmt, payload = encode_state(model, model="m 1.0.0", trusted=[TREE_PREDICTOR])
    with pytest.raises(StateError, match="refusing to load the fitted state with skops"):
        decode_state(fmt, payload, model="m 1.0.0", frames="pandas")
    back = decode_state(fmt, payload, model="m 1.0.0", frames="pandas", trusted=[TREE_PREDICTOR])
    np.testing.assert_array_equal(back.predict(X), model.predict(X))


def test_pickle_only_with_the_opt_in() -> None:
    fmt, payload = encode_state({"a": pa.table({"x": [1]})}, model="m", fmt="pickle")
    assert fmt == "pickle"
    with pytest.raises(StateError, match='does not opt in with state = "pickle"'):
        decode_state(fmt, payload, model="m", frames="pyarrow")
    assert decode_state(fmt, payload, model="m", frames="pyarrow", allow_pickle=True)["a"].num_rows == 1


def test_a_declared_format_is_held_to() -> None:
    with pytest.raises(StateError, match='state = "json" but train returned a DataFrame'):
        encode_state(pd.DataFrame({"a": [1]}), model="m", fmt="json")
    with pytest.raises(StateError, match="unknown state format 'yaml'"):
        decode_state("yaml", b"", model="m", frames="pandas")


def test_two_trainers_whose_states_have_the_same_bytes_keep_their_own_records(tmp_path) -> None:
    """Regression: states were kept by their bytes' digest alone, so acme's state (m 1.0.0) and globex's (m 1.1.0),
    equal byte for byte, shared one record, the last training's, and acme's next prediction was refused."""
    from orchestrator.run import FittedState
    from orchestrator.states import StateKeeper
    from orchestrator.store import ArtifactRecord, LocalPexStore

    keeper = StateKeeper(LocalPexStore(tmp_path / "store"), tmp_path / "key")
    old, new = (ArtifactRecord("model", "m", version, key=f"{n:032x}") for n, version in ((1, "1.0.0"), (2, "1.1.0")))
    state = FittedState("json", b'{"mean": 1.5}')
    acme, globex = keeper.save(old, "acme", "run", state), keeper.save(new, "globex", "run", state)
    assert acme.sha256 == globex.sha256
    assert keeper.load(old, acme.sha256, "acme") == keeper.load(new, globex.sha256, "globex") == state
