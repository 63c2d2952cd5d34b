"""Many peers at once for scale tests and benchmarks: on a lab gateway's device (one `wg addconf`
transaction) and in its store (one `import_peers` batch), so that the gateway's reconcile finds
every device peer allowed and keeps it.

Keys are random 32-byte strings (any 32 bytes are a valid X25519 public key); callers that must
handshake as some of these peers pass their own keys for those. Allowed IPs: one /32 per peer
from 10.0.0.0/8, away from the lab's tunnel range.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Sequence
from pathlib import Path

from wgjit.keys import PublicKey
from wgjit.lab import Host
from wgjit.store import Peer, open_store

BULK_NET = 0x0A000000  # 10.0.0.0


def bulk_peers(n: int, prefix: str = "bulk", keys: Sequence[PublicKey] = ()) -> list[Peer]:
    """`n` peers named PREFIX-I; the first len(keys) use `keys`, the rest random keys."""
    if not 0 < n <= 1 << 24 or len(keys) > n:
        raise ValueError(f"n={n}, {len(keys)} given keys: need 0 < len(keys) <= n <= 2**24")
    out = []
    for i in range(n):
        key = keys[i] if i < len(keys) else PublicKey(os.urandom(32))
        net = ipaddress.IPv4Network((BULK_NET + i, 32))
        out.append(Peer(f"{prefix}-{i}", key, (net,)))
    return out


def load_device(gw: Host, peers: Sequence[Peer], path: Path) -> float:
    """Add `peers` to the gateway's device in one `wg addconf` (one UAPI transaction on
    wireguard-go); the seconds it took. `path` is a scratch file for the config."""
    with path.open("w") as f:
        for p in peers:
            ips = ",".join(str(n) for n in p.allowed_ips)
            f.write(f"[Peer]\nPublicKey = {p.public_key.b64()}\nAllowedIPs = {ips}\n")
    t = time.monotonic()
    try:
        gw.wg("addconf", gw.ifname, str(path))
    finally:
        path.unlink(missing_ok=True)
    return time.monotonic() - t


def load_store(store_url: str, peers: Sequence[Peer]) -> float:
    """Import `peers` into the store (the path of `wgjit peer import`); the seconds it took."""
    t = time.monotonic()
    with open_store(store_url) as store:
        result = store.import_peers(peers)
    if result.rejected or result.added != len(peers):
        raise RuntimeError(f"bulk import: {result}")
    return time.monotonic() - t
