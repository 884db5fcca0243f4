"""Runner: what one orchestrator process needs to run model versions, assembled once from the settings.

The Dagster resource and the command line both run models through a `Runner`: it finds a version's base in the
store, prepares the pair in the cache (verified, venv warm), hands the call to the client's child of the version's
fork server (`orchestrator.run`: started in the sandbox on first use, re-used for that client after, never for
another), and keeps fitted states with signed records. ``close`` ends every model process it started; use it as a
context manager.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from orchestrator.cache import ArtifactCache, Prepared
from orchestrator.errors import ModelpexError
from orchestrator.platforms import Interpreter
from orchestrator.run import DEFAULT_ENV_ALLOW, ModelProcesses, PipesLink, RunOutcome
from orchestrator.sandbox import Sandbox
from orchestrator.settings import Settings
from orchestrator.states import StateKeeper
from orchestrator.store import ArtifactRecord

__all__ = ["Runner"]

log = logging.getLogger("modelpex")
# N.B. Process-wide: a Dagster run or a command may make several runners, and says who models run as once.
_announced: set[str] = set()


class Runner:
    """Runs model versions for one project and store; one per Dagster run or CLI command."""

    def __init__(
        self,
        settings: Settings,
        interpreter: Interpreter,
        *,
        timeout: float | None = None,
        env_allow: Sequence[str] = DEFAULT_ENV_ALLOW,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.timeout = timeout or settings.timeout
        self.store = settings.store()
        self.sandbox = Sandbox.create(settings.cache_dir, settings.isolation, settings.model_user, settings.sandbox)
        self.cache = ArtifactCache(settings.cache_dir, settings.model_pex_root, interpreter)
        self.sandbox.check_reachable(settings.model_pex_root, "PEX_ROOT")
        self.sandbox.check_reachable(interpreter.path, "the interpreter")
        self.processes = ModelProcesses(self.sandbox, env_allow=env_allow, env=env)
        self.states = StateKeeper(self.store, settings.signing_key_path)

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prepare(self, model: ArtifactRecord) -> Prepared:
        """The model version and its base, verified and unpacked, ready for a model process."""
        if model.base_key is None:
            raise ModelpexError(f"{model.label} has no base key in the index: rebuild it with `modelpex build`")
        base = self.store.record("base", "base", model.base_key)
        if base is None:
            raise ModelpexError(
                f"{model.label} was built against base {model.base_key}, which is not in {self.store.url}: "
                f"rebuild the model with `modelpex build {model.label}`"
            )
        return self.cache.prepare(self.store, model, base)

    def call(
        self,
        model: ArtifactRecord,
        link: Callable[[], AbstractContextManager[PipesLink]],
        *,
        client: str = "",
        **kwargs: Any,
    ) -> RunOutcome:
        """One call of ``model`` for ``client``, in that client's own warm process (see `ModelProcess.call` for the
        other keyword arguments)."""
        prepared = self.prepare(model)
        self._announce()
        return self.processes.call(prepared, link, timeout=self.timeout, client=client, **kwargs)

    def _announce(self) -> None:
        """Who model processes run as, and each guarantee that does not hold: once per process, as its first model
        process is about to start (a warning when a guarantee is missing), never ahead of an unrelated error."""
        if (described := self.sandbox.describe()) not in _announced:
            _announced.add(described)
            complete = self.sandbox.switching and self.sandbox.bwrap
            (log.info if complete else log.warning)(f"modelpex isolation: {described}")

    def close(self) -> None:
        self.processes.close()
