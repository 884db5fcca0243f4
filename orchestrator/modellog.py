"""Model log: everything a model writes for people to read, bounded, cleaned and marked as the model's.

A model is untrusted code, and what it writes reaches the orchestrator's memory, Dagster's event log and the
terminal: its stdout and stderr (`ModelOutput` reads them) and its Dagster Pipes messages (`CallLog.pipes`). So:

- every line is cut at ``LINE_BYTES`` (64 KiB) as it is read, never gathered whole (2 GiB without a newline costs
  64 KiB), and a call logs at most ``CALL_LOG_BYTES`` (8 MiB) in all; what is cut or dropped is counted and said in
  one note of modelpex's own when the call ends;
- a call's Pipes messages are capped in number and bytes, and the metadata it reports in entries and bytes;
- control characters and terminal escape sequences are removed (a tab becomes spaces), so a line cannot move the
  cursor, rewrite what is on screen, or break into a second line;
- every line carries its author in front, ``[model churn@1.0.0 for acme, stderr]``, added here and never by the
  model, so a model's line cannot pass for one of modelpex's (``modelpex: ... raised``) or another model's.

The orchestrator's memory per model process stays flat: a partial line per stream, one batch of lines waiting to
be written, the last few lines of stderr for an error message.
"""

from __future__ import annotations

import json
import os
import re
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

from modelpex_runtime.protocol import LOG_LINE_BYTES, CallError

__all__ = [
    "CALL_LOG_BYTES",
    "LINE_BYTES",
    "METADATA_BYTES",
    "METADATA_ENTRIES",
    "PIPES_BYTES",
    "PIPES_MESSAGES",
    "CallLog",
    "ModelOutput",
    "clean",
    "clean_lines",
    "print_lines",
    "print_note",
]

LINE_BYTES = LOG_LINE_BYTES  # a line longer than this is cut
CALL_LOG_BYTES = 8 << 20  # a call's stdout, stderr and Pipes log messages together
PIPES_MESSAGES = 1000  # Pipes messages per call
PIPES_BYTES = 16 << 20  # their JSON per call (each is at most a channel message, 4 MiB)
METADATA_ENTRIES = 100  # metadata entries a call may report (materialisations and checks together)
METADATA_BYTES = 1 << 20  # their JSON per call
TAIL_LINES = 40  # lines of stderr kept for an error message
TAIL_CHARS = 1000  # of each
BATCH_BYTES = 64 << 10  # lines are written to the log in batches of at most this
BATCH_SECONDS = 0.25  # and at most this late
LEVELS = ("debug", "info", "warning", "error", "critical")
_READ = 64 << 10

# N.B. Escape sequences first (CSI, OSC to BEL or ST, DCS/SOS/PM/APC strings, two-character escapes, 8-bit CSI),
# so that their parameters go with them; then every remaining C0 and C1 control, DEL, and the invisible Unicode
# formatting characters that reorder or hide text (bidirectional overrides, zero-width characters, line and
# paragraph separators that some viewers break on).
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
    r"|\x1b[ -/]*[0-~]?"
    r"|\x9b[0-?]*[ -/]*[@-~]?"
)
_INVISIBLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]"
)


def clean(text: str) -> str:
    """``text`` without escape sequences or control characters; a tab becomes four spaces."""
    return _INVISIBLE.sub("", _ESCAPES.sub("", text.replace("\t", "    ")))


def clean_lines(text: str, limit: int, keep: str = "head") -> str:
    """Several lines (a model's exception message, its traceback) each cleaned, the whole cut to ``limit``
    characters, keeping its ``head`` or, for a traceback whose end says the most, its ``tail``."""
    if len(text) > limit:
        text = f"{text[:limit]} [cut]" if keep == "head" else f"[cut] {text[-limit:]}"
    return "\n".join(clean(line) for line in text.splitlines())


def _decoded(raw: bytes | str) -> str:
    return raw if isinstance(raw, str) else raw.decode("utf-8", "replace")


def _shown(value: object, limit: int = 60) -> str:
    text = clean(repr(value))
    return text if len(text) <= limit else f"{text[:limit]}..."


class CallLog:
    """One call's share of the log: the model's lines within the call's caps, tagged with their author, handed to
    the call's Pipes session as log messages; then one note of what was cut or dropped.

    ``write`` receives tagged lines (several at once, joined by newlines) and a log level; ``note`` receives
    modelpex's own warnings about this call. The process's label is bound when the call is routed to this log
    (`ModelOutput.routed`), so the tag names what really ran.
    """

    def __init__(
        self, write: Callable[[str, str], None], note: Callable[[str], None], client: str | None = None
    ) -> None:
        self._write_out, self._note = write, note
        self.client = client
        self.model = "model"
        self._lock = threading.Condition()
        self._emitting = threading.Lock()  # N.B. Pumps, the flusher and the call thread all write: one at a time.
        self._batch: list[str] = []
        self._batch_bytes = 0
        self._flusher: threading.Thread | None = None
        self._closed = self._pipes_closed = self._opened = False
        self.logged = self.dropped = self.dropped_lines = self.cut = self.cut_lines = 0
        self.messages = self.message_bytes = self.dropped_messages = 0
        self.entries = self.entry_bytes = self.dropped_entries = 0

    def bind(self, model: str) -> None:
        self.model = model

    def tag(self, stream: str) -> str:
        """The author of a line: ``[model churn@1.0.0 for acme, stderr]``."""
        client = f" for {self.client}" if self.client else ""
        return f"[model {self.model}{client}, {stream}]"

    @property
    def who(self) -> str:
        return f"model {self.model}" + (f" for {self.client}" if self.client else "")

    @property
    def full(self) -> bool:
        """Nothing more fits in this call's log: further output is only counted."""
        return self.logged >= CALL_LOG_BYTES

    # --- lines ----------------------------------------------------------------------------------------------

    def line(self, stream: str, raw: bytes | str, cut: bool = False) -> None:
        """One line the model wrote on ``stream`` (at most `LINE_BYTES`; ``cut`` if it was longer)."""
        size = len(raw) + 1  # N.B. With its newline: a call's log is so many bytes of output.
        with self._lock:
            if self._closed:
                return
            if self.logged + size > CALL_LOG_BYTES:
                self.dropped += size
                self.dropped_lines += 1
                return
            self.logged += size
            text = f"{self.tag(stream)} {clean(_decoded(raw))}"
            if cut:
                text += f" [line cut at {LINE_BYTES // 1024} KiB]"
            first = not self._batch
            self._batch.append(text)
            self._batch_bytes += len(text)
            if self._batch_bytes < BATCH_BYTES:
                if first:
                    self._start_flusher()
                return
            batch = self._take()
        self._write(batch, "info")

    def cut_off(self, size: int, lines: int = 0) -> None:
        """``size`` bytes of over-long lines (``lines`` of them ended) that were not kept."""
        with self._lock:
            self.cut += size
            self.cut_lines += lines

    def skipped(self, size: int, lines: int) -> None:
        """``size`` bytes in ``lines`` lines read while the log was already full."""
        with self._lock:
            self.dropped += size
            self.dropped_lines += lines

    def _take(self) -> list[str]:
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        return batch

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_soon, daemon=True, name="modelpex-log")
            self._flusher.start()
        self._lock.notify()

    def _flush_soon(self) -> None:
        """Write waiting lines at most `BATCH_SECONDS` after the first of them: one event per batch, not per line."""
        while True:
            with self._lock:
                while not self._batch and not self._closed:
                    self._lock.wait()
                deadline = time.monotonic() + BATCH_SECONDS
                while not self._closed and (left := deadline - time.monotonic()) > 0:
                    self._lock.wait(left)
                if self._closed:
                    return
                batch = self._take()
            self._write(batch, "info")

    def flush(self) -> None:
        with self._lock:
            batch = self._take()
        self._write(batch, "info")

    def _write(self, lines: list[str], level: str) -> None:
        if lines:
            with self._emitting:
                self._write_out("\n".join(lines), level)

    # --- Pipes messages -------------------------------------------------------------------------------------

    def pipes(self, message: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The message to hand to the call's Pipes session, or ``None`` when it was consumed here (a log message,
        written tagged) or dropped over a cap; a `CallError` for one that is not a Pipes message at all."""
        method, params = message.get("method"), message.get("params")
        if not isinstance(method, str) or not (params is None or isinstance(params, dict)):
            raise CallError(f"a Pipes message needs a method name and params as an object, got {_shown(message)}")
        params = params or {}
        if not self._admit(method, message):
            return None
        if method in ("opened", "closed", "report_custom_message"):
            return message
        if method == "log":
            self._pipes_log(params)
            return None
        if method == "log_external_stream":
            stream, text = params.get("stream"), params.get("text")
            if stream not in ("stdout", "stderr") or not isinstance(text, str):
                raise CallError(f"a log_external_stream message needs stream and text, got {_shown(params)}")
            for line in text.splitlines():
                self.line(stream, line.encode()[:LINE_BYTES], cut=len(line.encode()) > LINE_BYTES)
            return None
        if method in ("report_asset_materialization", "report_asset_check"):
            return {**message, "params": {**params, "metadata": self._metadata(params.get("metadata"))}}
        raise CallError(f"unknown Pipes method {_shown(method)}")

    def _admit(self, method: str, message: Mapping[str, Any]) -> bool:
        """Count the message against the call's caps; ``False`` when it is over them or after ``closed``."""
        size = len(json.dumps(message))
        with self._lock:
            once = method in ("opened", "closed")
            repeated = (method == "opened" and self._opened) or self._pipes_closed
            over = self.messages >= PIPES_MESSAGES or self.message_bytes + size > PIPES_BYTES
            if repeated or (over and not once):
                self.dropped_messages += 1
                return False
            self.messages += 1
            self.message_bytes += size
            self._opened |= method == "opened"
            self._pipes_closed |= method == "closed"
            return True

    def _pipes_log(self, params: Mapping[str, Any]) -> None:
        text, level = params.get("message"), params.get("level", "info")
        if not isinstance(text, str):
            raise CallError(f"a Pipes log message needs message as a string, got {_shown(text)}")
        level = level.lower() if isinstance(level, str) and level.lower() in LEVELS else "info"
        lines = []
        for line in text.splitlines() or [""]:
            raw = line.encode("utf-8", "replace")
            with self._lock:
                if self.logged + min(len(raw), LINE_BYTES) + 1 > CALL_LOG_BYTES:
                    self.dropped += len(raw) + 1
                    self.dropped_lines += 1
                    continue
                self.logged += min(len(raw), LINE_BYTES) + 1
                if len(raw) > LINE_BYTES:
                    self.cut += len(raw) - LINE_BYTES
                    self.cut_lines += 1
            suffix = f" [line cut at {LINE_BYTES // 1024} KiB]" if len(raw) > LINE_BYTES else ""
            lines.append(f"{self.tag('log')} {clean(_decoded(raw[:LINE_BYTES]))}{suffix}")
        self.flush()  # N.B. What the model printed before it logged this comes first.
        self._write(lines, level)

    def _metadata(self, metadata: object) -> dict[str, Any] | None:
        """The entries that fit in the call's metadata caps; the others are counted and named in the note."""
        if metadata is None:
            return None
        if not isinstance(metadata, dict):
            raise CallError(f"reported metadata must be an object, got {_shown(metadata)}")
        kept = {}
        for name, value in metadata.items():
            size = len(json.dumps([name, value]))
            with self._lock:
                if self.entries >= METADATA_ENTRIES or self.entry_bytes + size > METADATA_BYTES:
                    self.dropped_entries += 1
                    continue
                self.entries += 1
                self.entry_bytes += size
            kept[name] = value
        return kept

    # --- the end of the call --------------------------------------------------------------------------------

    def notes(self) -> list[str]:
        """One line per cap the call ran into, in modelpex's voice."""
        notes = []
        if self.cut:
            notes.append(
                f"{self.who}: lines longer than {LINE_BYTES // 1024} KiB were cut there, dropping {self.cut} bytes"
            )
        if self.dropped:
            notes.append(
                f"{self.who}: output beyond the {CALL_LOG_BYTES >> 20} MiB a call may log was dropped: "
                f"{self.dropped} bytes in {self.dropped_lines} lines"
            )
        if self.dropped_messages:
            notes.append(
                f"{self.who}: Pipes messages beyond the {PIPES_MESSAGES} ({PIPES_BYTES >> 20} MiB) a call may send, "
                f"or after it closed, were dropped: {self.dropped_messages} of them"
            )
        if self.dropped_entries:
            notes.append(
                f"{self.who}: metadata beyond the {METADATA_ENTRIES} entries ({METADATA_BYTES >> 20} MiB) a call may "
                f"report was dropped: {self.dropped_entries} entries"
            )
        return notes

    def close(self) -> None:
        """Write what is waiting, then the notes; later lines are ignored (they belong to no call)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            batch = self._take()
            self._lock.notify_all()
        if self._flusher is not None:
            self._flusher.join()
        self._write(batch, "info")
        for note in self.notes():
            self._note(note)


def stderr_log(client: str | None = None) -> CallLog:
    """A log that writes to this process's stderr: a model's output between calls."""
    return CallLog(print_lines, print_note, client)


def print_lines(text: str, level: str = "info") -> None:
    """Tagged lines on stderr, as they are: the tag says whose they are and the level adds nothing."""
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()


def print_note(note: str) -> None:
    sys.stderr.write(f"warning: {note}\n")
    sys.stderr.flush()


class _Lines:
    """One stream split into lines of at most `LINE_BYTES`: the head of a longer line is kept, the rest counted."""

    def __init__(self, name: str, stream: IO[bytes]) -> None:
        self.name, self.stream, self.fd = name, stream, stream.fileno()
        os.set_blocking(self.fd, False)
        self.partial = bytearray()
        self.over = False  # the current line was cut: its bytes up to the newline are only counted
        self.ended = False

    def feed(self, chunk: bytes, log: CallLog, tail: deque[str] | None) -> None:
        if log.full:
            self._skip(chunk, log, tail)
            return
        view, start = memoryview(chunk), 0
        while start < len(chunk):
            newline = chunk.find(b"\n", start)
            end = len(chunk) if newline < 0 else newline
            piece = view[start:end]
            if self.over:
                log.cut_off(len(piece))
            else:
                room = LINE_BYTES - len(self.partial)
                self.partial += piece[:room]
                if len(piece) > room:
                    self._emit(log, tail, cut=True)
                    log.cut_off(len(piece) - room)
                    self.over = True
            if newline < 0:
                return
            if self.over:
                log.cut_off(0, lines=1)
            else:
                self._emit(log, tail, cut=False)
            self.over = False
            start = newline + 1

    def _skip(self, chunk: bytes, log: CallLog, tail: deque[str] | None) -> None:
        """The log is full: count the lines, keep only the tail, and the partial line after the last newline."""
        log.skipped(len(self.partial), 0)
        self.partial.clear()
        last = chunk.rfind(b"\n")
        if last < 0:
            log.skipped(len(chunk), 0)
            self.over = True
            return
        log.skipped(last + 1, chunk.count(b"\n", 0, last + 1))
        if tail is not None:
            for line in chunk[: last + 1].rsplit(b"\n", TAIL_LINES + 1)[-TAIL_LINES - 1 : -1]:
                tail.append(clean(_decoded(line[: TAIL_CHARS * 4]))[:TAIL_CHARS])
        self.partial[:] = chunk[last + 1 : last + 1 + LINE_BYTES]
        self.over = len(chunk) - last - 1 > LINE_BYTES
        if self.over:
            log.skipped(len(chunk) - last - 1 - LINE_BYTES, 0)

    def _emit(self, log: CallLog, tail: deque[str] | None, cut: bool) -> None:
        raw = bytes(self.partial)
        self.partial.clear()
        if tail is not None:
            tail.append(clean(_decoded(raw[: TAIL_CHARS * 4]))[:TAIL_CHARS])
        log.line(self.name, raw, cut)

    def end(self, log: CallLog, tail: deque[str] | None) -> None:
        """The call (or the stream) ended: a line without its newline is still a line."""
        if self.partial:
            self._emit(log, tail, cut=False)
        self.over = False


class ModelOutput:
    """A model process's stdout and stderr, read as they come in bounded pieces, into the log of the call being
    answered (`routed`) or, between calls, into stderr; the last lines of stderr are kept for an error message."""

    def __init__(self, model: str, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        self.model = model
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._lock = threading.Lock()
        self._log = self._idle()
        self._wake_read, self._wake = os.pipe()
        self._streams = [_Lines("stdout", stdout), _Lines("stderr", stderr)]
        self._pumps = [
            threading.Thread(target=self._pump, args=(lines,), daemon=True, name=f"modelpex-{lines.name}")
            for lines in self._streams
        ]
        for pump in self._pumps:
            pump.start()

    def _idle(self) -> CallLog:
        log = stderr_log()
        log.bind(self.model)
        return log

    def _pump(self, lines: _Lines) -> None:
        while True:
            ready, _, _ = select.select([lines.fd, self._wake_read], [], [])
            if self._wake_read in ready:
                return
            with self._lock:
                if not self._read(lines):
                    return

    def _read(self, lines: _Lines) -> bool:
        """One chunk of ``lines`` into the current log; ``False`` at its end."""
        if lines.ended:
            return False
        try:
            chunk = os.read(lines.fd, _READ)
        except BlockingIOError:
            return True
        except OSError:
            chunk = b""
        if not chunk:
            lines.end(self._log, self._tail(lines))
            lines.ended = True
            return False
        lines.feed(chunk, self._log, self._tail(lines))
        return True

    def _tail(self, lines: _Lines) -> deque[str] | None:
        return self.tail if lines.name == "stderr" else None

    @contextmanager
    def routed(self, log: CallLog | None, drain_seconds: float = 1.0) -> Iterator[None]:
        """The model's output goes to ``log`` until the block ends; then what it wrote before is read to the end."""
        if log is None:
            yield
            return
        log.bind(self.model)
        with self._lock:
            idle, self._log = self._log, log
        idle.close()
        try:
            yield
        finally:
            self._drain(drain_seconds)
            with self._lock:
                self._log = self._idle()

    def _drain(self, seconds: float) -> None:
        """Read what the model wrote before its answer (the pipes may still hold it), for at most ``seconds``: a
        process that keeps writing after its call does not hold the call up."""
        deadline = time.monotonic() + seconds
        with self._lock:
            for lines in self._streams:
                while time.monotonic() < deadline and self._read(lines):
                    if not select.select([lines.fd], [], [], 0)[0]:
                        break
                lines.end(self._log, self._tail(lines))

    def close(self) -> None:
        """After the process ended: read what is left (briefly), stop the readers, write the last notes."""
        if self._wake < 0:
            return
        self._drain(0.5)
        os.write(self._wake, b"x")
        for pump in self._pumps:
            pump.join(timeout=1)
        os.close(self._wake)
        os.close(self._wake_read)
        self._wake = self._wake_read = -1
        self._log.close()
