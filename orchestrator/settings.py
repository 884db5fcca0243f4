"""Settings: every environment variable modelpex reads, in one place, with its default.

| variable                   | meaning                                           | default                      |
| -------------------------- | ------------------------------------------------- | ---------------------------- |
| MODELPEX_PROJECT           | the repository (base_env/, model_packages/)       | found upwards from the cwd   |
| MODELPEX_STORE             | artifact store: directory, file:// or s3:// URL   | <project>/pex_builds         |
| MODELPEX_PYTHON            | the interpreter pexes are built for and run with  | the orchestrator's           |
| MODELPEX_COMPLETE_PLATFORM | the workers' platform to build for (**)           | none (this interpreter)      |
| MODELPEX_ISOLATION         | auto, user (switch users or fail), none           | auto                         |
| MODELPEX_SANDBOX           | auto, bwrap (namespaces or fail), none            | auto                         |
| MODELPEX_MODEL_USER        | the unprivileged user models run as               | modelpex-model               |
| MODELPEX_UID_LEASES        | the host's leases of model uids (every cache)     | /run/modelpex/uids           |
| MODELPEX_CACHE             | verified artifacts, venvs, model folders          | /var/cache/modelpex (*)      |
| MODELPEX_PEX_ROOT          | PEX_ROOT of model processes                       | <cache>/pex_root             |
| MODELPEX_SIGNING_KEY_FILE  | the key fitted states are signed with             | ~/.config/modelpex/...       |
| MODELPEX_TIMEOUT           | seconds a model call may run                      | 3600                         |
| MODELPEX_SHM_POOL_BYTES    | shared memory kept between calls                  | 1G, <= 1/4 of /dev/shm       |
| MODELPEX_GC_GRACE          | seconds before gc removes a dead run's leftovers  | 3600                         |
| MODELPEX_SENSOR_INTERVAL   | seconds between the sensors' ticks                | 15                           |
| MODELPEX_WEBSERVER_URL     | the Dagster webserver the redeploy sensor reloads | none (`modelpex ui` sets it) |
| MODELPEX_EXECUTOR          | where a run's steps execute: in_process, celery   | in_process                   |
| MODELPEX_CELERY_BROKER     | the Celery broker the workers listen on (***)     | none (required by celery)    |
| MODELPEX_CELERY_BACKEND    | Celery's result backend                           | the broker                   |
| MODELPEX_CELERY_REDELIVER  | seconds before a lost worker's step is redone     | MODELPEX_TIMEOUT + 900       |
| DAGSTER_HOME               | Dagster's instance folder                         | <project>/.dagster_home      |

(*) when models run as another user; ~/.cache/modelpex otherwise.
(**) ``pex3 interpreter inspect --markers --tags -o FILE`` on a worker writes it. Every command that builds or finds
artifacts uses it (build, run, warm, deploy, gc, the Dagster code location): set the same file where artifacts are
built (``modelpex build --complete-platform FILE`` overrides it there) and on the workers, so both compute the same
keys. A worker refuses to run an artifact built for a platform that is not its own.
(***) ``redis://host:6379/0`` for instance (``pip install 'modelpex[cluster]'`` brings dagster-celery and redis).
With ``MODELPEX_EXECUTOR=celery`` each step of a run is a task of Dagster's own Celery executor, executed by whichever
worker takes it (``celery -A orchestrator.celery_worker -b BROKER --result-backend BACKEND worker --disable-prefetch``).
Workers load the code location from the same project and need the code server's MODELPEX_*, AWS_* and DAGSTER_PG_*
variables, an ``s3://`` store (they share nothing else with the run) and the signing key (MODELPEX_SIGNING_KEY_FILE).

An ``s3://bucket/prefix`` store (``pip install 'modelpex[s3]'``) reads its endpoint, credentials and region from
boto3's standard chain, with no modelpex names for them: ``AWS_ENDPOINT_URL`` (an S3-compatible server),
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE`` and
``~/.aws/config``. Model processes never see them (their environment is an allow-list). Fitted states and the frames
between assets live in that store too, so a run on another host finds what a run on this host wrote; artifacts are
fetched once per machine into MODELPEX_CACHE.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from orchestrator.build import Builder, Step
from orchestrator.catalog import Catalog, ModelVersion, published_versions
from orchestrator.errors import ModelpexError, SpecError
from orchestrator.platforms import CompletePlatform, Interpreter
from orchestrator.specs import BaseEnv, load_base_env
from orchestrator.store import PexStore, is_remote, open_store

__all__ = [
    "EXECUTORS",
    "Settings",
    "find_project_root",
    "parse_broker",
    "parse_executor",
    "parse_seconds",
    "parse_size",
    "parse_url",
]

EXECUTORS = ("in_process", "celery")


def parse_seconds(text: str | None, name: str, default: float) -> float:
    """A positive, finite number of seconds, or one line naming the variable and what it takes."""
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ModelpexError(f"{name}={text!r} is not a positive number of seconds: set it to e.g. 600, or unset it")
    return value


def parse_size(text: str | None, name: str, default: int) -> int:
    """A byte count (``1073741824``, or with a K/M/G suffix), or one line naming the variable."""
    if text is None or text == "":
        return default
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    digits, unit = text.strip().upper().rstrip("B").rstrip("I"), ""
    if digits and digits[-1] in units:
        digits, unit = digits[:-1], digits[-1]
    if not digits.isdigit():
        raise ModelpexError(f"{name}={text!r} is not a size in bytes: set it to e.g. 1073741824 or 1G, or unset it")
    return int(digits) * units[unit]


def parse_url(text: str | None, name: str) -> str | None:
    """An http(s) URL with a host, or one line naming the variable."""
    if not text:
        return None
    parsed = urlparse(text)
    try:
        parsed.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        parsed = parsed._replace(netloc="")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ModelpexError(f"{name}={text!r} is not an http(s) URL: set it to e.g. http://127.0.0.1:3000, or unset it")
    return text.rstrip("/")


def parse_broker(text: str | None, name: str) -> str | None:
    """A Celery broker or backend URL (``scheme://...``), or one line naming the variable."""
    if not text:
        return None
    scheme, sep, rest = text.partition("://")
    if not (sep and scheme and rest):
        raise ModelpexError(f"{name}={text!r} is not a URL: set it to e.g. redis://127.0.0.1:6379/0, or unset it")
    return text


def parse_executor(env: Mapping[str, str]) -> tuple[str, str | None, str | None]:
    """(executor, broker, backend) from MODELPEX_EXECUTOR and MODELPEX_CELERY_*; one line naming what is wrong."""
    executor = env.get("MODELPEX_EXECUTOR") or "in_process"
    if executor not in EXECUTORS:
        raise ModelpexError(
            f"MODELPEX_EXECUTOR={executor!r} is not an executor modelpex knows: set it to one of "
            f"{', '.join(EXECUTORS)}, or unset it"
        )
    broker = parse_broker(env.get("MODELPEX_CELERY_BROKER"), "MODELPEX_CELERY_BROKER")
    backend = parse_broker(env.get("MODELPEX_CELERY_BACKEND"), "MODELPEX_CELERY_BACKEND") or broker
    if executor == "celery" and broker is None:
        raise ModelpexError(
            "MODELPEX_EXECUTOR=celery needs MODELPEX_CELERY_BROKER: set it to the broker the Celery workers listen "
            "on, e.g. redis://127.0.0.1:6379/0"
        )
    return executor, broker, backend


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
    complete_platform: str | None = None
    pex_root: str | None = None
    timeout: float = 3600.0
    isolation: str = "auto"
    sandbox: str = "auto"
    model_user: str = "modelpex-model"
    cache: str | None = None
    signing_key_file: str | None = None
    gc_grace: float = 3600.0
    shm_pool_bytes: int | None = None  # N.B. Read by orchestrator.transport; validated here with the rest.
    sensor_interval: float = 15.0  # N.B. Two ticks lie between an edit and its redeploy (benchmarks/redeploy.py).
    webserver_url: str | None = None
    executor: str = "in_process"
    celery_broker: str | None = None
    celery_backend: str | None = None
    # N.B. Longer than any step (fetch, unpack, model call): a step still running after it is handed out again.
    celery_redeliver: float | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if env is None else env
        given = overrides.get("project") or env.get("MODELPEX_PROJECT")
        project = Path(str(given)).resolve() if given else find_project_root(Path.cwd())
        if given and not (project / "base_env" / "pyproject.toml").is_file():
            raise SpecError(
                f"project {given} is not a modelpex project (no {project / 'base_env' / 'pyproject.toml'}): pass the "
                "repository with base_env/ and model_packages/ (--project or MODELPEX_PROJECT)"
            )
        executor, broker, backend = parse_executor(env)
        return cls(
            project=project,
            store_url=str(overrides.get("store_url") or env.get("MODELPEX_STORE") or project / "pex_builds"),
            python=str(overrides.get("python") or env.get("MODELPEX_PYTHON") or "") or None,
            complete_platform=env.get("MODELPEX_COMPLETE_PLATFORM") or None,
            pex_root=env.get("MODELPEX_PEX_ROOT") or None,
            timeout=parse_seconds(env.get("MODELPEX_TIMEOUT"), "MODELPEX_TIMEOUT", 3600.0),
            isolation=env.get("MODELPEX_ISOLATION") or "auto",
            sandbox=env.get("MODELPEX_SANDBOX") or "auto",
            model_user=env.get("MODELPEX_MODEL_USER") or "modelpex-model",
            cache=env.get("MODELPEX_CACHE") or None,
            signing_key_file=env.get("MODELPEX_SIGNING_KEY_FILE") or None,
            gc_grace=parse_seconds(env.get("MODELPEX_GC_GRACE"), "MODELPEX_GC_GRACE", 3600.0),
            shm_pool_bytes=parse_size(env.get("MODELPEX_SHM_POOL_BYTES"), "MODELPEX_SHM_POOL_BYTES", 0) or None,
            sensor_interval=parse_seconds(
                env.get("MODELPEX_SENSOR_INTERVAL"), "MODELPEX_SENSOR_INTERVAL", cls.sensor_interval
            ),
            webserver_url=parse_url(env.get("MODELPEX_WEBSERVER_URL"), "MODELPEX_WEBSERVER_URL"),
            executor=executor,
            celery_broker=broker,
            celery_backend=backend,
            celery_redeliver=parse_seconds(env.get("MODELPEX_CELERY_REDELIVER"), "MODELPEX_CELERY_REDELIVER", 0)
            or None,
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
        # N.B. The instance holds every client's run metadata: private to the orchestrator when it creates it.
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        (home / "dagster.yaml").touch(exist_ok=True)  # N.B. Dagster refuses a DAGSTER_HOME without one.
        return home

    @property
    def cache_dir(self) -> Path:
        """Where verified artifacts, model venvs and model processes' folders live: outside any home folder when
        models run as another user (a mode-0700 /root would hide them), in the user's cache otherwise."""
        if self.cache:
            return Path(self.cache)
        from orchestrator.sandbox import can_switch_users

        if self.isolation != "none" and can_switch_users():
            return Path("/var/cache/modelpex")
        return Path(os.path.expanduser("~/.cache/modelpex"))

    @property
    def model_pex_root(self) -> Path:
        return Path(self.pex_root) if self.pex_root else self.cache_dir / "pex_root"

    @property
    def signing_key_path(self) -> Path:
        """The orchestrator's own secret: never beside the states it signs, never readable by the model user."""
        if self.signing_key_file:
            return Path(self.signing_key_file)
        config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
        return Path(config) / "modelpex" / "signing.key"

    def base_env(self) -> BaseEnv:
        return load_base_env(self.project / "base_env")

    def store(self) -> PexStore:
        """The artifact store; a remote one fetches artifacts into this machine's cache (`cache_dir`)."""
        return open_store(self.store_url, cache=self.cache_dir if is_remote(self.store_url) else None)

    def target_platform(self) -> CompletePlatform | None:
        """The complete platform artifacts are built for, validated; ``None`` builds for this interpreter."""
        if not self.complete_platform:
            return None
        return CompletePlatform.load(self.complete_platform, "MODELPEX_COMPLETE_PLATFORM")

    def builder(self, step: Step | None = None) -> Builder:
        """The builder of this project's base and models, in this store, for this interpreter or platform."""
        return Builder(
            self.store(), self.base_env(), Interpreter.detect(self.python), step, platform=self.target_platform()
        )

    def catalog(self, released: Sequence[ModelVersion] = (), store: PexStore | None = None) -> Catalog:
        """Every model version: the working tree's, the tags' (digests cached by git tree id: tags never change) and
        the store's release records; ``released`` stands in for tags this checkout lacks too (see `Catalog`)."""
        store = store or self.store()
        return Catalog(
            self.project,
            self.models_dir,
            self.project / ".cache" / "tag-digests.json",
            released,
            published_versions(store),
            store.url,
        )
