"""State: the fitted state a model's ``train`` returns, as bytes that can be loaded again without running code.

Formats, tried in this order unless the model names one (``state = "..."`` in ``[tool.modelpex]``):

- ``json``: plain data that comes back equal (dicts, lists, numbers, strings);
- ``arrow``: a pandas, polars or Arrow frame, as an Arrow IPC stream (loaded in the model's frame library);
- ``skops``: scikit-learn estimators and pipelines, numpy arrays and containers of them. Loading trusts skops'
  own defaults plus exactly the types the model declares in ``trusted_types``; a state that needs any other type
  fails when it is *saved*, naming the types, so a bad state is caught at training rather than at inference;
- ``pickle``: only for a model that opts in with ``state = "pickle"``. The orchestrator signs such a state with a
  key the model cannot read and refuses to hand it back unless the signature holds.

The orchestrator hashes and signs the bytes; this module only turns objects into bytes and back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from modelpex_runtime.protocol import STATE_FORMATS, StateError

__all__ = ["decode_state", "encode_state"]


def _json(state: Any) -> bytes | None:
    try:
        text = json.dumps(state, sort_keys=True, allow_nan=False)
        return text.encode() if json.loads(text) == state else None
    except (TypeError, ValueError):
        return None


def _is_frame(state: Any) -> bool:
    module, kind = type(state).__module__.partition(".")[0], type(state).__name__
    return (module in ("pandas", "polars") and kind == "DataFrame") or (module == "pyarrow" and kind == "Table")


def _arrow(state: Any) -> bytes:
    import pyarrow as pa

    from modelpex_runtime.transport import to_arrow

    table = to_arrow(state, "the fitted state")
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _skops(state: Any, model: str, trusted: Sequence[str]) -> bytes:
    import skops.io as sio

    try:
        payload = sio.dumps(state)
    except Exception as exc:  # noqa: BLE001 - skops raises many kinds for objects it cannot persist
        raise StateError(
            f"{model}: train returned a {type(state).__module__}.{type(state).__qualname__}, which is not plain "
            f"data, a frame, or an object skops can persist ({exc}). Return one of those, or opt into signed "
            'pickle with state = "pickle" in [tool.modelpex]'
        ) from None
    untrusted = sorted(set(sio.get_untrusted_types(data=payload)) - set(trusted))
    if untrusted:
        raise StateError(
            f"{model}: the fitted state needs types that skops does not trust by default: {untrusted}. If they "
            "are yours to trust, add them to [tool.modelpex] trusted_types in the model's pyproject.toml (or opt "
            'into signed pickle with state = "pickle")'
        )
    return payload


def encode_state(state: Any, *, model: str, fmt: str = "auto", trusted: Sequence[str] = ()) -> tuple[str, bytes]:
    """(format, bytes) of a fitted state, in ``fmt`` or the first format of json, arrow, skops that fits."""
    if fmt == "pickle":
        import pickle

        return "pickle", pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    if fmt in ("auto", "json") and (payload := _json(state)) is not None:
        return "json", payload
    if fmt == "json":
        raise StateError(f'{model}: state = "json" but train returned a {type(state).__name__}, not plain data')
    if fmt in ("auto", "arrow") and _is_frame(state):
        return "arrow", _arrow(state)
    if fmt == "arrow":
        raise StateError(f'{model}: state = "arrow" but train returned a {type(state).__name__}, not a frame')
    return "skops", _skops(state, model, trusted)


def decode_state(
    fmt: str, payload: bytes, *, model: str, frames: str, trusted: Sequence[str] = (), allow_pickle: bool = False
) -> Any:
    """The state object back from its bytes; skops loads only its defaults and ``trusted``, pickle only if allowed."""
    if fmt == "json":
        return json.loads(payload)
    if fmt == "arrow":
        import pyarrow as pa

        from modelpex_runtime.transport import from_arrow

        with pa.ipc.open_stream(pa.py_buffer(payload)) as reader:
            return from_arrow(reader.read_all(), frames)
    if fmt == "skops":
        import skops.io as sio

        try:
            return sio.loads(payload, trusted=list(trusted))
        except Exception as exc:  # noqa: BLE001 - skops' UntrustedTypesFoundException and its parse errors
            raise StateError(f"{model}: refusing to load the fitted state with skops: {exc}") from None
    if fmt == "pickle" and allow_pickle:
        import pickle

        return pickle.loads(payload)  # N.B. The orchestrator verified its signature before handing it over.
    if fmt == "pickle":
        raise StateError(f'{model}: refusing a pickled state: the model does not opt in with state = "pickle"')
    raise StateError(f"{model}: unknown state format {fmt!r}; expected one of {', '.join(STATE_FORMATS)}")
