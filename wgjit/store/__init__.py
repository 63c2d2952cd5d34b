"""The store room: where peers live. One small interface, one backend per database.

Backends: `sqlite` (embedded default, one host) and `postgresql` (one database shared by many
gateways). The store answers point queries by public key, advances the anti-replay high-water
mark atomically, records which gateway holds which peer (presence), and exposes a change feed
(a monotonically increasing cursor) so gateways learn about revocations and handoffs. No policy
here.

Every method may be called from any thread, also by two threads at once, and no call waits
without bound: each backend has its time limits (lock and statement timeouts, a deadline for
an answer); a limit that runs out is a StoreError.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Protocol, Self

from wgjit.addr import IPNetwork
from wgjit.errors import WgjitError
from wgjit.keys import PresharedKey, PublicKey

DEFAULT_STORE_URL = "sqlite:///var/lib/wgjit/peers.db"
# a gateway silent for longer than this (no heartbeat) loses its claims on peers
PRESENCE_TTL_S = 30.0
# lookup_many/claim_many send at most this many keys per query
MANY_CHUNK = 1000


class StoreError(WgjitError):
    """A store operation failed; the message says what and how to fix it."""


class DuplicatePeer(StoreError):
    pass


class UnknownPeer(StoreError):
    pass


class InvalidPeerName(StoreError):
    pass


class PeerRefused(StoreError):
    """The peer's key or allowed IPs are refused (see wgjit.store.prefixes): a low-order key,
    a special-purpose range, or a prefix that overlaps another peer's; the message names it."""


class ChangeFeedExpired(StoreError):
    """A change-feed cursor can no longer be followed: the changes after it were pruned (the
    reader fell more than a day behind) or the store was replaced. Resynchronise: take
    `change_cursor()`, then `lookup()` every key you hold."""


# what `Peer.state` can be; `Store.list_page(state=...)` filters by one
PEER_STATES: Final = ("active", "disabled", "expired", "revoked")
# the most peers one list_page() call returns
MAX_PAGE: Final = 10000


def prefix_bound(prefix: str) -> str | None:
    """The least string greater than every string that starts with `prefix` (code point order,
    which is UTF-8 byte order), or None if there is none: `name >= prefix AND name < bound`
    selects exactly the names with that prefix, as an index range."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            return "".join(chars) + chr(last + 1)
    return None


PEER_NAME_CHARS = "letters, digits, '.', '_', '@' and '-'"
_PEER_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")


def validate_peer_name(name: str) -> str:
    """Return `name` if it is 1-64 of [A-Za-z0-9._@-]; raise InvalidPeerName otherwise."""
    if not isinstance(name, str) or not _PEER_NAME.fullmatch(name):
        raise InvalidPeerName(
            f"invalid peer name {name!r}: use 1-64 characters, only {PEER_NAME_CHARS}"
        )
    return name


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
    # the gateway that last claimed (installed) this peer and is alive, if any
    holder: str | None = None
    # refused while set, like a revoked peer, but `peer enable` brings it back
    disabled: bool = False
    # unix seconds after which the peer is refused (reason "expired"); None: never
    expires_at: float | None = None
    # what gateways' devices saw of the peer, kept across installs (each reinstall restarts
    # the device's counters; gateways add what they counted, see Store.record_traffic):
    # bytes received from and sent to it in total, its newest handshake (unix seconds) and
    # the endpoint it last used (host:port)
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: float | None = None
    endpoint: str | None = None

    def refusal(self, now: float) -> str | None:
        """Why a gateway must refuse (and evict) this peer at unix time `now`: "revoked",
        "disabled" or "expired"; None while it may connect."""
        if self.revoked:
            return "revoked"
        if self.disabled:
            return "disabled"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return None

    @property
    def state(self) -> str:
        """What `peer list` shows: revoked, disabled, expired or active (now)."""
        return self.refusal(time.time()) or "active"


class Keep:
    """The type of KEEP: "leave this field as it is" where None is a value (no expiry)."""

    _instance: Keep | None = None

    def __new__(cls) -> Keep:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = Keep()


@dataclass(slots=True)
class ImportResult:
    """What `Store.import_peers` did with one batch. `rejected` holds (index in the batch,
    reason) for rows that were skipped."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    # added peers whose key the store had before (removed or re-keyed): they keep its mark
    reused_keys: int = 0


@dataclass(frozen=True, slots=True)
class Handshake:
    """An authenticated initiation to remember: its TAI64N timestamp and when it was seen."""

    public_key: PublicKey
    timestamp: bytes
    seen_at: float


@dataclass(frozen=True, slots=True)
class Traffic:
    """What a gateway's device counted for one peer since the gateway last said so: bytes
    received and sent (deltas, added to the stored totals), its last handshake (unix seconds;
    None: none yet) and its endpoint (None: unknown, the stored one stays)."""

    public_key: PublicKey
    rx_bytes: int
    tx_bytes: int
    last_handshake: float | None = None
    endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class GatewayPresence:
    """A live gateway as its heartbeats describe it (`Store.gateways`)."""

    gateway_id: str
    heartbeat_at: float  # unix seconds
    # peers on its device, as of its last heartbeat; None: it did not say (an older wgjit)
    installed: int | None
    claimed: int  # peers the store records it as holding
    # knocks it dropped since it started, by reason (Outcome labels)
    rejects: dict[str, int] = field(default_factory=dict)


def newest_handshakes(handshakes: Iterable[Handshake]) -> list[Handshake]:
    """One handshake per key, the newest (what admit_many() admits), ordered by key: stores
    that lock rows take them in one order, so concurrent batches cannot deadlock."""
    newest: dict[bytes, Handshake] = {}
    for h in handshakes:
        old = newest.get(h.public_key.raw)
        if old is None or h.timestamp > old.timestamp:
            newest[h.public_key.raw] = h
    return [newest[k] for k in sorted(newest)]


class Store(Protocol):
    def add_peer(
        self,
        name: str,
        public_key: PublicKey,
        allowed_ips: tuple[IPNetwork, ...],
        preshared_key: PresharedKey | None = None,
        *,
        allow_overlap: bool = False,
        expires_at: float | None = None,
    ) -> Peer:
        """Raises DuplicatePeer if the name or the key exists, InvalidPeerName for a bad name,
        PeerRefused for a low-order key, a special-purpose prefix or one that overlaps another
        peer's (`allow_overlap` permits overlaps, link-local and default routes). A key the
        store had before (its peer removed or re-keyed) keeps its anti-replay mark: the
        returned peer's handshake_hwm is then not None."""
        ...

    def update_peer(
        self,
        name: str,
        *,
        new_name: str | None = None,
        public_key: PublicKey | None = None,
        allowed_ips: tuple[IPNetwork, ...] | None = None,
        preshared_key: PresharedKey | Keep | None = KEEP,
        disabled: bool | None = None,
        expires_at: float | Keep | None = KEEP,
        allow_overlap: bool = False,
    ) -> Peer:
        """Change what is given (None / KEEP: unchanged) in one transaction; returns the peer.
        Every change that a gateway must act on is in the change feed: a new key announces the
        old key and the new (the old is refused at once: lookup() no longer finds it) and
        drops the old key's claim. The old key's anti-replay mark is retired with it (kept for
        that key, as remove() keeps it); the peer takes the new key's retired mark if it has
        one, else none (the new key's handshakes start afresh). Same checks as add_peer;
        raises UnknownPeer, DuplicatePeer, InvalidPeerName, PeerRefused."""
        ...

    def get_peer(self, name: str) -> Peer | None: ...

    def get_defaults(self) -> dict[str, str]:
        """The store-wide defaults (`wgjit store set-defaults`) as option name -> text."""
        ...

    def set_defaults(self, changes: Mapping[str, str | None]) -> dict[str, str]:
        """Set (a value) or clear (None) some defaults in one transaction; returns them all.
        The store keeps the text as given: the CLI checks it (wgjit.store.pool, clientconf).
        Not a change-feed entry: gateways do not use defaults."""
        ...

    def lookup(self, public_key: PublicKey) -> Peer | None:
        """Point query by public key (the gateway's hot path)."""
        ...

    def lookup_many(self, public_keys: Sequence[PublicKey]) -> dict[PublicKey, Peer]:
        """lookup() for many keys: the peers of the keys that exist (absent keys are simply
        missing; duplicates are fine). One query per MANY_CHUNK keys; each chunk is one
        consistent read, the whole is not (a peer changed meanwhile is in the change feed)."""
        ...

    def list_peers(self) -> list[Peer]: ...

    def list_page(
        self,
        *,
        after: str = "",
        limit: int = 100,
        prefix: str = "",
        state: str | None = None,
        now: float | None = None,
    ) -> list[Peer]:
        """One page of peers in name order (code point order, on every backend: SQLite's
        BINARY, PostgreSQL's "C" collation): names greater than `after` (the last name of the
        previous page; "" for the first), starting with `prefix`, in `state` (one of
        PEER_STATES, as `Peer.state` has it at unix time `now`, default the current time; None:
        any); at most `limit` (1..MAX_PAGE, else ValueError). Keyset pagination: each page is
        an index range walk from `after`, never a scan of all peers, whatever page it is; a
        rare state walks an index of its own (partial indexes on revoked, disabled, expiring)."""
        ...

    def revoke(self, name: str) -> Peer:
        """Mark revoked (revoking twice is fine); raises UnknownPeer."""
        ...

    def remove(self, name: str) -> Peer:
        """Delete; returns what was deleted; raises UnknownPeer. The key's anti-replay mark is
        kept (a table of retired keys), so adding or importing the key again restores it."""
        ...

    def reset_handshake_mark(self, name: str) -> Peer:
        """Clear the peer's anti-replay mark (the next initiation with any timestamp is
        admitted once); returns the peer as it was; raises UnknownPeer. Not a change-feed
        entry: a gateway holding the peer keeps what it has seen (its device does too)."""
        ...

    def advance_handshake(self, hs: Handshake) -> bool:
        """Atomically: if hs.timestamp > the stored mark (or none), store it and last_seen and
        return True; otherwise change nothing and return False."""
        ...

    def admit_many(
        self, handshakes: Sequence[Handshake], gateway_id: str
    ) -> dict[PublicKey, str | None]:
        """Admit a herd's initiations: for each, advance_handshake() and, if it moved the
        mark, claim() — one transaction per MANY_CHUNK handshakes and a fixed number of
        statements each. Returns the admitted keys (those whose mark moved) with the gateway
        that held each before (None: none, or this one). Keys not returned were replays, or
        peers gone from the store. One key per call (the newest handshake wins otherwise)."""
        ...

    def record_handshakes(self, handshakes: Iterable[Handshake]) -> None:
        """Batch of advance_handshake for already-installed peers (marks only move forward)."""
        ...

    def change_cursor(self) -> int:
        """The current position of the change feed (a gateway starts watching from here)."""
        ...

    def changes_since(self, cursor: int) -> tuple[list[PublicKey], int]:
        """Public keys of peers added, changed, revoked or removed after `cursor` (deduplicated),
        and the new cursor. Cheap when nothing changed: the gateway calls it every ~0.5 s.
        Handshake bookkeeping (advance_handshake, record_handshakes) is not a change.
        Raises ChangeFeedExpired if `cursor` can no longer be followed (see there)."""
        ...

    def wakeup_fd(self) -> int | None:
        """A file descriptor that becomes readable when changes_since() may have news (a wake-up
        only: changes_since() is still the truth, and drains it), or None while there is none:
        then poll. It may change over time (reconnects); ask again after each changes_since()."""
        ...

    def claim(self, public_key: PublicKey, gateway_id: str) -> str | None:
        """Record that `gateway_id` now holds the peer. If another gateway held it, that
        gateway learns it through the change feed (the key appears, lookup() shows the new
        holder); returns that previous holder, else None."""
        ...

    def claim_many(self, public_keys: Sequence[PublicKey], gateway_id: str) -> None:
        """claim() for many keys (a gateway adopting the peers on its device at start): one
        statement per MANY_CHUNK keys, each chunk atomic (a failure leaves the chunks before
        it done; calling again is harmless). A key another gateway held appears in the change
        feed, exactly as with claim(), so that gateway drops the peer. Keys no longer in the
        store are skipped (their removal is in the change feed already)."""
        ...

    def release(self, public_keys: Iterable[PublicKey], gateway_id: str) -> None:
        """Drop `gateway_id`'s claims on these peers (claims by other gateways are kept)."""
        ...

    def heartbeat(
        self,
        gateway_id: str,
        *,
        installed: int | None = None,
        rejects: Mapping[str, int] | None = None,
    ) -> None:
        """Say `gateway_id` is alive; expire the claims of gateways silent for too long. It
        may also say how many peers its device holds and how many knocks it dropped, by
        reason (kept as given until its next heartbeat; `gateways()` shows them)."""
        ...

    def gateways(self) -> list[GatewayPresence]:
        """The live gateways (heartbeat within PRESENCE_TTL_S), by id, with their claims."""
        ...

    def record_traffic(self, rows: Sequence[Traffic]) -> None:
        """Add each row's byte counts to its peer's totals, move its last handshake forward
        (never back) and take its endpoint if given. Keys not in the store are skipped (the
        peer was removed meanwhile); a key given twice counts twice. One statement per
        MANY_CHUNK rows (never a round trip per peer). Not a change-feed entry."""
        ...

    def busiest_peers(self, limit: int) -> list[Peer]:
        """The `limit` peers with the most traffic in total (rx + tx), most first; peers
        without any are left out."""
        ...

    def count_peers(self) -> int:
        """How many peers the store has."""
        ...

    def import_peers(
        self, peers: Sequence[Peer], *, allow_overlap: bool = False, dry_run: bool = False
    ) -> ImportResult:
        """Add or update (by name) a batch of peers in one transaction: idempotent. A row whose
        key belongs to another peer, or whose name exists with another key, is rejected, and so
        is one add_peer() would refuse (PeerRefused: checked against stored peers and the
        batch's earlier rows). An
        import can revoke a peer but never reinstates a revoked one (an old file re-imported
        must not bring back revoked peers): remove and re-add it for that. Likewise an import
        never widens an existing peer's access: it can disable but not enable, and an expiry
        only moves earlier (a row without one leaves the stored one); and a peer's
        handshake_hwm only moves forward: the stored mark becomes the later of the stored
        and the imported one (and a new peer whose key was retired keeps the retired mark).
        New peers take the row's disabled, expires_at and handshake_hwm as they are (a
        restored backup). `dry_run`: the same checks and result, nothing written (`peer
        import --strict` checks a file so)."""
        ...

    def iter_peers(self) -> Iterator[Peer]:
        """Every peer ordered by name, streamed (for export of millions of rows)."""
        ...

    def close(self) -> None:
        """Idempotent; any later call raises StoreError."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Closes the store."""
        ...


def open_store(url: str, *, create: bool = True) -> Store:
    """Open a store by URL: `sqlite:///abs/path.db`, `sqlite:relative.db`, a plain path, or
    `postgresql://...` / `postgres://...` (libpq URI, e.g. `postgresql:///wgjit?host=/run/pg`)
    or libpq's keyword/value form (`host=/run/pg dbname=wgjit`).
    Opening applies pending schema migrations.

    `create=False` opens only an existing, initialised store (what every command that does
    not add peers wants: a mistyped URL must fail, not yield a new empty store); a missing
    SQLite file or a database without wgjit's schema raises StoreError naming `wgjit store
    init`. Upgrading an existing store's schema is not creating one: it happens either way.

    Raises StoreError (with a one-line reason) if it cannot be opened or created."""
    from wgjit.store.urls import is_postgres

    if is_postgres(url):
        from wgjit.store.postgres import PostgresStore

        return PostgresStore(url.strip(), create=create)
    from wgjit.store.sqlite import SQLiteStore, path_from_url

    return SQLiteStore(path_from_url(url), create=create)
