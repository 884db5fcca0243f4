"""Pipes: each model call is a Dagster Pipes session whose messages travel over the model process's channel.

`dagster_link` opens a real session on the step's context about the one asset the call materialises (logs reach
the event log as with any Pipes client; metadata the model reports lands on that asset); `console_link` is the
same conversation without Dagster, for the command line, which does not import Dagster at all. Both hand the model
process the session's bootstrap parameters in the call message, never through a file or an environment the model
could share with another.

Each link owns its call's `CallLog` (`orchestrator.modellog`): every Pipes message passes its caps first, and the
model's log lines, from Pipes or from its stdout and stderr, reach the event log (or stderr) tagged as the model's.
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

from orchestrator.modellog import CallLog, clean, print_lines, print_note

if TYPE_CHECKING:
    from dagster import AssetExecutionContext, AssetKey, OpExecutionContext

__all__ = ["ChannelLink", "console_link", "dagster_link"]

# N.B. Raised by Dagster's own Pipes message handler on every session, about an attribute we never use.
warnings.filterwarnings("ignore", message=".*expected_writer_count.*")


@dataclass(frozen=True)
class ChannelLink:
    """The bootstrap parameters one call carries, where that call's Pipes messages go, and its log."""

    bootstrap: Mapping[str, str]
    forward: Callable[[Mapping[str, Any]], None]
    log: CallLog

    def handle(self, message: Mapping[str, Any]) -> None:
        """A Pipes message from the model: through the call's caps, then to the session."""
        kept = self.log.pipes(message)
        if kept is not None:
            self.forward(kept)


@contextmanager
def dagster_link(
    context: OpExecutionContext | AssetExecutionContext,
    asset_key: AssetKey,
    code_version: str | None = None,
    reported: dict[str, Any] | None = None,
    client: str | None = None,
) -> Iterator[ChannelLink]:
    """A Dagster Pipes session on ``context`` about one asset, whose messages arrive over the model's channel.

    Metadata the model reports with ``report_asset_materialization`` is added to ``reported`` when the call ends.
    The model's lines reach the event log tagged with the model and ``client`` (`orchestrator.modellog`).

    N.B. Not `open_pipes_session`: it describes every asset of the step's definition to the model (a client's whole
    graph) and reads each one's provenance from the instance, on every call. This session names the one asset the
    call materialises, so the model's `report_asset_materialization()` needs no key.
    """
    from dagster import MaterializeResult, PipesEnvContextInjector, PipesMessageHandler

    reader = _channel_reader()
    handler = PipesMessageHandler(context, reader)
    data = _context_data(context.run_id, context.job_name, context.retry_number, asset_key, code_version)
    # N.B. Straight to the step's log, not through the handler, which warns about any message after "closed".
    log = CallLog(lambda text, level: context.log.log(level, text), context.log.warning, client)
    with (
        PipesEnvContextInjector().inject_context(data) as injected,  # type: ignore[arg-type]
        handler.handle_messages() as messages,
    ):
        try:
            yield ChannelLink(
                {
                    DAGSTER_PIPES_CONTEXT_ENV_VAR: encode_param(injected),
                    DAGSTER_PIPES_MESSAGES_ENV_VAR: encode_param(messages),
                },
                handler.handle_message,
                log,
            )
        finally:
            log.close()
    if reported is not None:
        for result in handler.get_reported_results():
            if isinstance(result, MaterializeResult) and result.metadata:
                reported.update(result.metadata)


def _context_data(
    run_id: str, job_name: str, retry_number: int, asset_key: AssetKey | None = None, code_version: str | None = None
) -> dict[str, Any]:
    """The Pipes context a model sees (``PipesContext.get()``): this run, and the one asset of the call if any."""
    key = asset_key.to_escaped_user_string() if asset_key is not None else None
    return {
        "asset_keys": [key] if key else None,
        "code_version_by_asset_key": {key: code_version} if key else None,
        "provenance_by_asset_key": None,
        "partition_key": None,
        "partition_key_range": None,
        "partition_time_window": None,
        "run_id": run_id,
        "job_name": job_name,
        "retry_number": retry_number,
        "extras": {},
    }


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
    """The model's (tagged) log lines, or the metadata it reports, on stderr."""
    params = message.get("params") or {}
    if message.get("method") == "log":
        print_lines(str(params.get("message")))
    elif message.get("method") == "report_asset_materialization":
        reported = {
            k: v.get("raw_value") if isinstance(v, Mapping) else v for k, v in (params.get("metadata") or {}).items()
        }
        shown = clean(", ".join(f"{k} = {v}" for k, v in reported.items()))[:2000]
        sys.stderr.write(f"reported by the model: {shown}\n")


@contextmanager
def console_link(
    job_name: str = "modelpex_run", log: Callable[[Mapping[str, Any]], None] = _print_log, asset: str = "model"
) -> Iterator[ChannelLink]:
    """A Pipes session without Dagster: the model's log lines (tagged, as ``log`` messages) and reports go to ``log``
    (stderr), other messages are dropped. ``asset`` names what the call makes, so a model's
    ``report_asset_materialization()`` works here too."""
    context = _context_data(f"cli-{uuid.uuid4().hex}", job_name, 0)
    context |= {"asset_keys": [asset], "code_version_by_asset_key": {asset: None}}
    lines = CallLog(lambda text, level: log({"method": "log", "params": {"message": text, "level": level}}), print_note)
    try:
        yield ChannelLink(
            {
                DAGSTER_PIPES_CONTEXT_ENV_VAR: encode_param({"data": context}),
                DAGSTER_PIPES_MESSAGES_ENV_VAR: encode_param(dict(PIPES_CHANNEL_PARAMS)),
            },
            log,
            lines,
        )
    finally:
        lines.close()
