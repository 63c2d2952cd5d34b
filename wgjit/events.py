"""Structured log lines: one line per event, logfmt (`key=value`) or JSON.

Every install, eviction and rejection is one line with its reason, so operators can grep and
ship them. This module formats and parses; it decides nothing.
"""

from __future__ import annotations

import json
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

_NEEDS_QUOTES = re.compile(r'[\s"=]')


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        s = f"{v:.3f}".rstrip("0").rstrip(".") if v == v else "nan"
    elif isinstance(v, bool):
        s = "true" if v else "false"
    else:
        s = str(v)
    if s == "" or _NEEDS_QUOTES.search(s):
        return json.dumps(s)
    return s


def format_logfmt(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt_value(v)}" for k, v in fields.items() if v is not None)


_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in _PAIR.findall(line):
        out[k] = json.loads(v) if v.startswith('"') else v
    return out


class EventLog:
    """Writes events to a stream, thread-safe. `level` is info/warning/error/debug.

    With `background=True` lines go through a bounded queue to a writer thread, so a slow
    reader of the stream (a full pipe, a stalled journal) never blocks the caller: when the
    queue is full the line is dropped and counted in `dropped`. `close()` writes what is
    queued (for at most `timeout` seconds)."""

    QUEUE_LINES = 10000

    def __init__(
        self,
        stream: IO[str] | None = None,
        fmt: str = "text",
        debug: bool = False,
        background: bool = False,
    ):
        self.stream = stream or sys.stdout
        self.fmt = fmt
        self.debug_enabled = debug
        self.dropped = 0
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] | None = None
        self._writer: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(self.QUEUE_LINES)
            self._writer = threading.Thread(
                target=self._write_queued, name="wgjit-log", daemon=True
            )
            self._writer.start()

    def subscribe(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        """Call `listener(event, fields)` for every event (debug ones too), on the emitting
        thread: it must only take note (metrics count, hooks enqueue), never block."""
        self._listeners.append(listener)

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        for listener in self._listeners:
            listener(event, fields)
        if level == "debug" and not self.debug_enabled:
            return
        t = time.time()
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
        record: dict[str, Any] = {"ts": ts, "level": level, "event": event, **fields}
        if self.fmt == "json":
            line = json.dumps({k: v for k, v in record.items() if v is not None}, default=str)
        else:
            line = format_logfmt(record)
        if self._queue is not None:
            try:
                self._queue.put_nowait(line)
            except queue.Full:
                self.dropped += 1
            return
        self._write(line)

    def _write(self, line: str) -> None:
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def _write_queued(self) -> None:
        assert self._queue is not None
        while (line := self._queue.get()) is not None:
            try:
                self._write(line)
            except (OSError, ValueError):
                self.dropped += 1

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (background mode) and stop the writer."""
        if self._queue is None or self._writer is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._writer.join(timeout)
        self._queue = None

    def info(self, event: str, **fields: Any) -> None:
        self.emit(event, "info", **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.emit(event, "warning", **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.emit(event, "error", **fields)

    def debug(self, event: str, **fields: Any) -> None:
        self.emit(event, "debug", **fields)
