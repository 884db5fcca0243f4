"""The model-side runtime of modelpex: the small, stable half that lives in the base pex.

It reads a model's input frames from shared memory, calls the model's ``train``/``predict``, writes the
outputs back and reports through Dagster Pipes. The orchestrator imports the same modules, so both sides
speak one versioned protocol.

``Trained`` is what a model's ``train`` may return to report metrics beside its fitted state.
"""

from modelpex_runtime.metrics import Trained

__all__ = ["Trained"]
