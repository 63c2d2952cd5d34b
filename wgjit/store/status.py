"""What both store backends share about per-peer status and gateway presence: merging a
batch of traffic rows and reading a heartbeat's row. No SQL and no I/O here."""

from __future__ import annotations

import json
from collections.abc import Iterable

from wgjit.store import GatewayPresence, Traffic


def merged(rows: Iterable[Traffic]) -> list[Traffic]:
    """One row per key, in key order: a key given twice counts twice (bytes added, the later
    handshake, the last endpoint given). Sorted, so that two gateways writing overlapping
    batches lock rows in the same order."""
    by_key: dict[bytes, Traffic] = {}
    for t in rows:
        if t.rx_bytes < 0 or t.tx_bytes < 0:
            raise ValueError(f"traffic of {t.public_key.short()}... is negative")
        seen = by_key.get(t.public_key.raw)
        if seen is not None:
            hs = [h for h in (seen.last_handshake, t.last_handshake) if h is not None]
            t = Traffic(
                t.public_key,
                seen.rx_bytes + t.rx_bytes,
                seen.tx_bytes + t.tx_bytes,
                max(hs) if hs else None,
                t.endpoint if t.endpoint is not None else seen.endpoint,
            )
        by_key[t.public_key.raw] = t
    return [by_key[k] for k in sorted(by_key)]


def presence(
    gateway_id: object,
    heartbeat_at: object,
    installed: object,
    rejects: object,
    claimed: object,
) -> GatewayPresence:
    """A `gateways` row (with its count of claims) as a GatewayPresence. A rejects column that
    is not a JSON object of counts (written by hand, or by a newer wgjit) reads as none."""
    counts: dict[str, int] = {}
    if isinstance(rejects, str):
        try:
            said = json.loads(rejects)
        except ValueError:
            said = None
        if isinstance(said, dict):
            counts = {str(k): v for k, v in said.items() if isinstance(v, int) and v > 0}
    return GatewayPresence(
        gateway_id=str(gateway_id),
        heartbeat_at=float(heartbeat_at),  # type: ignore[arg-type]
        installed=int(installed) if installed is not None else None,  # type: ignore[call-overload]
        claimed=int(claimed),  # type: ignore[call-overload]
        rejects=counts,
    )
