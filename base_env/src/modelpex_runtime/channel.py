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

from modelpex_runtime.protocol import MAX_MESSAGE_BYTES, CallError

__all__ = ["Channel", "ChannelClosed"]

_HEADER = struct.Struct(">I")
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
        """Send one message; a `CallError` before anything is sent if it exceeds what the other side accepts."""
        payload = json.dumps(message, separators=(",", ":")).encode()
        if len(payload) > MAX_MESSAGE_BYTES:
            raise CallError(
                f"a {message.get('kind')!r} message of {len(payload)} bytes exceeds the channel's limit of "
                f"{MAX_MESSAGE_BYTES} bytes: report less (metadata, log lines) in one message"
            )
        header = _HEADER.pack(len(payload))
        message_bytes = header + payload
        with self._sending:
            # N.B. One sendmsg for the header, the payload and the descriptors: the peer wakes once, not once per
            # part. A stream socket may take less than all of it; the rest follows with sendall.
            sent = socket.send_fds(self.sock, [message_bytes], list(fds)) if fds else self.sock.send(message_bytes)
            if sent < len(message_bytes):
                self.sock.sendall(memoryview(message_bytes)[sent:])

    def receive(self) -> tuple[dict[str, Any], list[int]]:
        """The next message and its descriptors (owned by the caller, non-inheritable); `ChannelClosed` at EOF."""
        header, fds = self._header()
        (length,) = _HEADER.unpack(header)
        if length > MAX_MESSAGE_BYTES:
            _close_all(fds)
            raise CallError(f"a channel message of {length} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes")
        try:
            message = json.loads(self._exactly(length).decode("utf-8"))  # N.B. Not json's guess of an encoding.
        except ChannelClosed:
            _close_all(fds)
            raise
        except (ValueError, RecursionError) as exc:  # N.B. Not UTF-8, not JSON, or nested too deep to parse.
            _close_all(fds)
            raise CallError(f"a channel message of {length} bytes is not valid JSON ({_first_line(exc)})") from None
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
