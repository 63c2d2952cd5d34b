"""Structured log lines: one line per event, logfmt (`key=value`) or JSON.

Every install, eviction and rejection is one line with its reason, so operators can grep and
ship them. This module formats and parses; it decides nothing.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
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
    """Writes events to a stream, thread-safe. `level` is info/warning/error/debug."""

    def __init__(self, stream: IO[str] | None = None, fmt: str = "text", debug: bool = False):
        self.stream = stream or sys.stdout
        self.fmt = fmt
        self.debug_enabled = debug
        self._lock = threading.Lock()

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        if level == "debug" and not self.debug_enabled:
            return
        t = time.time()
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
        record: dict[str, Any] = {"ts": ts, "level": level, "event": event, **fields}
        if self.fmt == "json":
            line = json.dumps({k: v for k, v in record.items() if v is not None}, default=str)
        else:
            line = format_logfmt(record)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def info(self, event: str, **fields: Any) -> None:
        self.emit(event, "info", **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.emit(event, "warning", **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.emit(event, "error", **fields)

    def debug(self, event: str, **fields: Any) -> None:
        self.emit(event, "debug", **fields)
