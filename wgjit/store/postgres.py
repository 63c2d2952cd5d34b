"""PostgreSQL peer store: one database shared by the CLI and many gateways on many hosts.

Same Store protocol as the SQLite backend: versioned schema migrations, atomic anti-replay marks
(one conditional UPDATE), a trigger-fed change feed with a sequence, presence (which gateway
holds which peer) and bulk import. NOTIFY on the feed is only a wake-up: nothing assumes a
notification is delivered, readers always read the persistent feed from their cursor.
It makes no policy decisions and never lets a psycopg exception escape: failures are StoreError.

Threads: every method may be called from any thread, several at once (a connection pool; the
LISTEN connection has a thread of its own that pokes an eventfd, see wakeup_fd()).

Every wait is bounded. Defaults, each overridden by the same parameter in the store URL (e.g.
`postgresql://db/wgjit?lock_timeout=3s&statement_timeout=30s&connect_timeout=10`):

- `connect_timeout=5` (s): opening a connection. A call waits at most POOL_WAIT_S (2 s) for a
  pooled connection; after such a wait failed, the calls of the next FAIL_FAST_S (1 s) fail at
  once (the server is down: installed peers keep working, new ones cannot be admitted).
- `lock_timeout=1s`: a row lock held by another session (an operator's open `psql`
  transaction, a long import) costs a call that needs the row at most this, then it fails
  ("stayed locked by another session").
- `statement_timeout=5s`: the server cancels a statement that runs longer.
- the answer deadline: a server that stops answering altogether (frozen by SIGSTOP, a hung
  host, a network that silently drops packets) cannot cancel anything, so the client shuts the
  connection down when a call has had no answer for statement_timeout + ANSWER_GRACE_S (6 s by
  default; `statement_timeout=0` turns off both); the calls of the next FAIL_FAST_S fail at once.
- `keepalives=1&keepalives_idle=10&keepalives_interval=3&keepalives_count=3` and
  `tcp_user_timeout=10000` (ms), TCP only: a dead network path is noticed by the kernel within
  about 10-20 s, also on idle connections (the LISTEN connection then reconnects).
`statement_timeout` and `lock_timeout` take PostgreSQL durations (`1500ms`, `2s`, `1min`; a bare
number is milliseconds) and are sent as `options=-c ...`; settings already in `options` (or
PGOPTIONS) count too, and a URL parameter wins over both. `connect_timeout` also honours
PGCONNECT_TIMEOUT.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, TypeVar

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from wgjit.addr import InvalidAddress, IPNetwork, format_networks, parse_network
from wgjit.closing import Closing
from wgjit.keys import InvalidKey, PresharedKey, PublicKey
from wgjit.store import (
    KEEP,
    MANY_CHUNK,
    MAX_PAGE,
    PEER_STATES,
    PRESENCE_TTL_S,
    ChangeFeedExpired,
    DuplicatePeer,
    GatewayPresence,
    Handshake,
    ImportResult,
    Keep,
    Peer,
    PeerRefused,
    StoreError,
    Traffic,
    UnknownPeer,
    newest_handshakes,
    prefix_bound,
    validate_peer_name,
)
from wgjit.store.prefixes import overlap_message, overlaps_within, peer_problem, plan_update
from wgjit.store.status import merged as _merged
from wgjit.store.status import presence
from wgjit.store.urls import redact, scrub

CHANNEL: Final = "wgjit_changes"
CONNECT_TIMEOUT_S: Final = 5.0
STATEMENT_TIMEOUT_S: Final = 5.0
LOCK_TIMEOUT_S: Final = 1.0
# the client gives up on a call this long after the server should have cancelled it
ANSWER_GRACE_S: Final = 1.0
# libpq TCP settings (ignored on unix sockets); tcp_user_timeout in ms (libpq >= 12)
TCP_DEFAULTS: Final = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "3",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
}
# a lost LISTEN connection is retried this often
LISTEN_RETRY_S: Final = 1.0
# a migration may wait this long for another process's migration (lock_timeout is for calls)
MIGRATE_LOCK_WAIT_S: Final = 30.0
# How long a call waits for a pooled connection, and how long after such a wait failed later
# calls fail at once: while the database is down, a gateway's loop must not stall on every
# store call (installed peers keep working; the loop keeps serving them).
POOL_WAIT_S: Final = 2.0
FAIL_FAST_S: Final = 1.0
# The pool replaces a lost connection in the background, retrying after 1, 2, 4, 8, ... s for
# up to its reconnect_timeout: after a 40 s outage the next try came ~20 s after the server
# was back (minutes after a longer one), and no peer could be admitted meanwhile. So each
# series of tries ends after this long; the next call that wants a connection starts a new
# one, at once: a server that is back is reached within a few seconds, however long it was
# gone.
RECONNECT_CYCLE_S: Final = 10.0
CHANGE_RETENTION_S: Final = 86400.0
TAI64N_LEN: Final = 12
# pg_advisory_xact_lock keys: feed writers are serialised so that sequence numbers are handed
# out in commit order (a reader never sees seq N+1 committed while N is still in flight)
_FEED_LOCK: Final = 0x776A6974_0001
_MIGRATE_LOCK: Final = 0x776A6974_0002
# writers of allowed IPs are serialised, so two concurrent adds cannot both miss an overlap
_PREFIX_LOCK: Final = 0x776A6974_0003
_HINT: Final = "choose another with --store or WGJIT_STORE"

_T = TypeVar("_T")
_NOW: Final = "extract(epoch FROM clock_timestamp())"

# Each step is a list of statements run in order, all steps in one transaction; the schema
# version (wgjit_schema.version) is the number of steps applied. Never edit a released step.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE peers (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name text NOT NULL,
            public_key bytea NOT NULL CHECK (length(public_key) = 32),
            allowed_ips text NOT NULL,
            preshared_key bytea CHECK (preshared_key IS NULL OR length(preshared_key) = 32),
            revoked boolean NOT NULL DEFAULT false,
            created_at double precision NOT NULL,
            updated_at double precision NOT NULL,
            last_seen double precision,
            handshake_hwm bytea CHECK (handshake_hwm IS NULL OR length(handshake_hwm) = 12)
        )""",
        "CREATE UNIQUE INDEX peers_by_name ON peers (name)",
        "CREATE UNIQUE INDEX peers_by_key ON peers (public_key)",
        """CREATE TABLE peer_changes (
            seq bigint PRIMARY KEY,
            public_key bytea NOT NULL,
            at double precision NOT NULL DEFAULT extract(epoch FROM clock_timestamp())
        )""",
        "CREATE SEQUENCE peer_changes_seq",
        # entries with seq < pruned_below may have been deleted
        "CREATE TABLE peer_feed_state (pruned_below bigint NOT NULL)",
        "INSERT INTO peer_feed_state VALUES (0)",
        f"""CREATE FUNCTION wgjit_feed(keys bytea[]) RETURNS void LANGUAGE plpgsql AS $$
        BEGIN
            IF coalesce(cardinality(keys), 0) = 0 THEN RETURN; END IF;
            PERFORM pg_advisory_xact_lock({_FEED_LOCK});
            INSERT INTO peer_changes (seq, public_key)
                SELECT nextval('peer_changes_seq'), k FROM unnest(keys) AS k;
            PERFORM pg_notify('{CHANNEL}', '');
        END $$""",
        """CREATE FUNCTION wgjit_feed_insert() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM wgjit_feed(ARRAY(SELECT public_key FROM new_rows));
            RETURN NULL;
        END $$""",
        """CREATE FUNCTION wgjit_feed_delete() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM wgjit_feed(ARRAY(SELECT public_key FROM old_rows));
            RETURN NULL;
        END $$""",
        """CREATE FUNCTION wgjit_feed_update() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF old.public_key IS DISTINCT FROM new.public_key THEN
                PERFORM wgjit_feed(ARRAY[old.public_key, new.public_key]);
            ELSE
                PERFORM wgjit_feed(ARRAY[new.public_key]);
            END IF;
            RETURN NULL;
        END $$""",
        # statement-level for inserts and deletes (bulk imports fire it once per batch)
        """CREATE TRIGGER peers_feed_insert AFTER INSERT ON peers
            REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
            EXECUTE FUNCTION wgjit_feed_insert()""",
        """CREATE TRIGGER peers_feed_delete AFTER DELETE ON peers
            REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
            EXECUTE FUNCTION wgjit_feed_delete()""",
        # handshake bookkeeping (last_seen, handshake_hwm) is not in the column list: no entry
        """CREATE TRIGGER peers_feed_update
            AFTER UPDATE OF name, allowed_ips, preshared_key, revoked, public_key ON peers
            FOR EACH ROW WHEN (
                (old.name, old.allowed_ips, old.preshared_key, old.revoked, old.public_key)
                IS DISTINCT FROM
                (new.name, new.allowed_ips, new.preshared_key, new.revoked, new.public_key))
            EXECUTE FUNCTION wgjit_feed_update()""",
        # presence: which gateway holds which peer, and which gateways are alive
        """CREATE TABLE gateways (
            gateway_id text PRIMARY KEY,
            heartbeat_at double precision NOT NULL
        )""",
        """CREATE TABLE peer_claims (
            public_key bytea PRIMARY KEY
                REFERENCES peers (public_key) ON DELETE CASCADE ON UPDATE CASCADE,
            gateway_id text NOT NULL,
            claimed_at double precision NOT NULL
        )""",
        "CREATE INDEX peer_claims_by_gateway ON peer_claims (gateway_id)",
    ),
    # 2: every allowed-IP prefix as a cidr row with a GiST index: overlaps (`&&`) are index
    #    searches, never a scan of every peer; filled from the peers already stored
    (
        """CREATE TABLE peer_prefixes (
            peer_id bigint NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
            net cidr NOT NULL
        )""",
        "CREATE INDEX peer_prefixes_by_net ON peer_prefixes USING gist (net inet_ops)",
        "CREATE INDEX peer_prefixes_by_peer ON peer_prefixes (peer_id)",
        """INSERT INTO peer_prefixes (peer_id, net)
            SELECT id, unnest(string_to_array(allowed_ips, ','))::cidr FROM peers
            WHERE allowed_ips <> ''""",
    ),
    # 3: lifecycle: disabled (refused until enabled again) and an expiry time; both are
    #    changes a gateway must learn, so the feed's update trigger now watches them too
    (
        "ALTER TABLE peers ADD COLUMN disabled boolean NOT NULL DEFAULT false,"
        " ADD COLUMN expires_at double precision",
        "DROP TRIGGER peers_feed_update ON peers",
        """CREATE TRIGGER peers_feed_update
            AFTER UPDATE OF name, allowed_ips, preshared_key, revoked, public_key, disabled,
                expires_at ON peers
            FOR EACH ROW WHEN (
                (old.name, old.allowed_ips, old.preshared_key, old.revoked, old.public_key,
                 old.disabled, old.expires_at)
                IS DISTINCT FROM
                (new.name, new.allowed_ips, new.preshared_key, new.revoked, new.public_key,
                 new.disabled, new.expires_at))
            EXECUTE FUNCTION wgjit_feed_update()""",
    ),
    # 4: the store never forgets a key's anti-replay mark. A key leaving the peers table (the
    #    peer removed, or its key changed) leaves its mark in retired_keys; a key coming back
    #    (added, imported, or a key changed to it) takes the greater of its mark and the
    #    retired one, and the retired row goes. A key is in at most one of the two tables.
    #    Only the mark moves: no feed entry (the feed triggers ignore handshake_hwm).
    (
        """CREATE TABLE retired_keys (
            public_key bytea PRIMARY KEY CHECK (length(public_key) = 32),
            handshake_hwm bytea NOT NULL CHECK (length(handshake_hwm) = 12),
            retired_at double precision NOT NULL
        )""",
        f"""CREATE FUNCTION wgjit_retire() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF old.handshake_hwm IS NOT NULL
                AND (TG_OP = 'DELETE' OR old.public_key IS DISTINCT FROM new.public_key) THEN
                INSERT INTO retired_keys (public_key, handshake_hwm, retired_at)
                    VALUES (old.public_key, old.handshake_hwm, {_NOW})
                    ON CONFLICT (public_key) DO UPDATE
                    SET handshake_hwm = greatest(retired_keys.handshake_hwm,
                                                 excluded.handshake_hwm),
                        retired_at = excluded.retired_at;
            END IF;
            RETURN NULL;
        END $$""",
        """CREATE FUNCTION wgjit_restore() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            kept bytea;
        BEGIN
            IF TG_OP = 'INSERT' OR old.public_key IS DISTINCT FROM new.public_key THEN
                DELETE FROM retired_keys WHERE public_key = new.public_key
                    RETURNING handshake_hwm INTO kept;
                IF kept IS NOT NULL THEN
                    new.handshake_hwm := greatest(new.handshake_hwm, kept);
                END IF;
            END IF;
            RETURN new;
        END $$""",
        """CREATE TRIGGER peers_retire AFTER DELETE OR UPDATE OF public_key ON peers
            FOR EACH ROW EXECUTE FUNCTION wgjit_retire()""",
        """CREATE TRIGGER peers_restore BEFORE INSERT OR UPDATE OF public_key ON peers
            FOR EACH ROW EXECUTE FUNCTION wgjit_restore()""",
    ),
    # 5: store-wide defaults (`wgjit store set-defaults`): client-config options and the
    #    address pool of `--allowed-ips auto`, as text keyed by option name
    (
        """CREATE TABLE defaults (
            key text PRIMARY KEY,
            value text NOT NULL
        )""",
    ),
    # 6: per-peer status kept across installs (a device's counters restart at every
    #    reinstall, so gateways add what they counted: Store.record_traffic), and what a
    #    gateway's heartbeat says of it (peers on its device, knocks dropped by reason, as
    #    JSON). Status is not a change: the feed trigger does not watch these columns.
    (
        "ALTER TABLE peers ADD COLUMN rx_bytes bigint NOT NULL DEFAULT 0,"
        " ADD COLUMN tx_bytes bigint NOT NULL DEFAULT 0,"
        " ADD COLUMN last_handshake double precision, ADD COLUMN endpoint text",
        "ALTER TABLE gateways ADD COLUMN installed bigint, ADD COLUMN rejects text",
    ),
    # 7: list_page() orders by name in the "C" collation (code point order, as SQLite's
    #    BINARY: the same pages on both backends, and a name prefix is one index range, which
    #    it is not in a linguistic collation), and a rare state walks an index of that state's
    #    peers alone. The WHERE clauses are _STATE_SQL's, as the planner needs them.
    (
        'CREATE INDEX peers_by_name_c ON peers (name COLLATE "C")',
        'CREATE INDEX peers_revoked_by_name ON peers (name COLLATE "C") WHERE revoked',
        'CREATE INDEX peers_disabled_by_name ON peers (name COLLATE "C")'
        " WHERE disabled AND NOT revoked",
        'CREATE INDEX peers_expiring_by_name ON peers (name COLLATE "C")'
        " WHERE expires_at IS NOT NULL",
    ),
    # 8: room on each page of peers for a row's next version: a sweep's traffic update
    #    (step 6's columns, none indexed) then stays on its page and adds no index entries (a
    #    HOT update). Pages written from now on keep it.
    ("ALTER TABLE peers SET (fillfactor = 85)",),
]
# list_page(state=...): the condition, as Peer.refusal() decides it (`now` is bound)
_STATE_SQL: Final = {
    "active": "NOT p.revoked AND NOT p.disabled"
    " AND (p.expires_at IS NULL OR p.expires_at > %(now)s)",
    "revoked": "p.revoked",
    "disabled": "p.disabled AND NOT p.revoked",
    "expired": "p.expires_at IS NOT NULL AND NOT p.revoked AND NOT p.disabled"
    " AND p.expires_at <= %(now)s",
}
_C_NAME: Final = 'p.name COLLATE "C"'
_OVERLAP_SQL: Final = (
    "SELECT q.net::text, p.name FROM peer_prefixes q JOIN peers p ON p.id = q.peer_id"
    " WHERE q.net && %s::cidr AND q.peer_id <> %s LIMIT 1"
)

_COLUMNS: Final = (
    "p.name, p.public_key, p.allowed_ips, p.preshared_key, p.revoked, p.created_at,"
    " p.updated_at, p.last_seen, p.handshake_hwm, c.gateway_id, p.disabled, p.expires_at,"
    " p.rx_bytes, p.tx_bytes, p.last_handshake, p.endpoint"
)
_FROM: Final = "peers p LEFT JOIN peer_claims c ON c.public_key = p.public_key"
LOOKUP_SQL: Final = f"SELECT {_COLUMNS} FROM {_FROM} WHERE p.public_key = %s"
_BY_NAME_SQL: Final = f"SELECT {_COLUMNS} FROM {_FROM} WHERE p.name = %s"
# one statement: check-and-advance is atomic (bytea compares bytewise, as TAI64N needs); two
# gateways racing with the same initiation: the row lock makes the second see the new mark
_ADVANCE_SQL: Final = (
    "UPDATE peers SET handshake_hwm = %s, last_seen = %s"
    " WHERE public_key = %s AND (handshake_hwm IS NULL OR handshake_hwm < %s)"
)
_LOOKUP_MANY_SQL: Final = f"SELECT {_COLUMNS} FROM {_FROM} WHERE p.public_key = ANY(%s)"
_PAGE_SQL: Final = f"SELECT {_COLUMNS} FROM {_FROM} WHERE p.name > %s ORDER BY p.name LIMIT 10000"
# claim() for a chunk of keys in one statement. ON CONFLICT DO UPDATE works on the newest
# version of each claim (locking it), and its WHERE leaves our own claims alone, so the updated
# rows (xmax <> 0; inserted ones have xmax = 0) are exactly those taken from another gateway:
# they go into the feed, as claim() puts them. FOR KEY SHARE skips peers deleted meanwhile.
_CLAIM_MANY_SQL: Final = (
    "WITH claimed AS ("
    " INSERT INTO peer_claims AS c (public_key, gateway_id, claimed_at)"
    f" SELECT p.public_key, %(gw)s, {_NOW} FROM peers p WHERE p.public_key = ANY(%(keys)s)"
    " ORDER BY p.public_key FOR KEY SHARE OF p"
    " ON CONFLICT (public_key) DO UPDATE"
    " SET gateway_id = excluded.gateway_id, claimed_at = excluded.claimed_at"
    " WHERE c.gateway_id <> excluded.gateway_id"
    " RETURNING c.public_key, (c.xmax = 0) AS fresh)"
    " SELECT wgjit_feed(ARRAY(SELECT public_key FROM claimed WHERE NOT fresh"
    " ORDER BY public_key))"
)
# admit_many(): advance the marks of a chunk of handshakes in one statement; the keys whose
# mark moved come back with the gateway that held each (read at the statement's start; a claim
# made or dropped by another gateway in the instant before ours only changes what is logged)
_ADMIT_MANY_SQL: Final = (
    "WITH adv AS ("
    " UPDATE peers p SET handshake_hwm = v.ts, last_seen = v.seen"
    " FROM unnest(%(keys)s::bytea[], %(ts)s::bytea[], %(seen)s::float8[]) AS v(key, ts, seen)"
    " WHERE p.public_key = v.key AND (p.handshake_hwm IS NULL OR p.handshake_hwm < v.ts)"
    " RETURNING p.public_key)"
    " SELECT a.public_key, c.gateway_id FROM adv a"
    " LEFT JOIN peer_claims c ON c.public_key = a.public_key AND c.gateway_id <> %(gw)s"
)
_CLAIM_READ_SQL: Final = "SELECT gateway_id FROM peer_claims WHERE public_key = %s FOR UPDATE"
_CLAIM_INSERT_SQL: Final = (
    "INSERT INTO peer_claims (public_key, gateway_id, claimed_at)"
    f" VALUES (%s, %s, {_NOW}) ON CONFLICT (public_key) DO NOTHING"
)
_CLAIM_TAKE_SQL: Final = (
    f"UPDATE peer_claims SET gateway_id = %s, claimed_at = {_NOW} WHERE public_key = %s"
)
# claim() reads again when another gateway's claim appeared between its read and its insert;
# each round needs a claim inserted (and removed again) by others in a few milliseconds
CLAIM_ATTEMPTS: Final = 5
_LAST_SEQ_SQL: Final = "SELECT coalesce(max(seq), 0) FROM peer_changes"
# record_traffic: one statement per chunk, the rows as five arrays; greatest() skips NULLs, so
# a handshake only moves forward and a row without one leaves it
_TRAFFIC_SQL: Final = (
    "UPDATE peers p SET rx_bytes = p.rx_bytes + v.rx, tx_bytes = p.tx_bytes + v.tx,"
    " last_handshake = greatest(p.last_handshake, v.hs), endpoint = coalesce(v.ep, p.endpoint)"
    " FROM unnest(%s::bytea[], %s::bigint[], %s::bigint[], %s::float8[], %s::text[])"
    " AS v(k, rx, tx, hs, ep) WHERE p.public_key = v.k"
)


class PostgresStore(Closing):
    """The Store protocol on one PostgreSQL database. Thread-safe (a small connection pool);
    any number of processes on any number of hosts may share the database."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        max_size: int = 4,
        create: bool = True,
    ):
        """`create=False`: a database without wgjit's schema raises StoreError naming
        `wgjit store init` instead of being given one."""
        self.url = url
        self._create = create
        self._name = redact(url)
        self._conninfo, limits = self._settings(url, connect_timeout)
        self.connect_timeout, self.statement_timeout, self.lock_timeout = limits
        # how long a call may go without an answer (None: statement_timeout=0, no limit)
        self.answer_timeout = (
            self.statement_timeout + ANSWER_GRACE_S if self.statement_timeout else None
        )
        self._watchdog = _Watchdog()
        try:
            with psycopg.connect(self._conninfo, autocommit=True) as conn:
                self.schema_version = self._migrate(conn)
        except psycopg.Error as e:
            self._watchdog.close()
            raise self._error(e, "open it") from e
        except BaseException:
            self._watchdog.close()
            raise
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[tuple[Any, ...]]] | None
        self._pool = psycopg_pool.ConnectionPool(
            self._conninfo,
            kwargs={"autocommit": True},
            min_size=1,
            max_size=max_size,
            open=False,
            timeout=POOL_WAIT_S,
            reconnect_timeout=RECONNECT_CYCLE_S,
            name="wgjit",
        )
        try:
            self._pool.open(wait=True, timeout=self.connect_timeout * 2)
        except psycopg_pool.PoolTimeout as e:
            self._pool.close()
            self._watchdog.close()
            raise StoreError(f"store {self._name}: cannot connect (timed out); {_HINT}") from e
        self._down_until = 0.0  # monotonic; see FAIL_FAST_S
        # the LISTEN side (see wakeup_fd): a thread, an eventfd it pokes, and whether it listens
        self._closed = threading.Event()
        self._listen_lock = threading.Lock()
        self._listen_thread: threading.Thread | None = None
        self._listen_started = threading.Event()  # set once the first attempt is over
        self._wake_fd: int | None = None
        self._listening = False

    def _settings(self, url: str, connect_timeout: float) -> tuple[str, tuple[float, float, float]]:
        """The libpq conninfo for `url` with our defaults filled in (see the module docstring),
        and the effective (connect_timeout, statement_timeout, lock_timeout) in seconds."""
        base, own = _split_own_params(url)
        try:
            params = conninfo_to_dict(base)
        except psycopg.Error as e:
            raise StoreError(
                f"store {self._name}: invalid URL: {scrub(_first_line(e), url)}; {_HINT}"
            ) from e
        if "connect_timeout" not in params and "PGCONNECT_TIMEOUT" not in os.environ:
            params["connect_timeout"] = str(max(1, math.ceil(connect_timeout)))
        try:
            connect_s = float(params.get("connect_timeout") or os.environ["PGCONNECT_TIMEOUT"])
        except (KeyError, ValueError):
            connect_s = connect_timeout
        for k, v in TCP_DEFAULTS.items():
            if k != "tcp_user_timeout" or psycopg.pq.version() >= 120000:
                params.setdefault(k, v)
        options = str(params.get("options") or os.environ.get("PGOPTIONS", "")).strip()
        limits_ms = {
            "statement_timeout": round(STATEMENT_TIMEOUT_S * 1000),
            "lock_timeout": round(LOCK_TIMEOUT_S * 1000),
        }
        for m in _OPTION_SETTING.finditer(options):
            limits_ms[m.group(1).replace("-", "_")] = self._duration_ms(m.group(1), m.group(2))
        for k, v in own.items():
            limits_ms[k] = self._duration_ms(k, v)
        extra = " ".join(f"-c {k}={ms:d}ms" for k, ms in limits_ms.items())
        params["options"] = f"{options} {extra}".strip()
        limits = (
            connect_s,
            limits_ms["statement_timeout"] / 1000,
            limits_ms["lock_timeout"] / 1000,
        )
        return make_conninfo("", **params), limits

    def _duration_ms(self, name: str, text: str) -> int:
        m = _DURATION.fullmatch(text.strip())
        if m is None:
            raise StoreError(
                f"store {self._name}: invalid {name} {text!r}: give a duration such as 500ms, 2s"
                f" or 1min (a bare number is milliseconds; 0 means no limit)"
            )
        return math.ceil(float(m.group(1)) * _UNIT_MS[m.group(2) or "ms"])

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        pool, self._pool = self._pool, None
        self._closed.set()  # the LISTEN thread ends within a second or so, closing its connection
        with self._listen_lock:
            fd, self._wake_fd = self._wake_fd, None
            self._listening = False
        if fd is not None:
            os.close(fd)
        if pool is not None:
            pool.close()
        self._watchdog.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self._name!r})"

    # -- peers --------------------------------------------------------------------------------

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
        validate_peer_name(name)
        nets = tuple(allowed_ips)
        why = peer_problem(public_key, nets, allow_overlap)
        if why:
            raise PeerRefused(why)
        now = time.time()

        def op(conn: psycopg.Connection[tuple[Any, ...]]) -> bytes | None:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PREFIX_LOCK,))
                if conn.execute("SELECT 1 FROM peers WHERE name = %s", (name,)).fetchone():
                    raise DuplicatePeer(f"peer {name!r} already exists")
                row = conn.execute(
                    "SELECT name FROM peers WHERE public_key = %s", (public_key.raw,)
                ).fetchone()
                if row:
                    raise DuplicatePeer(
                        f"public key {public_key.short()}... is already used by peer {row[0]!r}"
                    )
                if not allow_overlap:
                    clash = _overlap(conn, nets, None)
                    if clash:
                        raise PeerRefused(clash)
                try:
                    # a key used before keeps its mark (migration 4's trigger puts it on the row)
                    cur = conn.execute(
                        "INSERT INTO peers (name, public_key, allowed_ips, preshared_key,"
                        " revoked, created_at, updated_at, expires_at)"
                        " VALUES (%s, %s, %s, %s, false, %s, %s, %s) RETURNING id, handshake_hwm",
                        (
                            name,
                            public_key.raw,
                            format_networks(nets),
                            preshared_key.raw if preshared_key else None,
                            now,
                            now,
                            expires_at,
                        ),
                    )
                except psycopg.errors.UniqueViolation as e:  # a concurrent add won the race
                    raise DuplicatePeer(f"peer {name!r} or its key already exists") from e
                peer_id, mark = _one(cur)
                _set_prefixes(conn, int(peer_id), nets)
                self._prune(conn)
                return bytes(mark) if mark is not None else None

        mark = self._run(f"add peer {name!r}", op)
        return Peer(
            name, public_key, nets, preshared_key, False, now, now,
            handshake_hwm=mark, expires_at=expires_at,
        )  # fmt: skip

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
        plan = plan_update(new_name, public_key, allowed_ips, allow_overlap)

        def op(conn: psycopg.Connection[tuple[Any, ...]]) -> tuple[Any, ...]:
            with conn.transaction():
                if allowed_ips is not None:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PREFIX_LOCK,))
                found = conn.execute(
                    "SELECT id, public_key FROM peers WHERE name = %s FOR UPDATE", (name,)
                ).fetchone()
                if found is None:
                    raise UnknownPeer(f"no peer named {name!r}")
                peer_id, old_key = int(found[0]), bytes(found[1])
                sets: list[str] = []
                params: list[Any] = []
                if new_name is not None and new_name != name:
                    if conn.execute("SELECT 1 FROM peers WHERE name = %s", (new_name,)).fetchone():
                        raise DuplicatePeer(f"peer {new_name!r} already exists")
                    sets.append("name = %s")
                    params.append(new_name)
                new_key = public_key is not None and public_key.raw != old_key
                if public_key is not None and new_key:
                    other = conn.execute(
                        "SELECT name FROM peers WHERE public_key = %s", (public_key.raw,)
                    ).fetchone()
                    if other:
                        raise DuplicatePeer(
                            f"public key {public_key.short()}... is already used by peer"
                            f" {other[0]!r}"
                        )
                    # a new key: no gateway holds it yet, and its handshakes start afresh, from
                    # its retired mark if it had one (the old key's mark is retired: migration
                    # 4's triggers do both)
                    sets.append("public_key = %s, handshake_hwm = NULL, last_seen = NULL")
                    params.append(public_key.raw)
                    conn.execute("DELETE FROM peer_claims WHERE public_key = %s", (old_key,))
                if allowed_ips is not None:
                    if plan.check_overlap:
                        clash = _overlap(conn, allowed_ips, peer_id)
                        if clash:
                            raise PeerRefused(clash)
                    sets.append("allowed_ips = %s")
                    params.append(format_networks(allowed_ips))
                    _set_prefixes(conn, peer_id, allowed_ips)
                if not isinstance(preshared_key, Keep):
                    sets.append("preshared_key = %s")
                    params.append(preshared_key.raw if preshared_key else None)
                if disabled is not None:
                    sets.append("disabled = %s")
                    params.append(disabled)
                if not isinstance(expires_at, Keep):
                    sets.append("expires_at = %s")
                    params.append(expires_at)
                if sets:
                    try:
                        conn.execute(
                            f"UPDATE peers SET {', '.join(sets)}, updated_at = %s WHERE id = %s",
                            (*params, time.time(), peer_id),
                        )
                    except psycopg.errors.UniqueViolation as e:
                        raise DuplicatePeer(f"the new name or key of {name!r} is taken") from e
                    self._prune(conn)
                return _one(conn.execute(f"SELECT {_COLUMNS} FROM {_FROM} WHERE p.id = %s",
                                         (peer_id,)))  # fmt: skip

        return self._peer(self._run(f"change peer {name!r}", op))

    def get_defaults(self) -> dict[str, str]:
        rows = self._run(
            "read the defaults",
            lambda c: c.execute("SELECT key, value FROM defaults ORDER BY key").fetchall(),
        )
        return {str(k): str(v) for k, v in rows}

    def set_defaults(self, changes: Mapping[str, str | None]) -> dict[str, str]:
        def op(conn: psycopg.Connection[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
            with conn.transaction():
                for key, value in changes.items():
                    if value is None:
                        conn.execute("DELETE FROM defaults WHERE key = %s", (key,))
                    else:
                        conn.execute(
                            "INSERT INTO defaults (key, value) VALUES (%s, %s)"
                            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                            (key, value),
                        )
                return conn.execute("SELECT key, value FROM defaults ORDER BY key").fetchall()

        return {str(k): str(v) for k, v in self._run("set the defaults", op)}

    def get_peer(self, name: str) -> Peer | None:
        row = self._run(
            f"read peer {name!r}", lambda c: c.execute(_BY_NAME_SQL, (name,)).fetchone()
        )
        return self._peer(row) if row else None

    def lookup(self, public_key: PublicKey) -> Peer | None:
        row = self._run(
            "look up a peer", lambda c: c.execute(LOOKUP_SQL, (public_key.raw,)).fetchone()
        )
        return self._peer(row) if row else None

    def lookup_many(self, public_keys: Sequence[PublicKey]) -> dict[PublicKey, Peer]:
        keys = list(dict.fromkeys(k.raw for k in public_keys))
        found: dict[PublicKey, Peer] = {}
        for i in range(0, len(keys), MANY_CHUNK):
            rows = self._run(
                f"look up {len(keys)} peers",
                functools.partial(_fetchall, _LOOKUP_MANY_SQL, (keys[i : i + MANY_CHUNK],)),
            )
            for r in rows:
                peer = self._peer(r)
                found[peer.public_key] = peer
        return found

    def list_peers(self) -> list[Peer]:
        rows = self._run(
            "list peers",
            lambda c: c.execute(f"SELECT {_COLUMNS} FROM {_FROM} ORDER BY p.name").fetchall(),
        )
        return [self._peer(r) for r in rows]

    def iter_peers(self) -> Iterator[Peer]:
        # pages by name (keyset): each page is one bounded call, and no connection is held
        # while the caller works
        after = ""
        while True:
            rows = self._run("list peers", functools.partial(_fetchall, _PAGE_SQL, (after,)))
            if not rows:
                return
            for r in rows:
                yield self._peer(r)
            after = rows[-1][0]

    def list_page(
        self,
        *,
        after: str = "",
        limit: int = 100,
        prefix: str = "",
        state: str | None = None,
        now: float | None = None,
    ) -> list[Peer]:
        sql, params = _page_sql(after, limit, prefix, state, now)
        rows = self._run("list peers", functools.partial(_fetchall, sql, params))
        return [self._peer(r) for r in rows]

    def revoke(self, name: str) -> Peer:
        def op(conn: psycopg.Connection[tuple[Any, ...]]) -> tuple[Any, ...]:
            with conn.transaction():
                cur = conn.execute(
                    "UPDATE peers SET revoked = true, updated_at = %s"
                    " WHERE name = %s AND NOT revoked",
                    (time.time(), name),
                )
                row = conn.execute(_BY_NAME_SQL, (name,)).fetchone()
                if row is None:
                    raise UnknownPeer(f"no peer named {name!r}")
                if cur.rowcount:
                    self._prune(conn)
                return row

        return self._peer(self._run(f"revoke peer {name!r}", op))

    def remove(self, name: str) -> Peer:
        def op(conn: psycopg.Connection[tuple[Any, ...]]) -> tuple[Any, ...]:
            with conn.transaction():
                row = conn.execute(_BY_NAME_SQL + " FOR UPDATE OF p", (name,)).fetchone()
                if row is None:
                    raise UnknownPeer(f"no peer named {name!r}")
                conn.execute("DELETE FROM peers WHERE name = %s", (name,))
                self._prune(conn)
                return row

        return self._peer(self._run(f"remove peer {name!r}", op))

    def reset_handshake_mark(self, name: str) -> Peer:
        def op(conn: psycopg.Connection[tuple[Any, ...]]) -> tuple[Any, ...]:
            with conn.transaction():
                row = conn.execute(_BY_NAME_SQL + " FOR UPDATE OF p", (name,)).fetchone()
                if row is None:
                    raise UnknownPeer(f"no peer named {name!r}")
                conn.execute("UPDATE peers SET handshake_hwm = NULL WHERE name = %s", (name,))
                return row

        return self._peer(self._run(f"reset the replay mark of peer {name!r}", op))

    def import_peers(
        self, peers: Sequence[Peer], *, allow_overlap: bool = False, dry_run: bool = False
    ) -> ImportResult:
        result = ImportResult()
        if not peers:
            return result
        for p in peers:
            validate_peer_name(p.name)
            if p.handshake_hwm is not None and len(p.handshake_hwm) != TAI64N_LEN:
                raise ValueError(f"peer {p.name!r}: a handshake mark is {TAI64N_LEN} bytes")
        refused = {}
        for i, p in enumerate(peers):
            why = peer_problem(p.public_key, p.allowed_ips, allow_overlap)
            if why:
                refused[i] = why

        def op(conn: psycopg.Connection[tuple[Any, ...]]) -> ImportResult:
            res = ImportResult(rejected=list(refused.items()))
            now = time.time()
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PREFIX_LOCK,))
                conn.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS wgjit_import (i int, name text,"
                    " public_key bytea, allowed_ips text, preshared_key bytea, revoked boolean,"
                    " handshake_hwm bytea, disabled boolean, expires_at double precision,"
                    " moved boolean) ON COMMIT DELETE ROWS"
                )
                conn.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS wgjit_import_nets (i int, name text,"
                    " net cidr) ON COMMIT DELETE ROWS"
                )
                with conn.cursor().copy(
                    "COPY wgjit_import (i, name, public_key, allowed_ips, preshared_key, revoked,"
                    " handshake_hwm, disabled, expires_at) FROM STDIN"
                ) as copy:
                    for i, p in enumerate(peers):
                        if i in refused:
                            continue
                        copy.write_row(
                            (
                                i,
                                p.name,
                                p.public_key.raw,
                                format_networks(p.allowed_ips),
                                p.preshared_key.raw if p.preshared_key else None,
                                p.revoked,
                                p.handshake_hwm,
                                p.disabled,
                                p.expires_at,
                            )
                        )
                # rows whose key is another peer's, or whose name has another key
                for i, other in conn.execute(
                    "SELECT w.i, p.name FROM wgjit_import w JOIN peers p"
                    " ON p.public_key = w.public_key AND p.name <> w.name"
                ):
                    res.rejected.append((int(i), f"public key is already used by peer {other!r}"))
                for (i,) in conn.execute(
                    "SELECT w.i FROM wgjit_import w JOIN peers p"
                    " ON p.name = w.name AND p.public_key <> w.public_key"
                ):
                    res.rejected.append(
                        (int(i), "a peer with this name exists with another public key")
                    )
                if res.rejected:
                    conn.execute(
                        "DELETE FROM wgjit_import WHERE i = ANY(%s)",
                        ([i for i, _ in res.rejected],),
                    )
                # rows that add prefixes or change them, and those prefixes
                conn.execute(
                    "UPDATE wgjit_import w SET moved = NOT EXISTS (SELECT 1 FROM peers p"
                    " WHERE p.name = w.name AND p.allowed_ips = w.allowed_ips)"
                )
                conn.execute(
                    "INSERT INTO wgjit_import_nets (i, name, net)"
                    " SELECT i, name, unnest(string_to_array(allowed_ips, ','))::cidr"
                    " FROM wgjit_import WHERE moved AND allowed_ips <> ''"
                )
                if not allow_overlap:
                    clashes = self._import_overlaps(conn)
                    res.rejected += clashes
                    if clashes:
                        rows = [i for i, _ in clashes]
                        conn.execute("DELETE FROM wgjit_import WHERE i = ANY(%s)", (rows,))
                        conn.execute("DELETE FROM wgjit_import_nets WHERE i = ANY(%s)", (rows,))
                # the rows left are new peers or updates of the same key: a retired key is new
                res.reused_keys = int(
                    _scalar(
                        conn,
                        "SELECT count(*) FROM wgjit_import w"
                        " JOIN retired_keys r ON r.public_key = w.public_key",
                    )
                )
                # an import revokes or disables but never reinstates or enables, moves an
                # expiry only earlier (least() skips NULL: never) and a mark only forward; a
                # new row with a retired key takes the retired mark if greater (migration 4)
                cur = conn.execute(
                    "INSERT INTO peers (name, public_key, allowed_ips, preshared_key, revoked,"
                    " disabled, expires_at, handshake_hwm, created_at, updated_at)"
                    " SELECT name, public_key, allowed_ips, preshared_key, revoked, disabled,"
                    " expires_at, handshake_hwm, %s, %s FROM wgjit_import ORDER BY i"
                    " ON CONFLICT (name) DO UPDATE SET allowed_ips = excluded.allowed_ips,"
                    " preshared_key = excluded.preshared_key,"
                    " revoked = peers.revoked OR excluded.revoked,"
                    " disabled = peers.disabled OR excluded.disabled,"
                    " expires_at = least(peers.expires_at, excluded.expires_at),"
                    " handshake_hwm = greatest(peers.handshake_hwm, excluded.handshake_hwm),"
                    " updated_at = excluded.updated_at"
                    " WHERE (peers.allowed_ips, peers.preshared_key, peers.revoked,"
                    " peers.disabled, peers.expires_at, peers.handshake_hwm) IS DISTINCT FROM"
                    " (excluded.allowed_ips, excluded.preshared_key,"
                    " peers.revoked OR excluded.revoked, peers.disabled OR excluded.disabled,"
                    " least(peers.expires_at, excluded.expires_at),"
                    " greatest(peers.handshake_hwm, excluded.handshake_hwm))"
                    " RETURNING (xmax = 0)",
                    (now, now),
                )
                flags = [bool(r[0]) for r in cur.fetchall()]
                res.added = sum(flags)
                res.updated = len(flags) - res.added
                res.unchanged = len(peers) - len(res.rejected) - len(flags)
                conn.execute(
                    "DELETE FROM peer_prefixes q USING peers p, wgjit_import w"
                    " WHERE q.peer_id = p.id AND p.name = w.name AND w.moved"
                )
                conn.execute(
                    "INSERT INTO peer_prefixes (peer_id, net) SELECT p.id, n.net"
                    " FROM wgjit_import_nets n JOIN peers p ON p.name = n.name"
                )
                conn.execute("TRUNCATE wgjit_import, wgjit_import_nets")
                if dry_run:
                    raise psycopg.Rollback()  # leaves the transaction block, nothing written
                self._prune(conn)
            res.rejected.sort()
            return res

        # about ten statements, each bounded by statement_timeout on the server
        budget = self.answer_timeout * 10 if self.answer_timeout else None
        return self._run(f"import {len(peers)} peers", op, budget=budget)

    def _import_overlaps(self, conn: psycopg.Connection[tuple[Any, ...]]) -> list[tuple[int, str]]:
        """Rows of the import batch whose new prefixes overlap another stored peer's (one GiST
        search per prefix) or an earlier row's of the batch (one sort, in Python)."""
        bad: dict[int, str] = {}
        for i, net, other, owner in conn.execute(
            "SELECT DISTINCT ON (n.i) n.i, n.net::text, q.net::text, p.name"
            " FROM wgjit_import_nets n JOIN peer_prefixes q ON q.net && n.net"
            " JOIN peers p ON p.id = q.peer_id AND p.name <> n.name ORDER BY n.i"
        ):
            bad[int(i)] = overlap_message(parse_network(net), parse_network(other), owner)
        moving: dict[int, tuple[str, list[IPNetwork]]] = {}
        for i, name, net in conn.execute("SELECT i, name, net::text FROM wgjit_import_nets"):
            if int(i) not in bad:
                moving.setdefault(int(i), (name, []))[1].append(parse_network(net))
        rows = [(i, name, nets) for i, (name, nets) in sorted(moving.items())]
        bad.update(overlaps_within(rows))
        return sorted(bad.items())

    # -- handshakes -----------------------------------------------------------------------------

    def advance_handshake(self, hs: Handshake) -> bool:
        ts = _timestamp(hs)
        cur = self._run(
            "record a handshake",
            lambda c: c.execute(_ADVANCE_SQL, (ts, hs.seen_at, hs.public_key.raw, ts)),
        )
        return cur.rowcount == 1

    def record_handshakes(self, handshakes: Iterable[Handshake]) -> None:
        params = [(_timestamp(h), h.seen_at, h.public_key.raw, _timestamp(h)) for h in handshakes]
        if not params:
            return

        def op(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(_ADVANCE_SQL, params)

        self._run(f"record {len(params)} handshakes", op)

    # -- presence -------------------------------------------------------------------------------

    def claim(self, public_key: PublicKey, gateway_id: str) -> str | None:
        # The holder may release, and another gateway claim, at any moment. So the claim is
        # read and locked first (a row that exists stays as read until we commit); only if
        # there is none is one inserted, and if another gateway inserted one in between (the
        # insert does nothing), it is read again. Inserting first and locking afterwards lost
        # the claim silently when the holder released in between: nothing left to lock, an
        # UPDATE of no row, None returned, and the peer unclaimed.
        def op(conn: psycopg.Connection[tuple[Any, ...]]) -> str | None:
            with conn.transaction():
                for _ in range(CLAIM_ATTEMPTS):
                    row = conn.execute(_CLAIM_READ_SQL, (public_key.raw,)).fetchone()
                    if row is None:
                        cur = conn.execute(_CLAIM_INSERT_SQL, (public_key.raw, gateway_id))
                        if cur.rowcount == 1:
                            return None
                        continue  # claimed by another gateway since we looked
                    previous = str(row[0])
                    if previous == gateway_id:
                        return None
                    conn.execute(_CLAIM_TAKE_SQL, (gateway_id, public_key.raw))
                    conn.execute("SELECT wgjit_feed(ARRAY[%s::bytea])", (public_key.raw,))
                    return previous
            raise StoreError(
                f"store {self._name}: could not claim peer {public_key.short()}...: its claim"
                f" changed {CLAIM_ATTEMPTS} times while we tried; try again"
            )

        try:
            return self._run("claim a peer", op)
        except StoreError as e:
            if isinstance(e.__cause__, psycopg.errors.ForeignKeyViolation):
                raise UnknownPeer(f"peer {public_key.short()}... is no longer in the store") from e
            raise

    def claim_many(self, public_keys: Sequence[PublicKey], gateway_id: str) -> None:
        # sorted: concurrent claim_many calls lock rows in the same order (no deadlocks)
        keys = sorted({k.raw for k in public_keys})
        for i in range(0, len(keys), MANY_CHUNK):
            chunk = keys[i : i + MANY_CHUNK]
            self._run(
                f"claim {len(keys)} peers",
                functools.partial(_execute, _CLAIM_MANY_SQL, {"keys": chunk, "gw": gateway_id}),
            )

    def admit_many(
        self, handshakes: Sequence[Handshake], gateway_id: str
    ) -> dict[PublicKey, str | None]:
        hss = newest_handshakes(handshakes)
        admitted: dict[PublicKey, str | None] = {}

        def op(
            chunk: list[Handshake], conn: psycopg.Connection[tuple[Any, ...]]
        ) -> list[tuple[bytes, str | None]]:
            with conn.transaction():
                rows = conn.execute(
                    _ADMIT_MANY_SQL,
                    {
                        "keys": [h.public_key.raw for h in chunk],
                        "ts": [_timestamp(h) for h in chunk],
                        "seen": [h.seen_at for h in chunk],
                        "gw": gateway_id,
                    },
                ).fetchall()
                fresh = sorted(bytes(r[0]) for r in rows)
                if fresh:
                    conn.execute(_CLAIM_MANY_SQL, {"keys": fresh, "gw": gateway_id})
                return [(bytes(k), None if gw is None else str(gw)) for k, gw in rows]

        for i in range(0, len(hss), MANY_CHUNK):
            chunk = hss[i : i + MANY_CHUNK]
            for raw, previous in self._run(
                f"admit {len(hss)} handshakes", functools.partial(op, chunk)
            ):
                admitted[PublicKey(raw)] = previous
        return admitted

    def release(self, public_keys: Iterable[PublicKey], gateway_id: str) -> None:
        keys = [k.raw for k in public_keys]
        if keys:
            self._run(
                "release peers",
                lambda c: c.execute(
                    "DELETE FROM peer_claims WHERE public_key = ANY(%s) AND gateway_id = %s",
                    (keys, gateway_id),
                ),
            )

    def heartbeat(
        self,
        gateway_id: str,
        *,
        installed: int | None = None,
        rejects: Mapping[str, int] | None = None,
    ) -> None:
        said = json.dumps(dict(rejects), sort_keys=True) if rejects is not None else None

        def op(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO gateways (gateway_id, heartbeat_at, installed, rejects)"
                    f" VALUES (%s, {_NOW}, %s, %s) ON CONFLICT (gateway_id) DO UPDATE"
                    f" SET heartbeat_at = {_NOW}, installed = excluded.installed,"
                    " rejects = excluded.rejects",
                    (gateway_id, installed, said),
                )
                dead = [
                    r[0]
                    for r in conn.execute(
                        f"DELETE FROM gateways WHERE heartbeat_at < {_NOW} - %s"
                        " RETURNING gateway_id",
                        (PRESENCE_TTL_S,),
                    )
                ]
                if dead:
                    conn.execute("DELETE FROM peer_claims WHERE gateway_id = ANY(%s)", (dead,))

        self._run("record a heartbeat", op)

    def gateways(self) -> list[GatewayPresence]:
        rows = self._run(
            "read the gateways",
            lambda c: c.execute(
                "SELECT g.gateway_id, g.heartbeat_at, g.installed, g.rejects,"
                " (SELECT count(*) FROM peer_claims c WHERE c.gateway_id = g.gateway_id)"
                f" FROM gateways g WHERE g.heartbeat_at >= {_NOW} - %s ORDER BY g.gateway_id",
                (PRESENCE_TTL_S,),
            ).fetchall(),
        )
        return [presence(gid, at, n, said, claimed) for gid, at, n, said, claimed in rows]

    # -- status ---------------------------------------------------------------------------------

    def record_traffic(self, rows: Sequence[Traffic]) -> None:
        # merged sorts by key: two gateways' overlapping batches lock rows in the same order
        batch = _merged(rows)
        for i in range(0, len(batch), MANY_CHUNK):
            chunk = batch[i : i + MANY_CHUNK]
            arrays = (
                [t.public_key.raw for t in chunk],
                [int(t.rx_bytes) for t in chunk],
                [int(t.tx_bytes) for t in chunk],
                [t.last_handshake for t in chunk],
                [t.endpoint for t in chunk],
            )
            self._run(
                f"record the traffic of {len(batch)} peers",
                functools.partial(_execute, _TRAFFIC_SQL, arrays),
            )

    def busiest_peers(self, limit: int) -> list[Peer]:
        rows = self._run(
            "list the busiest peers",
            functools.partial(
                _fetchall,
                f"SELECT {_COLUMNS} FROM {_FROM} WHERE p.rx_bytes + p.tx_bytes > 0"
                " ORDER BY p.rx_bytes + p.tx_bytes DESC, p.name LIMIT %s",
                (max(0, int(limit)),),
            ),
        )
        return [self._peer(r) for r in rows]

    def count_peers(self) -> int:
        return int(self._run("count peers", lambda c: _scalar(c, "SELECT count(*) FROM peers")))

    # -- change feed ----------------------------------------------------------------------------

    def change_cursor(self) -> int:
        return int(self._run("read the change feed", lambda c: _scalar(c, _LAST_SEQ_SQL)))

    def changes_since(self, cursor: int) -> tuple[list[PublicKey], int]:
        cursor = max(cursor, 0)
        self._drain_wakeups()  # before reading: a change committed after the read wakes again

        def op(conn: psycopg.Connection[tuple[Any, ...]]) -> tuple[list[PublicKey], int]:
            # one snapshot for the three reads
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                last = int(_scalar(conn, _LAST_SEQ_SQL))
                if cursor == last:
                    return [], cursor
                if cursor > last:
                    raise ChangeFeedExpired(
                        f"change cursor {cursor} is ahead of store {self._name} (at {last}):"
                        " the database was replaced or restored; resynchronise"
                    )
                pruned = int(_scalar(conn, "SELECT pruned_below FROM peer_feed_state"))
                if cursor < pruned - 1:
                    raise ChangeFeedExpired(
                        f"changes after cursor {cursor} in store {self._name} were pruned (kept"
                        f" {CHANGE_RETENTION_S / 3600:g} h); resynchronise"
                    )
                rows = conn.execute(
                    "SELECT public_key, max(seq) AS s FROM peer_changes WHERE seq > %s"
                    " GROUP BY public_key ORDER BY s",
                    (cursor,),
                ).fetchall()
                return [PublicKey(bytes(k)) for k, _ in rows], last

        return self._run("read the change feed", op)

    def wakeup_fd(self) -> int | None:
        """An eventfd that a thread of ours, listening on its own connection, makes readable
        on NOTIFY, on losing that connection and on getting it back; None while it is not
        listening (then poll). The number stays the same for the life of the store. The first
        call starts that thread; until its first connection attempt is over (at most
        connect_timeout and the answer deadline) calls wait for it, later calls never wait."""
        with self._listen_lock:
            if self._pool is None:
                return None
            if self._listen_thread is None:
                self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._listen_thread = threading.Thread(
                    target=self._listen, name="wgjit-store-listen", daemon=True
                )
                self._listen_thread.start()
        if not self._listen_started.is_set():
            self._listen_started.wait(self.connect_timeout + (self.answer_timeout or 0) + 1)
        with self._listen_lock:
            return self._wake_fd if self._listening else None

    def _listen(self) -> None:
        """The LISTEN thread: (re)connect, wait for notifications, poke the eventfd."""
        reconnect = False
        while not self._closed.is_set():
            conn = self._listen_connect()
            self._set_listening(conn is not None, poke=reconnect)
            self._listen_started.set()
            reconnect = True
            if conn is None:
                self._closed.wait(LISTEN_RETRY_S)
                continue
            try:
                while not self._closed.is_set():
                    # a timeout now and then, only to notice close()
                    for _ in conn.notifies(timeout=LISTEN_RETRY_S):
                        self._poke()
            except psycopg.Error:
                pass  # lost: the readers see None, poll, and are woken once we are back
            finally:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
                self._set_listening(False, poke=True)

    def _listen_connect(self) -> psycopg.Connection[tuple[Any, ...]] | None:
        conn = None
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
            watch = self._watchdog.arm(conn.fileno(), self.answer_timeout or self.connect_timeout)
            try:
                conn.execute(f"LISTEN {CHANNEL}")
            finally:
                self._watchdog.disarm(watch)
            return conn
        except psycopg.Error:
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
            return None

    def _set_listening(self, listening: bool, *, poke: bool) -> None:
        with self._listen_lock:
            self._listening = listening and self._wake_fd is not None
        if poke:
            self._poke()

    def _poke(self) -> None:
        with self._listen_lock:  # close() may close the fd: never write to a stale number
            if self._wake_fd is not None:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_write(self._wake_fd, 1)

    def _drain_wakeups(self) -> None:
        with self._listen_lock:
            if self._wake_fd is not None:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake_fd)

    # -- internals ------------------------------------------------------------------------------

    def _require_pool(
        self, what: str
    ) -> psycopg_pool.ConnectionPool[psycopg.Connection[tuple[Any, ...]]]:
        pool = self._pool
        if pool is None:
            raise StoreError(f"store {self._name} is closed (cannot {what})")
        return pool

    def _run(
        self,
        what: str,
        fn: Callable[[psycopg.Connection[tuple[Any, ...]]], _T],
        *,
        budget: float | None = None,
    ) -> _T:
        """Run `fn` on a pooled connection, giving up (StoreError) when the server has not
        answered within `budget` (default: the answer deadline). On a broken connection (server
        restarted, network cut) or a lost deadlock, try again, a few times, so a gateway rides
        out a database restart."""
        pool = self._require_pool(what)
        if time.monotonic() < self._down_until:
            raise StoreError(
                f"store {self._name}: could not {what}: the database is unreachable (a call"
                " just failed to reach it; retrying in the background)"
            )
        limit = budget or self.answer_timeout
        attempts = 0
        while True:
            attempts += 1
            watch: _Watch | None = None
            try:
                with pool.connection() as conn:
                    if limit is not None:
                        watch = self._watchdog.arm(conn.fileno(), limit)
                    try:
                        return fn(conn)
                    finally:
                        if watch is not None:
                            self._watchdog.disarm(watch)
            except psycopg_pool.PoolTimeout as e:  # an OperationalError: first
                self._down_until = time.monotonic() + FAIL_FAST_S
                raise StoreError(
                    f"store {self._name}: could not {what}: no connection to the database"
                    f" within {pool.timeout:g} s; is the server running?"
                ) from e
            except psycopg.Error as e:
                if watch is not None and watch.fired:
                    self._down_until = time.monotonic() + FAIL_FAST_S
                    raise StoreError(
                        f"store {self._name}: could not {what}: no answer from the database"
                        f" within {limit:g} s (is the server stopped or overloaded?);"
                        " connection closed"
                    ) from e
                if attempts < 3 and _retryable(e):
                    if attempts > 1:
                        time.sleep(0.05)
                    continue
                raise self._error(e, what) from e

    def _prune(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        """Delete a prefix of the feed older than the retention, never the newest entry (it
        carries the cursor), and remember where the prefix ended."""
        cur = conn.execute(
            "WITH bound AS (SELECT coalesce("
            " (SELECT seq FROM peer_changes WHERE at >= %s ORDER BY seq LIMIT 1),"
            " (SELECT max(seq) FROM peer_changes)) AS b),"
            " gone AS (DELETE FROM peer_changes WHERE seq < (SELECT b FROM bound) RETURNING seq)"
            " SELECT max(seq) FROM gone",
            (time.time() - CHANGE_RETENTION_S,),
        )
        row = cur.fetchone()
        if row and row[0] is not None:
            conn.execute(
                "UPDATE peer_feed_state SET pruned_below = greatest(pruned_below, %s)",
                (int(row[0]) + 1,),
            )

    def _migrate(self, conn: psycopg.Connection[tuple[Any, ...]]) -> int:
        target = len(MIGRATIONS)
        watch = self._watchdog.arm(
            conn.fileno(), MIGRATE_LOCK_WAIT_S + (self.answer_timeout or self.connect_timeout)
        )
        try:
            return self._migrate_in(conn, target)
        except psycopg.Error as e:
            if watch.fired:
                raise StoreError(
                    f"store {self._name}: could not open it: no answer from the database"
                    " (is the server stopped or overloaded?)"
                ) from e
            raise
        finally:
            self._watchdog.disarm(watch)

    def _migrate_in(self, conn: psycopg.Connection[tuple[Any, ...]], target: int) -> int:
        with conn.transaction():
            # another process may be migrating: wait for it longer than a call waits for a lock
            conn.execute(f"SET LOCAL lock_timeout = '{MIGRATE_LOCK_WAIT_S:g}s'")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            if not self._create and not _scalar(
                conn,
                "SELECT to_regclass('wgjit_schema') IS NOT NULL"
                " AND EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = current_schema()"
                " AND tablename = 'peers')",
            ):
                raise StoreError(
                    f"store {self._name} has no wgjit schema (an empty or foreign database);"
                    " create it with `wgjit store init`, or check --store / WGJIT_STORE"
                )
            conn.execute("CREATE TABLE IF NOT EXISTS wgjit_schema (version integer NOT NULL)")
            row = conn.execute("SELECT version FROM wgjit_schema").fetchone()
            if row is None:
                foreign = [
                    r[0]
                    for r in conn.execute(
                        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                        " AND tablename <> 'wgjit_schema'"
                    )
                ]
                if foreign:
                    raise StoreError(
                        f"store {self._name} is a database with other tables"
                        f" ({', '.join(sorted(foreign)[:5])}), not a wgjit store; {_HINT}"
                    )
                conn.execute("INSERT INTO wgjit_schema VALUES (0)")
                version = 0
            else:
                version = int(row[0])
            if version > target:
                raise StoreError(
                    f"store {self._name} was created by a newer wgjit (schema version {version};"
                    f" this version knows up to {target}); upgrade wgjit or {_HINT}"
                )
            try:
                for step in MIGRATIONS[version:]:
                    for statement in step:
                        conn.execute(statement)
            except psycopg.Error as e:
                raise StoreError(
                    f"store {self._name}: could not upgrade its schema from version {version}"
                    f" to {target}: {scrub(_first_line(e), self.url)}"
                ) from e
            conn.execute("UPDATE wgjit_schema SET version = %s", (target,))
        return target

    def _peer(self, row: tuple[Any, ...]) -> Peer:
        name, key, ips, psk, revoked, created, updated, seen, hwm, holder, disabled, exp = row[:12]
        rx, tx, last_hs, endpoint = row[12:16]
        try:
            return Peer(
                name=name,
                public_key=PublicKey(bytes(key)),
                allowed_ips=tuple(parse_network(n) for n in ips.split(",") if n),
                preshared_key=PresharedKey(bytes(psk)) if psk is not None else None,
                revoked=bool(revoked),
                created_at=float(created),
                updated_at=float(updated),
                last_seen=float(seen) if seen is not None else None,
                handshake_hwm=bytes(hwm) if hwm is not None else None,
                holder=holder,
                disabled=bool(disabled),
                expires_at=float(exp) if exp is not None else None,
                rx_bytes=int(rx),
                tx_bytes=int(tx),
                last_handshake=float(last_hs) if last_hs is not None else None,
                endpoint=endpoint,
            )
        except (InvalidKey, InvalidAddress, TypeError, ValueError, AttributeError) as e:
            raise StoreError(f"store {self._name} has an invalid row for peer {name!r}: {e}") from e

    def _error(self, e: psycopg.Error, what: str) -> StoreError:
        """One clear line for a failed psycopg call (libpq may quote the URL: scrubbed)."""
        reason = scrub(_first_line(e), self.url)
        if isinstance(e, psycopg.errors.LockNotAvailable):
            return StoreError(
                f"store {self._name}: could not {what}: a row it needs stayed locked by another"
                f" session for over {self.lock_timeout:g} s (lock_timeout); try again"
            )
        if isinstance(e, psycopg.errors.QueryCanceled) and "statement timeout" in reason:
            return StoreError(
                f"store {self._name}: could not {what}: the database took over"
                f" {self.statement_timeout:g} s (statement_timeout; a URL parameter such as"
                " statement_timeout=30s raises it)"
            )
        if isinstance(e, psycopg.OperationalError) and _retryable(e):
            return StoreError(
                f"store {self._name}: could not {what}: cannot reach the database ({reason});"
                f" check the server and the URL, or {_HINT}"
            )
        if isinstance(e, psycopg.errors.InsufficientPrivilege):
            return StoreError(f"store {self._name}: could not {what}: permission denied ({reason})")
        return StoreError(f"store {self._name}: could not {what}: {reason}")


def _retryable(e: psycopg.Error) -> bool:
    """A failure another attempt may not meet: the connection broke (no SQLSTATE, class 08,
    the server shutting down or starting) or the transaction lost a deadlock or serialisation
    race. Not errors the server reported about the statement (lock_timeout, ...)."""
    if not isinstance(e, psycopg.OperationalError):
        return False
    state = e.sqlstate
    return state is None or state.startswith("08") or state in _RETRY_STATES


_RETRY_STATES: Final = frozenset({"57P01", "57P02", "57P03", "40P01", "40001"})


def _fetchall(
    query: Any, params: Any, conn: psycopg.Connection[tuple[Any, ...]]
) -> list[tuple[Any, ...]]:
    return conn.execute(query, params).fetchall()


def _execute(query: Any, params: Any, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    conn.execute(query, params)


def _split_own_params(url: str) -> tuple[str, dict[str, str]]:
    """The URL without the query parameters libpq does not know (statement_timeout,
    lock_timeout: it would refuse the URL), and their values."""
    base, sep, query = url.partition("?")
    if not sep:
        return url, {}
    kept: list[str] = []
    own: dict[str, str] = {}
    for part in query.split("&"):
        name, _, value = part.partition("=")
        name = urllib.parse.unquote(name)
        if name in ("statement_timeout", "lock_timeout"):
            own[name] = urllib.parse.unquote(value)
        elif part:
            kept.append(part)
    return (f"{base}?{'&'.join(kept)}" if kept else base), own


# `-c lock_timeout=2s` or `--lock-timeout=2s` in libpq's `options`
_OPTION_SETTING = re.compile(r"(?:-c\s*|--)(statement[_-]timeout|lock[_-]timeout)=(\S+)")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?")
_UNIT_MS: Final = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}


class _Watch:
    __slots__ = ("deadline", "fd", "fired")

    def __init__(self, fd: int, deadline: float) -> None:
        self.fd, self.deadline, self.fired = fd, deadline, False


class _Watchdog:
    """Shuts down the socket of a call that has had no answer by its deadline. The server
    enforces statement_timeout, so a server that stops answering (SIGSTOP, a hung host, packets
    silently dropped) holds a call until TCP gives up, or for ever on a unix socket; after a
    shutdown(2) the waiting call fails at once. It holds a dup of each watched socket, so a
    socket libpq closes meanwhile cannot be confused with a new one that reuses its number."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: set[_Watch] = set()
        self._wake_at = math.inf  # when the thread next looks (inf: when told)
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, fd: int, seconds: float) -> _Watch:
        watch = _Watch(os.dup(fd), time.monotonic() + seconds)
        with self._cond:
            self._armed.add(watch)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name="wgjit-store-watchdog", daemon=True
                )
                self._thread.start()
            if watch.deadline < self._wake_at:
                self._cond.notify()
        return watch

    def disarm(self, watch: _Watch) -> None:
        with self._cond:
            self._armed.discard(watch)
        os.close(watch.fd)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for watch in [w for w in self._armed if w.deadline <= now]:
                    self._armed.discard(watch)
                    watch.fired = True
                    with contextlib.suppress(OSError):
                        sock = socket.socket(fileno=watch.fd)
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        finally:
                            sock.detach()  # the fd stays ours until disarm() closes it
                self._wake_at = min((w.deadline for w in self._armed), default=math.inf)
                self._cond.wait(None if self._wake_at == math.inf else self._wake_at - now)


def _scalar(conn: psycopg.Connection[tuple[Any, ...]], query: Any) -> Any:
    row = conn.execute(query).fetchone()
    if row is None:
        raise StoreError(f"query returned no row: {query}")
    return row[0]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _timestamp(hs: Handshake) -> bytes:
    ts = bytes(hs.timestamp)
    if len(ts) != TAI64N_LEN:
        raise ValueError(f"handshake timestamp must be {TAI64N_LEN} bytes (TAI64N), got {len(ts)}")
    return ts


def _overlap(
    conn: psycopg.Connection[tuple[Any, ...]], nets: Iterable[IPNetwork], exclude_peer: int | None
) -> str | None:
    """Why `nets` clash with another stored peer's prefixes (not `exclude_peer`'s), or None."""
    for net in nets:
        row = conn.execute(_OVERLAP_SQL, (str(net), -1 if exclude_peer is None else exclude_peer))
        found = row.fetchone()
        if found is not None:
            return overlap_message(net, parse_network(found[0]), found[1])
    return None


def _set_prefixes(
    conn: psycopg.Connection[tuple[Any, ...]], peer_id: int, nets: Iterable[IPNetwork]
) -> None:
    conn.execute("DELETE FROM peer_prefixes WHERE peer_id = %s", (peer_id,))
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO peer_prefixes (peer_id, net) VALUES (%s, %s::cidr)",
            [(peer_id, str(n)) for n in nets],
        )


def _one(cur: psycopg.Cursor[tuple[Any, ...]]) -> tuple[Any, ...]:
    row = cur.fetchone()
    if row is None:
        raise StoreError("the database returned no row where one was expected")
    return row


def _page_sql(
    after: str, limit: int, prefix: str, state: str | None, now: float | None
) -> tuple[str, dict[str, Any]]:
    """list_page()'s statement (name bounds first: an index range) and its parameters."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit {limit} is out of range; use 1-{MAX_PAGE}")
    if state is not None and state not in _STATE_SQL:
        raise ValueError(f"state {state!r} is not one of {', '.join(PEER_STATES)}")
    # one lower bound: the planner seeks with one of two, maybe the looser
    terms = [f"{_C_NAME} >= %(prefix)s" if prefix > after else f"{_C_NAME} > %(after)s"]
    params: dict[str, Any] = {"after": after, "prefix": prefix, "limit": limit}
    if prefix:
        bound = prefix_bound(prefix)
        if bound is not None:
            terms.append(f"{_C_NAME} < %(bound)s")
            params["bound"] = bound
    if state is not None:
        terms.append(_STATE_SQL[state])
        params["now"] = time.time() if now is None else now
    sql = (
        f"SELECT {_COLUMNS} FROM {_FROM} WHERE {' AND '.join(terms)}"
        f" ORDER BY {_C_NAME} LIMIT %(limit)s"
    )
    return sql, params
