"""SQLite peer store: one file shared by the CLI and running gateways (WAL, busy timeout,
atomic anti-replay marks, a trigger-fed change feed, versioned schema migrations, presence for
gateways on the same host, bulk import).
It makes no policy decisions and never lets a sqlite3 exception escape: failures are StoreError.

Threads: a store has two connections, one for reads and one for writes, each behind its own
lock, so any thread may call any method and a read never queues behind a write that waits for
another process's lock (WAL lets readers run beside a writer). Waits are bounded by
`busy_timeout` (default 5 s): for another process's write lock (SQLite's busy timeout) and for
this process's other threads (the connection's lock); either way the call fails with "is busy".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.request import pathname2url

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
from wgjit.store.prefixes import (
    bounds,
    network_of,
    overlap_message,
    overlaps_within,
    peer_problem,
    plan_update,
    supernet_firsts,
)
from wgjit.store.status import merged as _merged
from wgjit.store.status import presence
from wgjit.store.urls import redact

BUSY_TIMEOUT_S: Final = 5.0
# change-feed entries older than this are pruned (gateways poll every second or so)
CHANGE_RETENTION_S: Final = 86400.0
APPLICATION_ID: Final = 0x776A6974  # "wjit" in PRAGMA application_id marks our files
TAI64N_LEN: Final = 12

URL_FORMS: Final = "sqlite:///ABSOLUTE/PATH.db, sqlite:RELATIVE/PATH.db or a plain file path"
_HINT: Final = "choose another with --store or WGJIT_STORE"
_OTHER_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

# current time as a Unix timestamp, computed by SQLite (sqlite 3.40 has no unixepoch('subsec'))
_NOW_SQL: Final = "((julianday('now') - 2440587.5) * 86400.0)"

# trigger bodies of migration 5 (retired keys keep their marks)
_RETIRE_OLD: Final = f"""INSERT INTO retired_keys (public_key, handshake_hwm, retired_at)
                VALUES (old.public_key, old.handshake_hwm, {_NOW_SQL})
                ON CONFLICT (public_key) DO UPDATE
                SET handshake_hwm = max(handshake_hwm, excluded.handshake_hwm),
                    retired_at = excluded.retired_at;"""
_RESTORE_NEW: Final = """UPDATE peers
                SET handshake_hwm = (SELECT r.handshake_hwm FROM retired_keys r
                                     WHERE r.public_key = new.public_key)
                WHERE id = new.id AND (handshake_hwm IS NULL OR handshake_hwm <
                    (SELECT r.handshake_hwm FROM retired_keys r
                     WHERE r.public_key = new.public_key));
            DELETE FROM retired_keys WHERE public_key = new.public_key;"""

# Each step is a list of statements (or Python callables, for data that SQL cannot compute)
# run in order; the schema version (PRAGMA user_version) is the number of steps applied. Never
# edit a released step: append a new one.
MIGRATIONS: list[tuple[str | Callable[[sqlite3.Connection], None], ...]] = [
    # 1: peers with unique name and key (the key index makes lookup a point query), the change
    #    feed and the triggers that fill it. Handshake bookkeeping (last_seen, handshake_hwm)
    #    changes on every handshake and deliberately produces no feed entry.
    (
        """CREATE TABLE peers (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            public_key BLOB NOT NULL CHECK (length(public_key) = 32),
            allowed_ips TEXT NOT NULL,
            preshared_key BLOB CHECK (preshared_key IS NULL OR length(preshared_key) = 32),
            revoked INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            last_seen REAL,
            handshake_hwm BLOB CHECK (handshake_hwm IS NULL OR length(handshake_hwm) = 12)
        )""",
        "CREATE UNIQUE INDEX peers_by_name ON peers (name)",
        "CREATE UNIQUE INDEX peers_by_key ON peers (public_key)",
        """CREATE TABLE peer_changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            public_key BLOB NOT NULL,
            at REAL NOT NULL
        )""",
        f"""CREATE TRIGGER peers_feed_insert AFTER INSERT ON peers BEGIN
            INSERT INTO peer_changes (public_key, at) VALUES (new.public_key, {_NOW_SQL});
        END""",
        f"""CREATE TRIGGER peers_feed_update
            AFTER UPDATE OF name, allowed_ips, preshared_key, revoked, public_key ON peers
            WHEN old.name IS NOT new.name
              OR old.allowed_ips IS NOT new.allowed_ips
              OR old.preshared_key IS NOT new.preshared_key
              OR old.revoked IS NOT new.revoked
              OR old.public_key IS NOT new.public_key
        BEGIN
            INSERT INTO peer_changes (public_key, at)
                SELECT old.public_key, {_NOW_SQL} WHERE old.public_key IS NOT new.public_key;
            INSERT INTO peer_changes (public_key, at) VALUES (new.public_key, {_NOW_SQL});
        END""",
        f"""CREATE TRIGGER peers_feed_delete AFTER DELETE ON peers BEGIN
            INSERT INTO peer_changes (public_key, at) VALUES (old.public_key, {_NOW_SQL});
        END""",
    ),
    # 2: presence (which gateway holds which peer; gateways sharing this file on one host).
    #    A claim moving to another gateway adds a feed entry, so the old holder learns it.
    (
        """CREATE TABLE gateways (
            gateway_id TEXT PRIMARY KEY,
            heartbeat_at REAL NOT NULL
        )""",
        """CREATE TABLE peer_claims (
            public_key BLOB PRIMARY KEY,
            gateway_id TEXT NOT NULL,
            claimed_at REAL NOT NULL
        )""",
        "CREATE INDEX peer_claims_by_gateway ON peer_claims (gateway_id)",
        """CREATE TRIGGER peers_claims_delete AFTER DELETE ON peers BEGIN
            DELETE FROM peer_claims WHERE public_key = old.public_key;
        END""",
    ),
    # 3: every allowed-IP prefix as an indexed (family, first, last) row, so an overlap is
    #    found with a few index seeks (wgjit.store.prefixes), never a scan of every peer
    (
        """CREATE TABLE peer_prefixes (
            peer_id INTEGER NOT NULL,
            family INTEGER NOT NULL CHECK (family IN (4, 6)),
            first BLOB NOT NULL,
            last BLOB NOT NULL
        )""",
        "CREATE INDEX peer_prefixes_by_first ON peer_prefixes (family, first)",
        "CREATE INDEX peer_prefixes_by_peer ON peer_prefixes (peer_id)",
        """CREATE TRIGGER peers_prefixes_delete AFTER DELETE ON peers BEGIN
            DELETE FROM peer_prefixes WHERE peer_id = old.id;
        END""",
        lambda conn: _backfill_prefixes(conn),
    ),
    # 4: lifecycle: disabled (refused until enabled again) and an expiry time; both are
    #    changes a gateway must learn, so the feed's update trigger now watches them too
    (
        "ALTER TABLE peers ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0"
        " CHECK (disabled IN (0, 1))",
        "ALTER TABLE peers ADD COLUMN expires_at REAL",
        "DROP TRIGGER peers_feed_update",
        f"""CREATE TRIGGER peers_feed_update
            AFTER UPDATE OF name, allowed_ips, preshared_key, revoked, public_key, disabled,
                expires_at ON peers
            WHEN old.name IS NOT new.name
              OR old.allowed_ips IS NOT new.allowed_ips
              OR old.preshared_key IS NOT new.preshared_key
              OR old.revoked IS NOT new.revoked
              OR old.public_key IS NOT new.public_key
              OR old.disabled IS NOT new.disabled
              OR old.expires_at IS NOT new.expires_at
        BEGIN
            INSERT INTO peer_changes (public_key, at)
                SELECT old.public_key, {_NOW_SQL} WHERE old.public_key IS NOT new.public_key;
            INSERT INTO peer_changes (public_key, at) VALUES (new.public_key, {_NOW_SQL});
        END""",
    ),
    # 5: the store never forgets a key's anti-replay mark. A key leaving the peers table (the
    #    peer removed, or its key changed) leaves its mark in retired_keys; a key coming back
    #    (added, imported, or a key changed to it) takes the greater of its mark and the
    #    retired one, and the retired row goes. A key is in at most one of the two tables.
    #    Only the mark moves: no feed entry (the feed triggers ignore handshake_hwm).
    (
        """CREATE TABLE retired_keys (
            public_key BLOB PRIMARY KEY CHECK (length(public_key) = 32),
            handshake_hwm BLOB NOT NULL CHECK (length(handshake_hwm) = 12),
            retired_at REAL NOT NULL
        )""",
        f"""CREATE TRIGGER peers_retire_delete AFTER DELETE ON peers
            WHEN old.handshake_hwm IS NOT NULL
        BEGIN
            {_RETIRE_OLD}
        END""",
        f"""CREATE TRIGGER peers_retire_rekey AFTER UPDATE OF public_key ON peers
            WHEN old.public_key IS NOT new.public_key AND old.handshake_hwm IS NOT NULL
        BEGIN
            {_RETIRE_OLD}
        END""",
        f"""CREATE TRIGGER peers_restore_insert AFTER INSERT ON peers
            WHEN EXISTS (SELECT 1 FROM retired_keys WHERE public_key = new.public_key)
        BEGIN
            {_RESTORE_NEW}
        END""",
        f"""CREATE TRIGGER peers_restore_rekey AFTER UPDATE OF public_key ON peers
            WHEN old.public_key IS NOT new.public_key
              AND EXISTS (SELECT 1 FROM retired_keys WHERE public_key = new.public_key)
        BEGIN
            {_RESTORE_NEW}
        END""",
    ),
    # 6: store-wide defaults (`wgjit store set-defaults`): client-config options and the
    #    address pool of `--allowed-ips auto`, as text keyed by option name
    (
        """CREATE TABLE defaults (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
    ),
    # 7: per-peer status kept across installs (a device's counters restart at every
    #    reinstall, so gateways add what they counted: Store.record_traffic), and what a
    #    gateway's heartbeat says of it (peers on its device, knocks dropped by reason, as
    #    JSON). Status is not a change: the feed triggers do not watch these columns.
    (
        "ALTER TABLE peers ADD COLUMN rx_bytes INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE peers ADD COLUMN tx_bytes INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE peers ADD COLUMN last_handshake REAL",
        "ALTER TABLE peers ADD COLUMN endpoint TEXT",
        "ALTER TABLE gateways ADD COLUMN installed INTEGER",
        "ALTER TABLE gateways ADD COLUMN rejects TEXT",
    ),
    # 8: list_page() by state walks an index of that state's peers alone (a few revoked peers
    #    among a million are found without reading the rest); active peers, the usual many,
    #    walk peers_by_name. The WHERE clauses are _STATE_SQL's, as the planner needs them.
    (
        "CREATE INDEX peers_revoked_by_name ON peers (name) WHERE revoked = 1",
        "CREATE INDEX peers_disabled_by_name ON peers (name) WHERE disabled = 1 AND revoked = 0",
        "CREATE INDEX peers_expiring_by_name ON peers (name) WHERE expires_at IS NOT NULL",
    ),
]
# list_page(state=...): the condition, as Peer.refusal() decides it (`:now` is bound)
_STATE_SQL: Final = {
    "active": "revoked = 0 AND disabled = 0 AND (expires_at IS NULL OR expires_at > :now)",
    "revoked": "revoked = 1",
    "disabled": "disabled = 1 AND revoked = 0",
    "expired": "expires_at IS NOT NULL AND revoked = 0 AND disabled = 0 AND expires_at <= :now",
}

_COLUMNS: Final = (
    "name, public_key, allowed_ips, preshared_key, revoked, created_at, updated_at, last_seen,"
    " handshake_hwm,"
    " (SELECT gateway_id FROM peer_claims c WHERE c.public_key = peers.public_key),"
    " disabled, expires_at, rx_bytes, tx_bytes, last_handshake, endpoint"
)
LOOKUP_SQL: Final = f"SELECT {_COLUMNS} FROM peers WHERE public_key = ?"
_BY_NAME_SQL: Final = f"SELECT {_COLUMNS} FROM peers WHERE name = ?"
# one statement: check-and-advance is atomic (TAI64N timestamps compare bytewise, as BLOBs do)
_ADVANCE_SQL: Final = (
    "UPDATE peers SET handshake_hwm = ?, last_seen = ?"
    " WHERE public_key = ? AND (handshake_hwm IS NULL OR handshake_hwm < ?)"
)


def _advance_many_sql(n: int) -> str:
    """_ADVANCE_SQL for n (public_key, timestamp, seen_at) rows in one statement, returning the
    keys whose mark moved forward. The keys must be distinct (UPDATE ... FROM takes one
    matching row per peer, unspecified which)."""
    values = ", ".join(["(?, ?, ?)"] * n)
    return (
        "UPDATE peers SET handshake_hwm = v.column2, last_seen = v.column3"
        f" FROM (VALUES {values}) AS v WHERE peers.public_key = v.column1"
        " AND (peers.handshake_hwm IS NULL OR peers.handshake_hwm < v.column2)"
        " RETURNING public_key"
    )


# record_traffic: one statement per chunk of rows (key, rx, tx, handshake, endpoint); the
# marks list is appended per chunk. A handshake only moves forward (max() of SQLite is NULL
# if either is, hence the coalesces); the endpoint is kept when the row has none.
_TRAFFIC_SQL: Final = (
    "UPDATE peers SET rx_bytes = rx_bytes + v.column2, tx_bytes = tx_bytes + v.column3,"
    " last_handshake = coalesce(max(last_handshake, v.column4), v.column4, last_handshake),"
    " endpoint = coalesce(v.column5, endpoint)"
    " FROM (VALUES {rows}) AS v WHERE peers.public_key = v.column1"
)
_LAST_SEQ_SQL: Final = (
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'peer_changes'), 0)"
)
# Prune only a prefix of the feed (by seq) that is entirely older than the cutoff, so the
# retained entries are always a contiguous range [first, last]; a reader whose cursor is below
# first-1 is detected (ChangeFeedExpired) instead of silently missing changes. The scan walks
# only the entries it deletes (plus one), so it is cheap on every administrative write.
_PRUNE_SQL: Final = (
    "DELETE FROM peer_changes WHERE seq < coalesce("
    "(SELECT seq FROM peer_changes WHERE at >= ? ORDER BY seq LIMIT 1),"
    " (SELECT seq FROM sqlite_sequence WHERE name = 'peer_changes') + 1)"
)

_VARIABLE_LIMIT: Final = sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER

# primary result codes (sqlite3.Error.sqlite_errorcode & 0xFF)
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN = 10, 11, 13, 14
_SQLITE_AUTH, _SQLITE_NOTADB = 23, 26


def path_from_url(url: str) -> Path:
    """The database file a store URL names.

    Accepted forms (surrounding whitespace is ignored, `~` is expanded):
      `sqlite:///var/lib/wgjit/peers.db`  absolute path (file-URL style: three slashes)
      `sqlite:peers.db`, `sqlite:data/peers.db`, `sqlite:/abs/peers.db`  path as written
      `/var/lib/wgjit/peers.db`, `peers.db`  a plain path (no scheme)
    `sqlite://peers.db` (two slashes) is refused: in URL syntax `peers.db` would be a host, and
    SQLAlchemy reads `sqlite:///x` as relative while we read it as absolute, so guessing could
    silently pick the wrong file. Query strings (`?...`) are refused for the same reason; the
    path is used literally (no percent-decoding). Other schemes raise StoreError.
    """
    text = url.strip()
    if text.startswith("sqlite:"):
        rest = text[len("sqlite:") :]
        if rest.startswith("//"):
            rest = rest[2:]
            if not rest.startswith("/"):
                raise StoreError(
                    f"store URL {redact(url)!r} is ambiguous: use sqlite:///ABSOLUTE/PATH.db for"
                    f" an absolute path or sqlite:RELATIVE/PATH.db for a relative one"
                )
            rest = "/" + rest.lstrip("/")
        if not rest or rest.endswith("/"):
            raise StoreError(f"store URL {redact(url)!r} names no file; use {URL_FORMS}")
        if "?" in rest or "#" in rest:
            raise StoreError(
                f"store URL {redact(url)!r} has query parameters, which are not supported;"
                f" use {URL_FORMS}"
            )
        return Path(rest).expanduser()
    if not text or _OTHER_SCHEME.match(text):
        raise StoreError(f"unsupported store URL {redact(url)!r}; use {URL_FORMS}")
    if ":" in text:
        # `postgresql:/db`, `sqlite//x`, `::::`: a mistyped URL, not a file name to create
        raise StoreError(
            f"store URL {redact(url)!r} is not a URL wgjit knows, and a file path with ':' is"
            f" refused as a likely typo; use {URL_FORMS}, or postgresql://..."
        )
    return Path(text).expanduser()


class SQLiteStore(Closing):
    """The Store protocol on one SQLite file. Thread-safe (a reader and a writer connection,
    each behind a lock); several processes may open the same file at once."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = BUSY_TIMEOUT_S,
        create: bool = True,
    ):
        """`create=False`: open only an existing, initialised store; a missing or empty file
        raises StoreError naming `wgjit store init` (a mistyped path must not become a store)."""
        self.path = Path(os.path.abspath(Path(path).expanduser()))
        self.busy_timeout = busy_timeout
        self._create = create
        self._lock = threading.Lock()  # guards _conn, the writer
        self._rlock = threading.Lock()  # guards _rconn, the reader
        self._conn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._prepare_file()
        conn = self._connect()
        try:
            if not create and int(conn.execute("PRAGMA user_version").fetchone()[0]) == 0:
                # checked before anything writes to the file (journal_mode = WAL does)
                raise self._missing("is not an initialised wgjit store (empty or foreign)")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL mode, and fast
            self._migrate(conn)
            rconn = self._connect()
        except sqlite3.Error as e:
            conn.close()
            raise self._error(e, "open it") from e
        except BaseException:
            conn.close()
            raise
        try:
            rconn.execute("PRAGMA query_only = ON")
            # the most keys one IN (...) may carry: SQLite's variable limit, less the others
            self._chunk = max(1, min(MANY_CHUNK, rconn.getlimit(_VARIABLE_LIMIT) - 2))
            # record_traffic binds five variables a row, admit_many three
            self._rows_chunk = max(1, min(MANY_CHUNK, conn.getlimit(_VARIABLE_LIMIT) // 5))
        except sqlite3.Error as e:
            conn.close()
            rconn.close()
            raise self._error(e, "open it") from e
        self._conn, self._rconn = conn, rconn

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                # mode=rw: never creates the file (it may have been removed since the check)
                self.path if self._create else f"file:{pathname2url(str(self.path))}?mode=rw",
                uri=not self._create,
                timeout=self.busy_timeout,
                isolation_level=None,  # autocommit; transactions are explicit BEGIN ... COMMIT
                check_same_thread=False,  # shared by a gateway's threads, serialised by a lock
            )
        except sqlite3.Error as e:
            raise self._error(e, "open it") from e
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000):d}")
            # SQLite's default page cache (2 MiB per connection) on purpose: the upper levels
            # of the key index of a million peers fit, and the rest is a read from the OS's
            # page cache on a worker thread. A 64 MiB cache held the whole file of 100 000
            # peers in every gateway's memory (issue 9's goal: <= 100 MB at 100 000 peers).
        except sqlite3.Error as e:
            conn.close()
            raise self._error(e, "open it") from e
        return conn

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        with self._rlock:
            conn, self._rconn = self._rconn, None
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

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
        with self._write(f"add peer {name!r}") as conn:
            if conn.execute("SELECT 1 FROM peers WHERE name = ?", (name,)).fetchone():
                raise DuplicatePeer(f"peer {name!r} already exists")
            row = conn.execute(
                "SELECT name FROM peers WHERE public_key = ?", (public_key.raw,)
            ).fetchone()
            if row:
                raise DuplicatePeer(
                    f"public key {public_key.short()}... is already used by peer {row[0]!r}"
                )
            if not allow_overlap:
                clash = _overlap(conn, nets, None)
                if clash:
                    raise PeerRefused(clash)
            cur = conn.execute(
                "INSERT INTO peers (name, public_key, allowed_ips, preshared_key, revoked,"
                " created_at, updated_at, expires_at) VALUES (?, ?, ?, ?, 0, ?, ?, ?)",
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
            peer_id = int(cur.lastrowid or 0)
            _set_prefixes(conn, peer_id, nets)
            # a key used before keeps its mark (migration 5's trigger put it on the row)
            mark = conn.execute(
                "SELECT handshake_hwm FROM peers WHERE id = ?", (peer_id,)
            ).fetchone()[0]
            self._prune(conn, now)
        return Peer(
            name, public_key, nets, preshared_key, False, now, now,
            handshake_hwm=bytes(mark) if mark is not None else None, expires_at=expires_at,
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
        now = time.time()
        with self._write(f"change peer {name!r}") as conn:
            row = conn.execute("SELECT id, public_key FROM peers WHERE name = ?", (name,))
            found = row.fetchone()
            if found is None:
                raise UnknownPeer(f"no peer named {name!r}")
            peer_id, old_key = int(found[0]), bytes(found[1])
            sets: list[str] = []
            params: list[Any] = []
            if new_name is not None and new_name != name:
                if conn.execute("SELECT 1 FROM peers WHERE name = ?", (new_name,)).fetchone():
                    raise DuplicatePeer(f"peer {new_name!r} already exists")
                sets.append("name = ?")
                params.append(new_name)
            if public_key is not None and public_key.raw != old_key:
                other = conn.execute(
                    "SELECT name FROM peers WHERE public_key = ?", (public_key.raw,)
                ).fetchone()
                if other:
                    raise DuplicatePeer(
                        f"public key {public_key.short()}... is already used by peer {other[0]!r}"
                    )
                # a new key: no gateway holds it yet, and its handshakes start afresh, from
                # its retired mark if it had one (the old key's mark is retired: migration 5's
                # triggers do both)
                sets.append("public_key = ?, handshake_hwm = NULL, last_seen = NULL")
                params.append(public_key.raw)
                conn.execute("DELETE FROM peer_claims WHERE public_key = ?", (old_key,))
            if allowed_ips is not None:
                if plan.check_overlap:
                    clash = _overlap(conn, allowed_ips, peer_id)
                    if clash:
                        raise PeerRefused(clash)
                sets.append("allowed_ips = ?")
                params.append(format_networks(allowed_ips))
                _set_prefixes(conn, peer_id, allowed_ips)
            if not isinstance(preshared_key, Keep):
                sets.append("preshared_key = ?")
                params.append(preshared_key.raw if preshared_key else None)
            if disabled is not None:
                sets.append("disabled = ?")
                params.append(int(disabled))
            if not isinstance(expires_at, Keep):
                sets.append("expires_at = ?")
                params.append(expires_at)
            if sets:
                conn.execute(
                    f"UPDATE peers SET {', '.join(sets)}, updated_at = ? WHERE id = ?",
                    (*params, now, peer_id),
                )
                self._prune(conn, now)
            out = conn.execute(f"SELECT {_COLUMNS} FROM peers WHERE id = ?", (peer_id,))
            result = out.fetchone()
        return self._peer(result)

    def get_defaults(self) -> dict[str, str]:
        with self._read("read the defaults") as conn:
            rows = conn.execute("SELECT key, value FROM defaults ORDER BY key").fetchall()
        return {str(k): str(v) for k, v in rows}

    def set_defaults(self, changes: Mapping[str, str | None]) -> dict[str, str]:
        with self._write("set the defaults") as conn:
            for key, value in changes.items():
                if value is None:
                    conn.execute("DELETE FROM defaults WHERE key = ?", (key,))
                else:
                    conn.execute(
                        "INSERT INTO defaults (key, value) VALUES (?, ?)"
                        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (key, value),
                    )
            rows = conn.execute("SELECT key, value FROM defaults ORDER BY key").fetchall()
        return {str(k): str(v) for k, v in rows}

    def get_peer(self, name: str) -> Peer | None:
        with self._query(f"read peer {name!r}") as conn:
            row = conn.execute(_BY_NAME_SQL, (name,)).fetchone()
        return self._peer(row) if row else None

    def lookup(self, public_key: PublicKey) -> Peer | None:
        with self._query("look up a peer") as conn:
            row = conn.execute(LOOKUP_SQL, (public_key.raw,)).fetchone()
        return self._peer(row) if row else None

    def lookup_many(self, public_keys: Sequence[PublicKey]) -> dict[PublicKey, Peer]:
        keys = list(dict.fromkeys(k.raw for k in public_keys))
        found: dict[PublicKey, Peer] = {}
        for i in range(0, len(keys), self._chunk):
            chunk = keys[i : i + self._chunk]
            # the lock is taken per chunk: other threads' calls run in between
            with self._query(f"look up {len(keys)} peers") as conn:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM peers WHERE public_key IN ({_marks(len(chunk))})",
                    chunk,
                ).fetchall()
            for r in rows:
                peer = self._peer(r)
                found[peer.public_key] = peer
        return found

    def list_peers(self) -> list[Peer]:
        with self._query("list peers") as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM peers ORDER BY name").fetchall()
        return [self._peer(r) for r in rows]

    def list_page(
        self,
        *,
        after: str = "",
        limit: int = 100,
        prefix: str = "",
        state: str | None = None,
        now: float | None = None,
    ) -> list[Peer]:
        where, params = _page_where(after, limit, prefix, state, now)
        sql = f"SELECT {_COLUMNS} FROM peers WHERE {where} ORDER BY name LIMIT :limit"
        with self._query("list peers") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [self._peer(r) for r in rows]

    def revoke(self, name: str) -> Peer:
        now = time.time()
        with self._write(f"revoke peer {name!r}") as conn:
            cur = conn.execute(
                "UPDATE peers SET revoked = 1, updated_at = ? WHERE name = ? AND revoked = 0",
                (now, name),
            )
            row = conn.execute(_BY_NAME_SQL, (name,)).fetchone()
            if row is None:
                raise UnknownPeer(f"no peer named {name!r}")
            if cur.rowcount:
                self._prune(conn, now)
        return self._peer(row)

    def remove(self, name: str) -> Peer:
        now = time.time()
        with self._write(f"remove peer {name!r}") as conn:
            row = conn.execute(_BY_NAME_SQL, (name,)).fetchone()
            if row is None:
                raise UnknownPeer(f"no peer named {name!r}")
            conn.execute("DELETE FROM peers WHERE name = ?", (name,))
            self._prune(conn, now)
        return self._peer(row)

    def reset_handshake_mark(self, name: str) -> Peer:
        with self._write(f"reset the replay mark of peer {name!r}") as conn:
            row = conn.execute(_BY_NAME_SQL, (name,)).fetchone()
            if row is None:
                raise UnknownPeer(f"no peer named {name!r}")
            conn.execute("UPDATE peers SET handshake_hwm = NULL WHERE name = ?", (name,))
        return self._peer(row)

    # -- handshakes -----------------------------------------------------------------------------

    def advance_handshake(self, hs: Handshake) -> bool:
        ts = _timestamp(hs)
        with self._op("record a handshake") as conn:
            cur = conn.execute(_ADVANCE_SQL, (ts, hs.seen_at, hs.public_key.raw, ts))
            return cur.rowcount == 1

    def record_handshakes(self, handshakes: Iterable[Handshake]) -> None:
        params = [(_timestamp(h), h.seen_at, h.public_key.raw, _timestamp(h)) for h in handshakes]
        if not params:
            return
        with self._write(f"record {len(params)} handshakes") as conn:
            conn.executemany(_ADVANCE_SQL, params)

    def import_peers(
        self, peers: Sequence[Peer], *, allow_overlap: bool = False, dry_run: bool = False
    ) -> ImportResult:
        res = ImportResult()
        if not peers:
            return res
        for p in peers:
            validate_peer_name(p.name)
            if p.handshake_hwm is not None and len(p.handshake_hwm) != TAI64N_LEN:
                raise ValueError(f"peer {p.name!r}: a handshake mark is {TAI64N_LEN} bytes")
        now = time.time()
        with contextlib.suppress(_DryRun):
            self._import(peers, allow_overlap, dry_run, now, res)
        return res

    def _import(
        self,
        peers: Sequence[Peer],
        allow_overlap: bool,
        dry_run: bool,
        now: float,
        res: ImportResult,
    ) -> None:
        with self._write(f"import {len(peers)} peers") as conn:
            # pass 1: each row against the stored peers
            new: list[int] = []
            # row -> (peer id, allowed IPs changed, the values to store)
            changed: dict[int, tuple[int, bool, tuple[Any, ...]]] = {}
            for i, p in enumerate(peers):
                ips = format_networks(p.allowed_ips)
                psk = p.preshared_key.raw if p.preshared_key else None
                why = peer_problem(p.public_key, p.allowed_ips, allow_overlap)
                if why:
                    res.rejected.append((i, why))
                    continue
                by_key = conn.execute(
                    "SELECT name FROM peers WHERE public_key = ?", (p.public_key.raw,)
                ).fetchone()
                if by_key is not None and by_key[0] != p.name:
                    res.rejected.append((i, f"public key is already used by peer {by_key[0]!r}"))
                    continue
                row = conn.execute(
                    "SELECT public_key, allowed_ips, preshared_key, revoked, id, disabled,"
                    " expires_at, handshake_hwm FROM peers WHERE name = ?",
                    (p.name,),
                ).fetchone()
                if row is not None and bytes(row[0]) != p.public_key.raw:
                    res.rejected.append((i, "a peer with this name exists with another public key"))
                    continue
                moved = row is None or row[1] != ips
                if moved and not allow_overlap:
                    clash = _overlap(conn, p.allowed_ips, None if row is None else int(row[4]))
                    if clash:
                        res.rejected.append((i, clash))
                        continue
                if row is None:
                    new.append(i)
                    continue
                # an import revokes or disables but never reinstates or enables, moves an
                # expiry only earlier and a mark only forward (see Store.import_peers)
                stored = (
                    row[1], row[2], bool(row[3]), bool(row[5]), row[6],
                    bytes(row[7]) if row[7] is not None else None,
                )  # fmt: skip
                wanted = (
                    ips, psk, stored[2] or p.revoked, stored[3] or p.disabled,
                    _earlier(stored[4], p.expires_at), _later(stored[5], p.handshake_hwm),
                )  # fmt: skip
                if wanted != stored:
                    changed[i] = (int(row[4]), moved, wanted)
                else:
                    res.unchanged += 1
            # pass 2: the rows that move prefixes, against each other (earlier rows win)
            if not allow_overlap:
                moving = [
                    (i, peers[i].name, peers[i].allowed_ips)
                    for i in sorted([*new, *(i for i, (_, m, _) in changed.items() if m)])
                ]
                for i, why in overlaps_within(moving).items():
                    res.rejected.append((i, why))
                    if i in changed:
                        del changed[i]
                    else:
                        new.remove(i)
            res.reused_keys = sum(
                conn.execute(
                    "SELECT count(*) FROM retired_keys WHERE public_key = ?",
                    (peers[i].public_key.raw,),
                ).fetchone()[0]
                for i in new
            )
            for i in new:
                p = peers[i]
                # a new row with a retired key takes its mark if greater (migration 5's trigger)
                cur = conn.execute(
                    "INSERT INTO peers (name, public_key, allowed_ips, preshared_key, revoked,"
                    " disabled, expires_at, handshake_hwm, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        p.name,
                        p.public_key.raw,
                        format_networks(p.allowed_ips),
                        p.preshared_key.raw if p.preshared_key else None,
                        int(p.revoked),
                        int(p.disabled),
                        p.expires_at,
                        p.handshake_hwm,
                        now,
                        now,
                    ),
                )
                _set_prefixes(conn, int(cur.lastrowid or 0), p.allowed_ips)
            for i, (peer_id, moved, wanted) in changed.items():
                ips, psk, revoked, disabled, expires_at, mark = wanted
                conn.execute(
                    "UPDATE peers SET allowed_ips = ?, preshared_key = ?, revoked = ?,"
                    " disabled = ?, expires_at = ?, handshake_hwm = ?, updated_at = ?"
                    " WHERE id = ?",
                    (ips, psk, int(revoked), int(disabled), expires_at, mark, now, peer_id),
                )
                if moved:
                    _set_prefixes(conn, peer_id, peers[i].allowed_ips)
            res.added, res.updated = len(new), len(changed)
            res.rejected.sort()
            if dry_run:
                raise _DryRun  # _op rolls the transaction back
            self._prune(conn, now)

    def iter_peers(self) -> Iterator[Peer]:
        # pages by name (keyset), so the lock is never held while the caller works
        after = ""
        while True:
            with self._query("list peers") as conn:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM peers WHERE name > ? ORDER BY name LIMIT 10000",
                    (after,),
                ).fetchall()
            if not rows:
                return
            for r in rows:
                yield self._peer(r)
            after = rows[-1][0]

    # -- presence -------------------------------------------------------------------------------

    def claim(self, public_key: PublicKey, gateway_id: str) -> str | None:
        # read and write in one IMMEDIATE transaction: no other connection writes between
        # the read of the holder and the new claim (a release waits for our commit)
        with self._write("claim a peer") as conn:
            if (
                conn.execute(
                    "SELECT 1 FROM peers WHERE public_key = ?", (public_key.raw,)
                ).fetchone()
                is None
            ):
                raise UnknownPeer(f"peer {public_key.short()}... is no longer in the store")
            row = conn.execute(
                "SELECT gateway_id FROM peer_claims WHERE public_key = ?", (public_key.raw,)
            ).fetchone()
            conn.execute(
                "INSERT OR REPLACE INTO peer_claims (public_key, gateway_id, claimed_at)"
                " VALUES (?, ?, ?)",
                (public_key.raw, gateway_id, time.time()),
            )
            previous = str(row[0]) if row else None
            if previous is None or previous == gateway_id:
                return None
            conn.execute(
                f"INSERT INTO peer_changes (public_key, at) VALUES (?, {_NOW_SQL})",
                (public_key.raw,),
            )
            return previous

    def claim_many(self, public_keys: Sequence[PublicKey], gateway_id: str) -> None:
        keys = list(dict.fromkeys(k.raw for k in public_keys))
        for i in range(0, len(keys), self._chunk):
            with self._write(f"claim {len(keys)} peers") as conn:
                _claim_chunk(conn, keys[i : i + self._chunk], gateway_id)

    def admit_many(
        self, handshakes: Sequence[Handshake], gateway_id: str
    ) -> dict[PublicKey, str | None]:
        hss = newest_handshakes(handshakes)
        admitted: dict[PublicKey, str | None] = {}
        for i in range(0, len(hss), self._rows_chunk):
            chunk = hss[i : i + self._rows_chunk]
            with self._write(f"admit {len(hss)} handshakes") as conn:
                params = [v for h in chunk for v in (h.public_key.raw, _timestamp(h), h.seen_at)]
                keys = [r[0] for r in conn.execute(_advance_many_sql(len(chunk)), params)]
                if not keys:
                    continue
                held = dict(
                    conn.execute(
                        "SELECT public_key, gateway_id FROM peer_claims"
                        f" WHERE public_key IN ({_marks(len(keys))}) AND gateway_id <> ?",
                        (*keys, gateway_id),
                    ).fetchall()
                )
                _claim_chunk(conn, keys, gateway_id)
            by_raw = {h.public_key.raw: h.public_key for h in chunk}
            for k in keys:
                previous = held.get(k)
                admitted[by_raw[k]] = None if previous is None else str(previous)
        return admitted

    def release(self, public_keys: Iterable[PublicKey], gateway_id: str) -> None:
        params = [(k.raw, gateway_id) for k in public_keys]
        if params:
            with self._write("release peers") as conn:
                conn.executemany(
                    "DELETE FROM peer_claims WHERE public_key = ? AND gateway_id = ?", params
                )

    def heartbeat(
        self,
        gateway_id: str,
        *,
        installed: int | None = None,
        rejects: Mapping[str, int] | None = None,
    ) -> None:
        now = time.time()
        said = json.dumps(dict(rejects), sort_keys=True) if rejects is not None else None
        with self._write("record a heartbeat") as conn:
            conn.execute(
                "INSERT OR REPLACE INTO gateways (gateway_id, heartbeat_at, installed, rejects)"
                " VALUES (?, ?, ?, ?)",
                (gateway_id, now, installed, said),
            )
            conn.execute(
                "DELETE FROM peer_claims WHERE gateway_id IN"
                " (SELECT gateway_id FROM gateways WHERE heartbeat_at < ?)",
                (now - PRESENCE_TTL_S,),
            )
            conn.execute("DELETE FROM gateways WHERE heartbeat_at < ?", (now - PRESENCE_TTL_S,))

    def gateways(self) -> list[GatewayPresence]:
        with self._read("read the gateways") as conn:
            rows = conn.execute(
                "SELECT g.gateway_id, g.heartbeat_at, g.installed, g.rejects,"
                " (SELECT count(*) FROM peer_claims c WHERE c.gateway_id = g.gateway_id)"
                " FROM gateways g WHERE g.heartbeat_at >= ? ORDER BY g.gateway_id",
                (time.time() - PRESENCE_TTL_S,),
            ).fetchall()
        return [presence(gid, at, n, said, claimed) for gid, at, n, said, claimed in rows]

    # -- status ---------------------------------------------------------------------------------

    def record_traffic(self, rows: Sequence[Traffic]) -> None:
        params = [
            (t.public_key.raw, int(t.rx_bytes), int(t.tx_bytes), t.last_handshake, t.endpoint)
            for t in _merged(rows)
        ]
        step = self._rows_chunk
        for i in range(0, len(params), step):
            chunk = params[i : i + step]
            sql = _TRAFFIC_SQL.format(rows=", ".join(["(?, ?, ?, ?, ?)"] * len(chunk)))
            with self._write(f"record the traffic of {len(params)} peers") as conn:
                conn.execute(sql, [v for row in chunk for v in row])

    def busiest_peers(self, limit: int) -> list[Peer]:
        with self._query("list the busiest peers") as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM peers WHERE rx_bytes + tx_bytes > 0"
                " ORDER BY rx_bytes + tx_bytes DESC, name LIMIT ?",
                (max(0, int(limit)),),
            ).fetchall()
        return [self._peer(r) for r in rows]

    def count_peers(self) -> int:
        with self._query("count peers") as conn:
            return int(conn.execute("SELECT count(*) FROM peers").fetchone()[0])

    # -- change feed ----------------------------------------------------------------------------

    def wakeup_fd(self) -> int | None:
        return None  # a file has no way to wake a reader: gateways poll (cheap, ~0.5 s)

    def change_cursor(self) -> int:
        # the highest seq ever assigned (kept by AUTOINCREMENT even after pruning), not max(seq)
        with self._query("read the change feed") as conn:
            return int(conn.execute(_LAST_SEQ_SQL).fetchone()[0])

    def changes_since(self, cursor: int) -> tuple[list[PublicKey], int]:
        cursor = max(cursor, 0)
        with self._read("read the change feed") as conn:
            last = int(conn.execute(_LAST_SEQ_SQL).fetchone()[0])
            if cursor == last:
                return [], cursor
            if cursor > last:
                raise ChangeFeedExpired(
                    f"change cursor {cursor} is ahead of store {self.path} (at {last}): the"
                    " store was replaced or restored; resynchronise"
                )
            # seqs are assigned in commit order and only a prefix is ever pruned, so the feed
            # is complete after `cursor` exactly when the oldest retained entry is <= cursor+1
            first = conn.execute("SELECT min(seq) FROM peer_changes").fetchone()[0]
            oldest = last + 1 if first is None else int(first)
            if oldest > cursor + 1:
                raise ChangeFeedExpired(
                    f"changes after cursor {cursor} in store {self.path} were pruned (kept"
                    f" {CHANGE_RETENTION_S / 3600:g} h); resynchronise"
                )
            rows = conn.execute(
                "SELECT public_key, max(seq) AS s FROM peer_changes WHERE seq > ?"
                " GROUP BY public_key ORDER BY s",
                (cursor,),
            ).fetchall()
        return [PublicKey(bytes(k)) for k, _ in rows], last

    # -- internals ------------------------------------------------------------------------------

    def _prepare_file(self) -> None:
        """Create the parent directory (0700) and the file (0600: it holds preshared keys)."""
        p = self.path
        try:
            if p.is_dir():
                raise StoreError(
                    f"store {p} is a directory; give a file path like {p / 'peers.db'}"
                )
            if not self._create:
                if not p.exists():
                    raise self._missing("does not exist")
                self._tighten()
                return
            ancestor = p.parent
            while not ancestor.exists() and ancestor != ancestor.parent:
                ancestor = ancestor.parent
            if not ancestor.is_dir():
                raise self._not_writable(f"{ancestor} is not a directory")
            p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            reason = e.strerror or str(e)
            if e.filename and os.fspath(e.filename) != str(p):
                reason = f"{e.filename}: {reason}"
            raise self._not_writable(reason) from e
        os.close(fd)
        self._tighten()

    def _tighten(self) -> None:
        """Make the store and its WAL/shared-memory files 0600 (they hold preshared keys):
        an existing store readable by others is fixed on open, or refused with the fix."""
        for f in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            try:
                mode = stat.S_IMODE(os.stat(f).st_mode)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise self._not_writable(e.strerror or str(e)) from e
            if mode & 0o077:
                try:
                    os.chmod(f, mode & 0o700)
                except OSError as e:
                    raise StoreError(
                        f"store file {f} is readable by other users (mode {mode:04o}) and"
                        f" cannot be made private ({e.strerror}); run `chmod 600 {f}` as its"
                        " owner"
                    ) from e

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the schema to len(MIGRATIONS), all steps in one transaction."""
        target = len(MIGRATIONS)
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        if app_id not in (0, APPLICATION_ID):
            raise StoreError(
                f"store {self.path} is an SQLite database of another application"
                f" (application_id {app_id:#x}); {_HINT}"
            )
        version = self._version(conn, target)
        if version == target:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = self._version(conn, target)  # another process may have just migrated
            if version == 0:
                foreign = [
                    r[0]
                    for r in conn.execute(
                        "SELECT name FROM sqlite_master"
                        " WHERE type = 'table' AND name NOT LIKE 'sqlite^_%' ESCAPE '^'"
                    )
                ]
                if foreign:
                    raise StoreError(
                        f"store {self.path} is an SQLite database with other tables"
                        f" ({', '.join(sorted(foreign))}), not a wgjit store; {_HINT}"
                    )
            try:
                for step in MIGRATIONS[version:]:
                    for statement in step:
                        if callable(statement):
                            statement(conn)
                        else:
                            conn.execute(statement)
            except sqlite3.Error as e:
                raise self._error(
                    e, f"upgrade its schema from version {version} to {target}"
                ) from e
            conn.execute(f"PRAGMA user_version = {target:d}")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _version(self, conn: sqlite3.Connection, target: int) -> int:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > target:
            raise StoreError(
                f"store {self.path} was created by a newer wgjit (schema version {version}; this"
                f" version knows up to {target}); upgrade wgjit or {_HINT}"
            )
        return version

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        conn.execute(_PRUNE_SQL, (now - CHANGE_RETENTION_S,))

    @contextlib.contextmanager
    def _op(self, what: str, *, reader: bool = False) -> Iterator[sqlite3.Connection]:
        """Hold the writer's lock (the reader's with `reader`) for at most busy_timeout; turn
        sqlite3 errors into StoreError; roll back on any failure."""
        lock = self._rlock if reader else self._lock
        if not lock.acquire(timeout=self.busy_timeout):
            raise StoreError(
                f"store {self.path} is busy: another thread of this process kept it for over"
                f" {self.busy_timeout:g} s (could not {what}); try again"
            )
        try:
            conn = self._rconn if reader else self._conn
            if conn is None:
                raise StoreError(f"store {self.path} is closed (cannot {what})")
            try:
                yield conn
            except sqlite3.Error as e:
                _rollback(conn)
                raise self._error(e, what) from e
            except BaseException:
                _rollback(conn)
                raise
        finally:
            lock.release()

    def _query(self, what: str) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """The reader connection, for statements that only read."""
        return self._op(what, reader=True)

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front (waiting up to busy_timeout), so a transaction
        # that reads and then writes never fails half-way on a lock upgrade
        with self._op(what) as conn:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        """Several reads from one consistent snapshot, on the reader connection."""
        with self._op(what, reader=True) as conn:
            conn.execute("BEGIN")
            yield conn
            conn.execute("COMMIT")

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
            raise StoreError(f"store {self.path} has an invalid row for peer {name!r}: {e}") from e

    def _missing(self, what: str) -> StoreError:
        return StoreError(
            f"store {self.path} {what}; create it with `wgjit store init --store {self.path}`,"
            f" or {_HINT}"
        )

    def _not_writable(self, reason: str) -> StoreError:
        return StoreError(f"store {self.path} is not writable: {reason}; {_HINT}")

    def _error(self, e: sqlite3.Error, what: str) -> StoreError:
        """One clear line for a failed sqlite3 call."""
        code = int(getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF
        p, reason = self.path, str(e)
        if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
            return StoreError(
                f"store {p} is busy: another process kept it locked for over"
                f" {self.busy_timeout:g} s (could not {what}); try again"
            )
        if code == _SQLITE_FULL:
            return StoreError(f"store {p}: could not {what}: disk full ({reason}); free space")
        if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            return StoreError(
                f"store {p} is damaged or not a wgjit store ({reason}); restore it from a"
                f" backup or {_HINT}"
            )
        if code in (_SQLITE_READONLY, _SQLITE_CANTOPEN, _SQLITE_PERM, _SQLITE_AUTH):
            return self._not_writable(reason)
        if code == _SQLITE_IOERR:
            return StoreError(f"store {p}: I/O error, could not {what} ({reason})")
        return StoreError(f"store {p}: could not {what}: {reason}")


def _timestamp(hs: Handshake) -> bytes:
    ts = bytes(hs.timestamp)
    if len(ts) != TAI64N_LEN:
        raise ValueError(f"handshake timestamp must be {TAI64N_LEN} bytes (TAI64N), got {len(ts)}")
    return ts


def _later(a: bytes | None, b: bytes | None) -> bytes | None:
    """The later of two marks (TAI64N compares bytewise); None only if both are."""
    if a is None or (b is not None and b > a):
        return b
    return a


def _earlier(a: float | None, b: float | None) -> float | None:
    """The earlier of two expiry times, None meaning never (so None only if both are)."""
    if a is None or (b is not None and b < a):
        return b
    return a


def _marks(n: int) -> str:
    """`?, ?, ...`: n placeholders for an IN (...) list."""
    return ", ".join("?" * n)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


class _DryRun(Exception):
    """Raised inside an import transaction to roll it back (import_peers(dry_run=True))."""


def _overlap(
    conn: sqlite3.Connection, nets: Iterable[IPNetwork], exclude_peer: int | None
) -> str | None:
    """Why `nets` clash with another stored peer's prefixes (not `exclude_peer`'s), or None.
    Two index seeks per prefix: stored prefixes inside it (first address in its range), and
    stored prefixes around it (first address one of its supernets' and last one >= its)."""
    skip = -1 if exclude_peer is None else exclude_peer
    for net in nets:
        family, first, last = bounds(net)
        row = conn.execute(
            "SELECT x.first, x.last, p.name FROM peer_prefixes x JOIN peers p ON p.id = x.peer_id"
            " WHERE x.family = ? AND x.first BETWEEN ? AND ? AND x.peer_id <> ? LIMIT 1",
            (family, first, last, skip),
        ).fetchone()
        firsts = supernet_firsts(net)
        if row is None and firsts:
            marks = ",".join("?" * len(firsts))
            row = conn.execute(
                "SELECT x.first, x.last, p.name FROM peer_prefixes x"
                " JOIN peers p ON p.id = x.peer_id"
                f" WHERE x.family = ? AND x.first IN ({marks}) AND x.last >= ?"
                " AND x.peer_id <> ? LIMIT 1",
                (family, *firsts, last, skip),
            ).fetchone()
        if row is not None:
            other = network_of(family, bytes(row[0]), bytes(row[1]))
            return overlap_message(net, other, row[2])
    return None


def _set_prefixes(conn: sqlite3.Connection, peer_id: int, nets: Iterable[IPNetwork]) -> None:
    conn.execute("DELETE FROM peer_prefixes WHERE peer_id = ?", (peer_id,))
    conn.executemany(
        "INSERT INTO peer_prefixes (peer_id, family, first, last) VALUES (?, ?, ?, ?)",
        [(peer_id, *bounds(n)) for n in nets],
    )


def _backfill_prefixes(conn: sqlite3.Connection) -> None:
    """Migration 3: index the prefixes of the peers already stored (overlaps among them are
    kept: they were accepted before; new peers are checked against them)."""
    for peer_id, ips in conn.execute("SELECT id, allowed_ips FROM peers").fetchall():
        _set_prefixes(conn, int(peer_id), [parse_network(n) for n in ips.split(",") if n])


def _claim_chunk(conn: sqlite3.Connection, keys: Sequence[bytes], gateway_id: str) -> None:
    """claim() for a chunk of keys, inside the caller's write transaction: the keys another
    gateway held go into the change feed (so it drops them), then all are ours. Our own
    claims are left as they are (no write: a restart's reconcile is cheap); keys no longer
    in the store are skipped."""
    marks = _marks(len(keys))
    conn.execute(
        f"INSERT INTO peer_changes (public_key, at) SELECT public_key, {_NOW_SQL}"
        f" FROM peer_claims WHERE public_key IN ({marks}) AND gateway_id <> ?"
        " ORDER BY public_key",
        (*keys, gateway_id),
    )
    conn.execute(
        "INSERT INTO peer_claims (public_key, gateway_id, claimed_at)"
        f" SELECT public_key, ?, ? FROM peers WHERE public_key IN ({marks})"
        " ON CONFLICT (public_key) DO UPDATE SET gateway_id = excluded.gateway_id,"
        " claimed_at = excluded.claimed_at WHERE gateway_id <> excluded.gateway_id",
        (gateway_id, time.time(), *keys),
    )


def _page_where(
    after: str, limit: int, prefix: str, state: str | None, now: float | None
) -> tuple[str, dict[str, Any]]:
    """list_page()'s WHERE clause (name bounds first: an index range) and its parameters."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit {limit} is out of range; use 1-{MAX_PAGE}")
    if state is not None and state not in _STATE_SQL:
        raise ValueError(f"state {state!r} is not one of {', '.join(PEER_STATES)}")
    # one lower bound: the planner seeks with one of two, maybe the looser
    terms = ["name >= :prefix" if prefix > after else "name > :after"]
    params: dict[str, Any] = {"after": after, "prefix": prefix, "limit": limit}
    if prefix:
        bound = prefix_bound(prefix)
        if bound is not None:
            terms.append("name < :bound")
            params["bound"] = bound
    if state is not None:
        terms.append(_STATE_SQL[state])
        if ":now" in _STATE_SQL[state]:
            params["now"] = time.time() if now is None else now
    return " AND ".join(terms), params
