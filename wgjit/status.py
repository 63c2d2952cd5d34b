"""What `wgjit status` reports, gathered from the store alone (so it works from any host that
reaches the store, with or without a gateway on it): the live gateways as their heartbeats
describe them, how many peers the store has, and the busiest peers by total traffic. Plus the
small formatting helpers its table uses. No printing here: the CLI (and an API) render it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from wgjit.store import GatewayPresence, Peer, Store

DEFAULT_TOP = 10


@dataclass(frozen=True, slots=True)
class StatusReport:
    peers: int  # peers in the store
    gateways: list[GatewayPresence]
    busiest: list[Peer]  # most traffic (rx + tx) first
    at: float  # unix time of the report


def gather(store: Store, top: int = DEFAULT_TOP) -> StatusReport:
    """Three store reads: gateways with their claims, the peer count, the `top` busiest."""
    if top < 0:
        raise ValueError(f"--top must be 0 or more, got {top}")
    return StatusReport(
        peers=store.count_peers(),
        gateways=store.gateways(),
        busiest=store.busiest_peers(top) if top else [],
        at=time.time(),
    )


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; bytes below 1 KiB as they are."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def ago(t: float | None, now: float) -> str:
    """How long before `now` unix time `t` was, shortly ('42s ago', '3m ago', '5h ago',
    '2d ago'); '-' for None (never)."""
    if t is None:
        return "-"
    s = max(0, int(now - t))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if s >= size:
            return f"{s // size}{unit} ago"
    return f"{s}s ago"
