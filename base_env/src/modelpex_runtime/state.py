"""State: the fitted state a model's ``train`` returns, persisted between a training run and inference runs.

Plain data (dicts, lists, numbers, strings) is written as JSON and never needs trusting. Anything else (a
scikit-learn pipeline) can only be written with pickle, so such a file is loaded only after its sha256 matches the
digest the orchestrator recorded when the training run produced it: a file swapped or altered at rest is refused
before a single byte is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

from modelpex_runtime.protocol import StateError, StateRef

__all__ = ["load_state", "save_state"]


def _encode(state: Any) -> tuple[str, bytes]:
    """JSON when it gives the same value back (so tuples and numpy scalars fall back to pickle)."""
    try:
        text = json.dumps(state, sort_keys=True)
        if json.loads(text) == state:
            return "json", text.encode()
    except (TypeError, ValueError):
        pass
    return "pickle", pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)


def save_state(state: Any, path: str | os.PathLike[str]) -> StateRef:
    """Write ``state`` to ``path`` atomically and return its reference (format, sha256, size)."""
    fmt, payload = _encode(state)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".state-", delete=False) as tmp:
        tmp.write(payload)
    os.replace(tmp.name, target)
    return StateRef(path=str(target), format=fmt, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))


def load_state(ref: StateRef) -> Any:
    """Read a state file, refusing it unless its bytes hash to ``ref['sha256']``."""
    path = Path(ref["path"])
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise StateError(f"fitted state {path} cannot be read ({exc.strerror}): run training again") from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != ref["sha256"]:
        raise StateError(
            f"refusing to load fitted state {path}: its sha256 is {digest} but the training run recorded "
            f"{ref['sha256']}; the file was altered or replaced. Run training again"
        )
    if ref["format"] == "json":
        return json.loads(payload)
    if ref["format"] == "pickle":
        return pickle.loads(payload)  # N.B. Safe only because the digest above matched the recorded one.
    raise StateError(f"fitted state {path} has unknown format {ref['format']!r}: run training again")
