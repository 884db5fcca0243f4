"""Plots: the one way every benchmark draws its PNG beside its JSON (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["pyplot", "save"]


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, imported only when a benchmark draws (it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay the figure out and write it to ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
