"""Settings: every environment variable modelpex reads, in one place, with its default.

| variable          | meaning                                                         | default                    |
| ----------------- | --------------------------------------------------------------- | -------------------------- |
| MODELPEX_PROJECT  | the repository with base_env/, model_packages/, deployments.yaml | found upwards from the cwd |
| MODELPEX_STORE    | artifact store URL or directory                                  | <project>/pex_builds       |
| MODELPEX_PYTHON   | the interpreter the pexes are built for and run with             | the orchestrator's Python  |
| MODELPEX_PEX_ROOT | pex's cache (unpacked bases, model venvs) when models run        | pex's own (~/.cache/pex)   |
| MODELPEX_TIMEOUT  | seconds a model process may run before it is killed              | 3600                       |
| DAGSTER_HOME      | Dagster's instance folder (dagster.yaml, SQLite storage)         | <project>/.dagster_home    |
| MODELPEX_SHM_POOL_BYTES | shared memory an orchestrator keeps between calls          | 1 GiB, <= 1/4 of /dev/shm  |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from orchestrator.catalog import Catalog
from orchestrator.errors import SpecError
from orchestrator.specs import BaseEnv, load_base_env
from orchestrator.store import PexStore, open_store

__all__ = ["Settings", "find_project_root"]


def find_project_root(start: Path) -> Path:
    """The nearest folder at or above ``start`` holding ``base_env/pyproject.toml``."""
    for folder in (start, *start.parents):
        if (folder / "base_env" / "pyproject.toml").is_file():
            return folder
    raise SpecError(
        f"no modelpex project at or above {start}: run from the repository (the folder with base_env/ and "
        "model_packages/) or set MODELPEX_PROJECT"
    )


@dataclass(frozen=True)
class Settings:
    """Where things are; read once from the environment, overridable per command."""

    project: Path
    store_url: str
    python: str | None = None
    pex_root: str | None = None
    timeout: float = 3600.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if env is None else env
        project = Path(str(overrides.get("project") or env.get("MODELPEX_PROJECT") or find_project_root(Path.cwd())))
        project = project.resolve()
        return cls(
            project=project,
            store_url=str(overrides.get("store_url") or env.get("MODELPEX_STORE") or project / "pex_builds"),
            python=str(overrides.get("python") or env.get("MODELPEX_PYTHON") or "") or None,
            pex_root=env.get("MODELPEX_PEX_ROOT") or None,
            timeout=float(env.get("MODELPEX_TIMEOUT", 3600)),
        )

    @property
    def models_dir(self) -> Path:
        return self.project / "model_packages"

    @property
    def deployments_file(self) -> Path:
        return self.project / "deployments.yaml"

    @property
    def dagster_home(self) -> Path:
        """Dagster's instance folder: DAGSTER_HOME, or the embedded SQLite default inside the project."""
        home = Path(os.environ.get("DAGSTER_HOME") or self.project / ".dagster_home")
        home.mkdir(parents=True, exist_ok=True)
        (home / "dagster.yaml").touch(exist_ok=True)  # N.B. Dagster refuses a DAGSTER_HOME without one.
        return home

    def base_env(self) -> BaseEnv:
        return load_base_env(self.project / "base_env")

    def store(self) -> PexStore:
        return open_store(self.store_url)

    def catalog(self) -> Catalog:
        """Every model version; tag digests are cached beside the store (tags never change)."""
        return Catalog(self.project, self.models_dir, self.project / ".cache" / "tag-digests.json")
