"""Channel: JSON messages with attached file descriptors over a Unix stream socket, the one link to a model process.

A message is a 4-byte big-endian length and that many bytes of JSON; the descriptors travel (SCM_RIGHTS) with the
length. Both sides bound what they accept, so a misbehaving peer cannot make the other allocate without limit or
fill its descriptor table.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from typing import Any

from modelpex_runtime.protocol import CallError

__all__ = ["Channel", "ChannelClosed"]

_HEADER = struct.Struct(">I")
MAX_MESSAGE_BYTES = 64 << 20
MAX_FDS = 64


class ChannelClosed(CallError):
    """The peer closed its end: the orchestrator is gone, or the model process exited."""


class Channel:
    """One end of the socket pair between the orchestrator and a model process."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._sending = threading.Lock()  # N.B. A model may log from its own threads while the call answers.

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        payload = json.dumps(message, separators=(",", ":")).encode()
        header = _HEADER.pack(len(payload))
        with self._sending:
            if fds:
                socket.send_fds(self.sock, [header], list(fds))
                self.sock.sendall(payload)
            else:
                self.sock.sendall(header + payload)

    def receive(self) -> tuple[dict[str, Any], list[int]]:
        """The next message and its descriptors (owned by the caller, non-inheritable); `ChannelClosed` at EOF."""
        header, fds = self._header()
        (length,) = _HEADER.unpack(header)
        if length > MAX_MESSAGE_BYTES:
            _close_all(fds)
            raise CallError(f"channel message of {length} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
        try:
            message = json.loads(self._exactly(length))
        except (ValueError, ChannelClosed):
            _close_all(fds)
            raise
        if not isinstance(message, dict):
            _close_all(fds)
            raise CallError("channel message is not a JSON object")
        return message, fds

    def _header(self) -> tuple[bytes, list[int]]:
        data, fds = b"", []
        while len(data) < _HEADER.size:
            chunk, more, flags, _ = socket.recv_fds(self.sock, _HEADER.size - len(data), MAX_FDS)
            for fd in more:
                os.set_inheritable(fd, False)
            fds += more
            if flags & socket.MSG_CTRUNC:
                _close_all(fds)
                raise CallError(f"a channel message carried more than {MAX_FDS} file descriptors")
            if not chunk:
                _close_all(fds)
                raise ChannelClosed("the other end closed the channel")
            data += chunk
        return data, fds

    def _exactly(self, length: int) -> bytes:
        view, got = bytearray(length), 0
        while got < length:
            count = self.sock.recv_into(memoryview(view)[got:], length - got)
            if count == 0:
                raise ChannelClosed("the other end closed the channel mid-message")
            got += count
        return bytes(view)

    def close(self) -> None:
        self.sock.close()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
