"""The store room: where peers live. One small interface, one backend per database.

Backends: `sqlite` (embedded default) and, later, `postgres`. The store answers point queries
by public key, advances the anti-replay high-water mark atomically, and exposes a change feed
(a monotonically increasing cursor) so gateways learn about revocations. No policy here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from wgjit.addr import IPNetwork
from wgjit.keys import PresharedKey, PublicKey

DEFAULT_STORE_URL = "sqlite:///var/lib/wgjit/peers.db"


class StoreError(Exception):
    """A store operation failed; the message says what and how to fix it."""


class DuplicatePeer(StoreError):
    pass


class UnknownPeer(StoreError):
    pass


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    public_key: PublicKey
    allowed_ips: tuple[IPNetwork, ...]
    preshared_key: PresharedKey | None = None
    revoked: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    last_seen: float | None = None
    # TAI64N (12 bytes) of the newest initiation accepted from this peer; compares bytewise
    handshake_hwm: bytes | None = None


@dataclass(frozen=True, slots=True)
class Handshake:
    """An authenticated initiation to remember: its TAI64N timestamp and when it was seen."""

    public_key: PublicKey
    timestamp: bytes
    seen_at: float


class Store(Protocol):
    def add_peer(
        self,
        name: str,
        public_key: PublicKey,
        allowed_ips: tuple[IPNetwork, ...],
        preshared_key: PresharedKey | None = None,
    ) -> Peer:
        """Raises DuplicatePeer if the name or the key exists."""
        ...

    def get_peer(self, name: str) -> Peer | None: ...

    def lookup(self, public_key: PublicKey) -> Peer | None:
        """Point query by public key (the gateway's hot path)."""
        ...

    def list_peers(self) -> list[Peer]: ...

    def revoke(self, name: str) -> Peer:
        """Mark revoked; raises UnknownPeer."""
        ...

    def remove(self, name: str) -> Peer:
        """Delete; returns what was deleted; raises UnknownPeer."""
        ...

    def advance_handshake(self, hs: Handshake) -> bool:
        """Atomically: if hs.timestamp > the stored mark (or none), store it and last_seen and
        return True; otherwise change nothing and return False."""
        ...

    def record_handshakes(self, handshakes: Iterable[Handshake]) -> None:
        """Batch of advance_handshake for already-installed peers (marks only move forward)."""
        ...

    def change_cursor(self) -> int:
        """The current position of the change feed (a gateway starts watching from here)."""
        ...

    def changes_since(self, cursor: int) -> tuple[list[PublicKey], int]:
        """Public keys of peers added, changed, revoked or removed after `cursor` (deduplicated),
        and the new cursor. Cheap when nothing changed: the gateway calls it every ~0.5 s."""
        ...

    def close(self) -> None: ...


def open_store(url: str) -> Store:
    """Open a store by URL: `sqlite:///abs/path.db`, `sqlite:relative.db` or a plain path."""
    from wgjit.store.sqlite import SQLiteStore, path_from_url

    if url.startswith(("postgres://", "postgresql://")):
        raise StoreError("PostgreSQL store is not available in this version; use sqlite:///PATH")
    return SQLiteStore(path_from_url(url))
