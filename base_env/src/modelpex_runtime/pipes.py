"""Pipes: a Dagster Pipes context per call whose messages travel over the model process's channel.

A model process lives for many calls (`modelpex_runtime.entry`), and each call is its own Pipes session on the
orchestrator's side: the call carries that session's bootstrap parameters, and every message the model's code
reports (logs, metadata) goes back over the one channel tagged with the call, so no file or named pipe is shared
between the orchestrator's user and the model's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from dagster_pipes import (
    PipesContext,
    PipesDefaultContextLoader,
    PipesMappingParamsLoader,
    PipesMessageWriter,
    PipesMessageWriterChannel,
)

from modelpex_runtime.channel import Channel
from modelpex_runtime.protocol import LOG_LINE_BYTES

__all__ = ["ChannelMessageWriter", "open_call_pipes"]


class _CallChannel(PipesMessageWriterChannel):
    def __init__(self, channel: Channel, call_id: int) -> None:
        self.channel, self.call_id = channel, call_id

    def write_message(self, message: Mapping[str, Any]) -> None:
        self.channel.send({"kind": "pipes", "id": self.call_id, "message": _cut_log(message)})


def _cut_log(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """A log message longer than a log line, cut, saying by how much: the orchestrator would cut it anyway, and a
    very long one would not fit a channel message at all."""
    params = message.get("params")
    text = params.get("message") if message.get("method") == "log" and isinstance(params, Mapping) else None
    if not isinstance(text, str) or len(text) <= LOG_LINE_BYTES // 4:
        return message  # N.B. At most 4 bytes a character: short enough without encoding it.
    raw = text.encode("utf-8", "replace")
    if len(raw) <= LOG_LINE_BYTES:
        return message
    keep = LOG_LINE_BYTES - 64  # N.B. Room for the note, so the orchestrator does not cut it off again.
    head = raw[:keep].decode("utf-8", "ignore")
    return {**message, "params": {**params, "message": f"{head} [cut: {len(raw) - keep} more bytes]"}}


class ChannelMessageWriter(PipesMessageWriter[_CallChannel]):
    """Writes one call's Pipes messages to the channel, tagged with the call's id."""

    def __init__(self, channel: Channel, call_id: int) -> None:
        self.channel, self.call_id = channel, call_id

    @contextmanager
    def open(self, params: Mapping[str, Any]) -> Iterator[_CallChannel]:
        yield _CallChannel(self.channel, self.call_id)


def open_call_pipes(channel: Channel, call_id: int, bootstrap: Mapping[str, str]) -> PipesContext:
    """The Pipes context of one call; `PipesContext.get()` returns it to the model's code until the next call."""
    context = PipesContext(
        PipesMappingParamsLoader(dict(bootstrap)), PipesDefaultContextLoader(), ChannelMessageWriter(channel, call_id)
    )
    PipesContext.set(context)
    return context
