"""How the web page shows values: one `cell()` for every table cell, escaping everything.

Peer names, endpoints and every other value may come from users: the templates autoescape, and
`cell()` builds its markup from escaped parts only (markupsafe), so no value is ever markup.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from markupsafe import Markup, escape

# peer fields shown as table columns when the service's peer output has them (h-status adds
# holder, endpoint, last_handshake and the traffic totals): (field, column title)
PEER_STATUS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("holder", "Gateway"),
    ("endpoint", "Endpoint"),
    ("last_handshake", "Last handshake"),
    ("rx_bytes", "Received"),
    ("tx_bytes", "Sent"),
    ("expires_at", "Expires"),
)
_BYTES_FIELDS = frozenset({"rx_bytes", "tx_bytes", "rx", "tx", "bytes"})


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("wgjit.web", "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["cell"] = cell
    env.globals["title"] = title
    return env


def human_bytes(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_time(text: str) -> float | None:
    """An ISO 8601 time with its offset (the service writes `...Z`) as unix seconds."""
    if len(text) < 20 or text[4:5] != "-" or "T" not in text:
        return None
    try:
        dt = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt.timestamp() if dt.tzinfo is not None else None


def ago(seconds: float) -> str:
    s = int(seconds)
    future = s < 0
    s = abs(s)
    if s < 60:
        text = f"{s} s"
    elif s < 3600:
        text = f"{s // 60} min"
    elif s < 86400:
        text = f"{s // 3600} h {s % 3600 // 60} min"
    else:
        text = f"{s // 86400} d"
    return f"in {text}" if future else f"{text} ago"


def cell(field: str, value: Any, now: float | None = None) -> Markup:
    """One value as table-cell markup (escaped): times as 'N s ago' with the ISO time as a
    tooltip, byte counts in KiB/MiB, mappings (rejects by reason) as `key value` pairs."""
    if value is None or value == "" or value == [] or value == {}:
        return Markup('<span class="muted">—</span>')
    if isinstance(value, bool):
        return Markup("yes") if value else Markup("no")
    if isinstance(value, int | float) and (field in _BYTES_FIELDS or field.endswith("_bytes")):
        return Markup('<span title="{} bytes">{}</span>').format(value, human_bytes(value))
    if isinstance(value, str):
        t = parse_time(value)
        if t is not None:
            rel = ago((time.time() if now is None else now) - t)
            return Markup('<time datetime="{0}" title="{0}">{1}</time>').format(value, rel)
        return escape(value)
    if isinstance(value, Mapping):
        parts = [
            Markup('<span class="kv">{} <b>{}</b></span>').format(k, cell(str(k), v, now))
            for k, v in value.items()
        ]
        return Markup(" ").join(parts)
    if isinstance(value, Sequence):
        return Markup(", ").join(cell(field, v, now) for v in value)
    return escape(str(value))


_TITLES = {
    **dict(PEER_STATUS_COLUMNS),
    "holder": "Gateway (holding it)",
    "allowed_ips": "Allowed IPs",
    "handshake_mark": "Replay mark (client's clock)",
    "last_seen": "Last seen",
}


def title(field: str) -> str:
    return _TITLES.get(field) or field.replace("_", " ").capitalize()
