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
    "ModelpexWarning",
    "PlatformError",
    "RecordError",
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


class RecordError(StoreError):
    """An index record is unreadable, or is not the record of the artifact it is filed as: it is never trusted."""

    where: str = ""  # the record's file or URL
    problem: str = ""  # what is wrong with it, without the fix


class ModelpexWarning(UserWarning):
    """Something was skipped or kept so that the rest could go on (a bad model folder, an unreadable record).

    The CLI prints it as one ``warning:`` line; elsewhere it is an ordinary Python warning.
    """


class PlatformError(ModelpexError):
    """A complete platform file is not valid, or an artifact was built for another platform than this worker's."""


class SandboxError(ModelpexError):
    """A model process cannot be isolated as configured: no model user, an unreachable interpreter or cache."""
