"""The process-boundary protocol between the orchestrator and the model process (placeholder until merge)."""


class ModelpexError(Exception):
    """Root of every error modelpex raises, on either side of the process boundary."""
