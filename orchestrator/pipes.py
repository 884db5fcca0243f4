"""Pipes: each model call is a Dagster Pipes session whose messages travel over the model process's channel.

`dagster_link` opens a real session on the asset's or op's context (logs, metadata and the model's reports reach
the Dagster event log as with any Pipes client); `console_link` is the same conversation without Dagster, for the
command line, which does not import Dagster at all. Both hand the model process the session's bootstrap
parameters in the call message, never through a file or an environment the model could share with another.
"""

from __future__ import annotations

import sys
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, DAGSTER_PIPES_MESSAGES_ENV_VAR, encode_param
from modelpex_runtime.protocol import PIPES_CHANNEL_PARAMS

if TYPE_CHECKING:
    from dagster import AssetExecutionContext, OpExecutionContext

__all__ = ["ChannelLink", "console_link", "dagster_link"]

# N.B. Raised by Dagster's own Pipes message handler on every session, about an attribute we never use.
warnings.filterwarnings("ignore", message=".*expected_writer_count.*")


@dataclass(frozen=True)
class ChannelLink:
    """The bootstrap parameters one call carries, and where that call's Pipes messages go."""

    bootstrap: Mapping[str, str]
    handle: Callable[[Mapping[str, Any]], None]


@contextmanager
def dagster_link(context: OpExecutionContext | AssetExecutionContext) -> Iterator[ChannelLink]:
    """A Dagster Pipes session on ``context`` whose messages arrive over the model's channel."""
    from dagster import PipesEnvContextInjector, open_pipes_session

    reader = _channel_reader()
    with open_pipes_session(
        context=context, context_injector=PipesEnvContextInjector(), message_reader=reader
    ) as session:
        yield ChannelLink(session.get_bootstrap_env_vars(), reader.handler.handle_message)


def _channel_reader() -> Any:
    from dagster import PipesMessageReader

    class ChannelMessageReader(PipesMessageReader):
        """Messages are pushed to the handler by the runner as they arrive on the channel: nothing to poll."""

        handler: Any = None

        @contextmanager
        def read_messages(self, handler: Any) -> Iterator[Mapping[str, Any]]:
            self.handler = handler
            yield dict(PIPES_CHANNEL_PARAMS)

        def no_messages_debug_text(self) -> str:
            return "modelpex sends Pipes messages over the model process's channel; see the process's stderr."

    return ChannelMessageReader()


def _print_log(message: Mapping[str, Any]) -> None:
    if message.get("method") == "log":
        params = message.get("params") or {}
        sys.stderr.write(f"{str(params.get('level', 'info')).lower()}: {params.get('message')}\n")


@contextmanager
def console_link(
    job_name: str = "modelpex_run", log: Callable[[Mapping[str, Any]], None] = _print_log
) -> Iterator[ChannelLink]:
    """A Pipes session without Dagster: the model's log lines go to ``log`` (stderr), other messages are dropped."""
    context = {
        "asset_keys": None,
        "code_version_by_asset_key": None,
        "provenance_by_asset_key": None,
        "partition_key": None,
        "partition_key_range": None,
        "partition_time_window": None,
        "run_id": f"cli-{uuid.uuid4().hex}",
        "job_name": job_name,
        "retry_number": 0,
        "extras": {},
    }
    yield ChannelLink(
        {
            DAGSTER_PIPES_CONTEXT_ENV_VAR: encode_param({"data": context}),
            DAGSTER_PIPES_MESSAGES_ENV_VAR: encode_param(dict(PIPES_CHANNEL_PARAMS)),
        },
        log,
    )
