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

__all__ = ["ChannelMessageWriter", "open_call_pipes"]


class _CallChannel(PipesMessageWriterChannel):
    def __init__(self, channel: Channel, call_id: int) -> None:
        self.channel, self.call_id = channel, call_id

    def write_message(self, message: Mapping[str, Any]) -> None:
        self.channel.send({"kind": "pipes", "id": self.call_id, "message": message})


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
