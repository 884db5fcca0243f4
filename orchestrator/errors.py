"""The errors modelpex raises: one root, one subclass per step of the data path.

They are plain ``Exception`` subclasses (not Dagster errors) so Dagster retry policies act on them, and each
message names the thing, the problem and the fix, because the CLI prints it as the one line a user sees.
"""

from __future__ import annotations

from modelpex_runtime.protocol import ModelpexError

__all__ = [
    "BuildError",
    "DependencyConflictError",
    "IntegrityError",
    "ModelpexError",
    "SandboxError",
    "SpecError",
    "StoreError",
]


class SpecError(ModelpexError):
    """A model folder, base environment, name or version is not what modelpex can build."""


class BuildError(ModelpexError):
    """pex (or the wheel build before it) failed for a base or a model."""


class DependencyConflictError(BuildError):
    """A model asks for a version of a package that the base pins differently."""


class StoreError(ModelpexError):
    """The artifact store cannot find, write or list an artifact."""


class IntegrityError(StoreError):
    """An artifact's bytes do not match the sha256 recorded when it was built."""


class SandboxError(ModelpexError):
    """A model process cannot be isolated as configured: no model user, an unreachable interpreter or cache."""
