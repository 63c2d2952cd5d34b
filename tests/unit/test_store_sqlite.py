"""Stores: peers, anti-replay marks, change feed and presence on both backends (SQLite and
PostgreSQL); migrations, files and errors of the SQLite backend."""

from __future__ import annotations

import itertools
import sqlite3
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wgjit.addr import IPNetwork, parse_networks
from wgjit.keys import PresharedKey, PrivateKey, PublicKey
from wgjit.store import (
    ChangeFeedExpired,
    DuplicatePeer,
    Handshake,
    InvalidPeerName,
    Store,
    StoreError,
    UnknownPeer,
    open_store,
)
from wgjit.store import sqlite as sqlite_mod
from wgjit.store.postgres import MIGRATIONS as PG_MIGRATIONS
from wgjit.store.postgres import PostgresStore
from wgjit.store.sqlite import LOOKUP_SQL, MIGRATIONS, SQLiteStore, path_from_url

NETS = parse_networks("100.65.0.2/32,fd00:65::2/128")
_free = itertools.count(10)


def ips() -> tuple[IPNetwork, ...]:
    """Prefixes no other peer of the test holds (a store refuses overlapping ones)."""
    n = next(_free)
    return parse_networks(f"100.66.{n // 250}.{n % 250}/32,fd00:66::{n:x}/128")


def tai64n(seconds: int, nanos: int = 0) -> bytes:
    return struct.pack(">QI", 2**62 + seconds, nanos)


def new_key() -> PublicKey:
    return PrivateKey.generate().public_key()


def raw(path: Path) -> sqlite3.Connection:
    """A plain connection, as another process (or an administrator) would have."""
    return sqlite3.connect(path, isolation_level=None, timeout=5)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "peers.db"


@pytest.fixture(params=["sqlite", "postgresql"])
def open_same(request: pytest.FixtureRequest, db: Path) -> Iterator[Callable[[], Store]]:
    """Opens another connection to one store (per test) of each backend, as another process
    (the CLI, a second gateway) would; closes them all afterwards."""
    opened: list[Store] = []
    url = f"sqlite://{db}" if request.param == "sqlite" else request.getfixturevalue("pg_url")

    def make() -> Store:
        s = open_store(url)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(open_same: Callable[[], Store]) -> Store:
    return open_same()


@pytest.fixture
def sqlite_store(db: Path) -> Iterator[SQLiteStore]:
    with SQLiteStore(db) as s:
        yield s


# -- peers ---------------------------------------------------------------------------------------


def test_add_get_lookup_list(store: Store) -> None:
    ka, kb = new_key(), new_key()
    before = time.time()
    a = store.add_peer("alice", ka, NETS)
    store.add_peer("bob", kb, parse_networks("100.65.0.3/32"))
    assert a.name == "alice" and a.public_key == ka and a.allowed_ips == NETS
    assert not a.revoked and a.preshared_key is None
    assert a.last_seen is None and a.handshake_hwm is None
    assert before <= a.created_at == a.updated_at <= time.time()

    assert store.get_peer("alice") == a
    assert store.lookup(ka) == a
    assert store.lookup(new_key()) is None
    assert store.get_peer("carol") is None
    assert [p.name for p in store.list_peers()] == ["alice", "bob"]
    assert store.list_peers()[1].public_key == kb


def test_list_sorted_by_name_and_empty(store: Store) -> None:
    assert store.list_peers() == []
    for name in ["zed", "alice", "mike"]:
        store.add_peer(name, new_key(), ips())
    assert [p.name for p in store.list_peers()] == ["alice", "mike", "zed"]


def test_no_allowed_ips_round_trips(store: Store) -> None:
    k = new_key()
    store.add_peer("empty", k, ())
    peer = store.lookup(k)
    assert peer is not None and peer.allowed_ips == ()


def test_preshared_key_round_trips(store: Store, open_same: Callable[[], Store]) -> None:
    psk = PresharedKey.generate()
    k = new_key()
    store.add_peer("alice", k, ips(), psk)
    with open_same() as other:
        peer = other.lookup(k)
    assert peer is not None and peer.preshared_key == psk
    assert peer.preshared_key.raw == psk.raw


def test_duplicate_name(store: Store) -> None:
    store.add_peer("alice", new_key(), ips())
    cursor = store.change_cursor()
    with pytest.raises(DuplicatePeer, match=r"^peer 'alice' already exists$"):
        store.add_peer("alice", new_key(), ips())
    assert len(store.list_peers()) == 1
    assert store.change_cursor() == cursor  # the failed insert left no trace


def test_duplicate_key(store: Store) -> None:
    k = new_key()
    store.add_peer("bob", k, ips())
    with pytest.raises(DuplicatePeer) as e:
        store.add_peer("alice", k, ips())
    assert str(e.value) == f"public key {k.short()}... is already used by peer 'bob'"
    assert store.get_peer("alice") is None


@pytest.mark.parametrize("name", ["a", "A" * 64, "alice@laptop.example-1_x", "-", "1.2"])
def test_valid_names(store: Store, name: str) -> None:
    assert store.add_peer(name, new_key(), ips()).name == name


@pytest.mark.parametrize(
    "name", ["", "a" * 65, "with space", "tab\t", "new\nline", "sl/ash", "ünï", "a'b", "a,b"]
)
def test_invalid_names(store: Store, name: str) -> None:
    with pytest.raises(InvalidPeerName, match=r"letters, digits, '\.', '_', '@' and '-'"):
        store.add_peer(name, new_key(), ips())
    assert issubclass(InvalidPeerName, StoreError)
    assert store.list_peers() == []


def test_revoke(store: Store) -> None:
    k = new_key()
    added = store.add_peer("alice", k, ips())
    revoked = store.revoke("alice")
    assert revoked.revoked and revoked.updated_at >= added.updated_at
    assert revoked.created_at == added.created_at
    again = store.revoke("alice")  # idempotent
    assert again == revoked
    peer = store.lookup(k)
    assert peer is not None and peer.revoked


def test_revoke_and_remove_unknown(store: Store) -> None:
    with pytest.raises(UnknownPeer, match=r"^no peer named 'ghost'$"):
        store.revoke("ghost")
    with pytest.raises(UnknownPeer, match=r"^no peer named 'ghost'$"):
        store.remove("ghost")
    assert store.change_cursor() == 0


def test_remove(store: Store) -> None:
    k = new_key()
    added = store.add_peer("alice", k, ips())
    assert store.remove("alice") == added
    assert store.lookup(k) is None and store.get_peer("alice") is None
    with pytest.raises(UnknownPeer):
        store.remove("alice")
    store.add_peer("alice", k, ips())  # name and key are free again


def test_lookup_is_an_indexed_point_query(sqlite_store: SQLiteStore, db: Path) -> None:
    plan = " ".join(
        str(row[-1]) for row in raw(db).execute("EXPLAIN QUERY PLAN " + LOOKUP_SQL, (b"x" * 32,))
    )
    assert "SEARCH peers USING INDEX peers_by_key (public_key=?)" in plan


# -- handshakes ----------------------------------------------------------------------------------


def test_advance_handshake_is_monotonic(store: Store) -> None:
    k = new_key()
    store.add_peer("alice", k, ips())
    assert store.advance_handshake(Handshake(k, tai64n(1000, 500), 10.0))
    assert not store.advance_handshake(Handshake(k, tai64n(1000, 500), 11.0))  # equal: replay
    assert not store.advance_handshake(Handshake(k, tai64n(1000, 499), 12.0))  # lower
    assert not store.advance_handshake(Handshake(k, tai64n(999, 10**9 - 1), 12.0))
    peer = store.lookup(k)
    assert peer is not None and peer.handshake_hwm == tai64n(1000, 500) and peer.last_seen == 10.0

    assert store.advance_handshake(Handshake(k, tai64n(1000, 501), 13.0))  # higher
    assert store.advance_handshake(Handshake(k, tai64n(1001, 0), 14.0))
    peer = store.lookup(k)
    assert peer is not None and peer.handshake_hwm == tai64n(1001, 0) and peer.last_seen == 14.0
    assert peer.updated_at == peer.created_at  # bookkeeping is not an administrative change


def test_advance_handshake_unknown_key_and_bad_timestamp(store: Store) -> None:
    assert not store.advance_handshake(Handshake(new_key(), tai64n(1), 1.0))
    k = new_key()
    store.add_peer("alice", k, ips())
    with pytest.raises(ValueError, match="12 bytes"):
        store.advance_handshake(Handshake(k, b"short", 1.0))


def test_advance_handshake_is_atomic_across_threads_and_connections(
    open_same: Callable[[], Store],
) -> None:
    k = new_key()
    stores = [open_same(), open_same()]
    stores[0].add_peer("alice", k, ips())
    wins: list[int] = []
    lock = threading.Lock()

    def race(s: Store) -> None:
        for t in range(200):
            if s.advance_handshake(Handshake(k, tai64n(t), float(t))):
                with lock:
                    wins.append(t)

    threads = [threading.Thread(target=race, args=(stores[i % 2],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert len(wins) == len(set(wins))  # no timestamp accepted twice
    assert max(wins) == 199


def test_record_handshakes_batch(store: Store) -> None:
    ka, kb, kc = new_key(), new_key(), new_key()
    store.add_peer("a", ka, ips())
    store.add_peer("b", kb, ips())
    store.add_peer("c", kc, ips())
    assert store.advance_handshake(Handshake(kc, tai64n(500), 5.0))
    cursor = store.change_cursor()
    store.record_handshakes(
        h
        for h in [
            Handshake(ka, tai64n(100), 1.0),
            Handshake(kb, tai64n(200), 2.0),
            Handshake(ka, tai64n(300), 3.0),
            Handshake(ka, tai64n(250), 4.0),  # lower than the one before: ignored
            Handshake(kc, tai64n(400), 6.0),  # lower than the stored mark: ignored
            Handshake(new_key(), tai64n(1), 7.0),  # unknown key: ignored
        ]
    )
    store.record_handshakes([])
    marks = {p.name: (p.handshake_hwm, p.last_seen) for p in store.list_peers()}
    assert marks == {
        "a": (tai64n(300), 3.0),
        "b": (tai64n(200), 2.0),
        "c": (tai64n(500), 5.0),
    }
    assert store.changes_since(cursor) == ([], cursor)


# -- change feed ---------------------------------------------------------------------------------


def test_change_feed(store: Store) -> None:
    assert store.change_cursor() == 0
    assert store.changes_since(0) == ([], 0)
    ka, kb = new_key(), new_key()

    store.add_peer("alice", ka, NETS)
    keys, c1 = store.changes_since(0)
    assert keys == [ka] and c1 == store.change_cursor() > 0
    assert store.changes_since(c1) == ([], c1)

    store.add_peer("bob", kb, ips())
    store.revoke("alice")
    keys, c2 = store.changes_since(c1)
    assert keys == [kb, ka] and c2 > c1

    store.revoke("alice")  # already revoked: nothing changed
    store.advance_handshake(Handshake(kb, tai64n(5), 1.0))
    store.record_handshakes([Handshake(kb, tai64n(6), 2.0)])
    assert store.changes_since(c2) == ([], c2)

    store.remove("bob")
    keys, c3 = store.changes_since(c2)
    assert keys == [kb] and c3 > c2

    # deduplicated, ordered by latest change; an old cursor sees everything since then
    keys, c = store.changes_since(0)
    assert sorted(k.raw for k in keys) == sorted([ka.raw, kb.raw]) and c == c3
    assert keys == [ka, kb]


def test_change_feed_direct_updates(sqlite_store: SQLiteStore, db: Path) -> None:
    """Triggers, not the Python code, feed the feed: edits by other tools are seen too."""
    k, k2 = new_key(), new_key()
    sqlite_store.add_peer("alice", k, ips())
    c = sqlite_store.change_cursor()
    conn = raw(db)
    conn.execute("UPDATE peers SET last_seen = 5, handshake_hwm = zeroblob(12)")
    assert sqlite_store.changes_since(c) == ([], c)
    conn.execute("UPDATE peers SET allowed_ips = '10.0.0.0/8'")
    keys, c = sqlite_store.changes_since(c)
    assert keys == [k]
    conn.execute("UPDATE peers SET allowed_ips = '10.0.0.0/8'")  # same value: no change
    assert sqlite_store.changes_since(c) == ([], c)
    conn.execute("UPDATE peers SET public_key = ?", (k2.raw,))  # both keys are affected
    keys, c = sqlite_store.changes_since(c)
    assert set(keys) == {k, k2}


def test_change_feed_pruning(sqlite_store: SQLiteStore, db: Path) -> None:
    for i in range(3):
        sqlite_store.add_peer(f"p{i}", new_key(), ips())
    stale = sqlite_store.change_cursor() - 2  # a reader that saw only the first change
    conn = raw(db)
    conn.execute("UPDATE peer_changes SET at = at - 2 * 86400")  # age them past retention
    current = sqlite_store.change_cursor()
    k = new_key()
    sqlite_store.add_peer("fresh", k, ips())  # a write prunes opportunistically
    assert conn.execute("SELECT count(*) FROM peer_changes").fetchone()[0] == 1
    # a reader that keeps up misses nothing; the cursor never goes back
    assert sqlite_store.changes_since(current) == ([k], current + 1)
    assert sqlite_store.change_cursor() == current + 1
    # a reader a day behind is told, not silently fed an incomplete list
    with pytest.raises(ChangeFeedExpired, match="pruned"):
        sqlite_store.changes_since(stale)
    with pytest.raises(ChangeFeedExpired, match="ahead"):
        sqlite_store.changes_since(current + 5)


def test_pruning_keeps_recent_entries(sqlite_store: SQLiteStore, db: Path) -> None:
    sqlite_store.add_peer("old", new_key(), ips())
    sqlite_store.add_peer("recent", new_key(), ips())
    conn = raw(db)
    conn.execute("UPDATE peer_changes SET at = at - 2 * 86400 WHERE seq = 1")
    # a clock step back: a later entry looks old, but it follows a recent one, so it stays
    sqlite_store.add_peer("clock-stepped", new_key(), ips())
    conn.execute("UPDATE peer_changes SET at = at - 2 * 86400 WHERE seq = 3")
    sqlite_store.revoke("old")
    seqs = [r[0] for r in conn.execute("SELECT seq FROM peer_changes ORDER BY seq")]
    assert seqs == [2, 3, 4]
    keys, _ = sqlite_store.changes_since(1)
    assert len(keys) == 3


def test_two_stores_see_each_others_writes(open_same: Callable[[], Store]) -> None:
    """The CLI and a running gateway: separate connections to one store."""
    with open_same() as gateway, open_same() as cli:
        cursor = gateway.change_cursor()
        k = new_key()
        cli.add_peer("alice", k, ips())
        peer = gateway.lookup(k)
        assert peer is not None and peer.name == "alice"
        keys, cursor = gateway.changes_since(cursor)
        assert keys == [k]
        assert gateway.advance_handshake(Handshake(k, tai64n(10), 1.0))
        cli_view = cli.get_peer("alice")
        assert cli_view is not None and cli_view.handshake_hwm == tai64n(10)
        cli.revoke("alice")
        keys, cursor = gateway.changes_since(cursor)
        assert keys == [k]
        peer = gateway.lookup(k)
        assert peer is not None and peer.revoked


def test_open_store_urls(tmp_path: Path) -> None:
    with open_store(f"sqlite://{tmp_path}/a.db") as s:
        s.add_peer("alice", new_key(), ips())
    with open_store(str(tmp_path / "a.db")) as s:
        assert [p.name for p in s.list_peers()] == ["alice"]
    with pytest.raises(StoreError, match=r"cannot reach the database .*check the server") as e:
        open_store("postgres:///wgjit?host=/nonexistent-socket-dir&password=hunter2")
    assert "hunter2" not in str(e.value) and "\n" not in str(e.value)


def test_postgres_url_schemes(pg_url: str) -> None:
    with open_store(pg_url.replace("postgresql://", "postgres://", 1)) as s:
        s.add_peer("alice", new_key(), ips())
    with open_store(pg_url) as s:
        assert [p.name for p in s.list_peers()] == ["alice"]
        assert isinstance(s, PostgresStore) and s.schema_version == len(PG_MIGRATIONS)


# -- URLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///var/lib/wgjit/peers.db", "/var/lib/wgjit/peers.db"),
        ("sqlite:////var/lib/wgjit/peers.db", "/var/lib/wgjit/peers.db"),
        ("sqlite:peers.db", "peers.db"),
        ("sqlite:data/peers.db", "data/peers.db"),
        ("sqlite:/abs/peers.db", "/abs/peers.db"),
        ("/var/lib/wgjit/peers.db", "/var/lib/wgjit/peers.db"),
        ("peers.db", "peers.db"),
        ("  ./peers.db\n", "peers.db"),
    ],
)
def test_path_from_url(url: str, path: str) -> None:
    assert path_from_url(url) == Path(path)


def test_path_from_url_expands_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/op")
    assert path_from_url("sqlite:~/peers.db") == Path("/home/op/peers.db")


@pytest.mark.parametrize(
    "url",
    [
        "",
        "sqlite:",
        "sqlite://",
        "sqlite://peers.db",
        "sqlite:///",
        "sqlite:///x.db?mode=ro",
        "mysql://db/wgjit",
        "postgresql://db/wgjit",
        "file:///x.db",
    ],
)
def test_path_from_url_refuses(url: str) -> None:
    with pytest.raises(StoreError) as e:
        path_from_url(url)
    msg = str(e.value)
    assert repr(url) in msg and "sqlite:///ABSOLUTE/PATH.db" in msg and "\n" not in msg


# -- files, schema, errors -----------------------------------------------------------------------


def test_file_and_directory_modes(db: Path, sqlite_store: SQLiteStore) -> None:
    sqlite_store.add_peer("alice", new_key(), ips(), PresharedKey.generate())
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    for side in db.parent.iterdir():  # -wal and -shm hold the same secrets
        assert stat.S_IMODE(side.stat().st_mode) == 0o600, side


@pytest.mark.parametrize("create", [True, False])
def test_existing_files_are_tightened_on_open(db: Path, create: bool) -> None:
    with SQLiteStore(db) as first:  # kept open: the -wal and -shm files exist meanwhile
        first.add_peer("alice", new_key(), ips(), PresharedKey.generate())
        files = [db, *db.parent.glob("peers.db-*")]
        assert len(files) == 3
        for f in files:
            f.chmod(0o644)
        with SQLiteStore(db, create=create) as s:
            assert s.list_peers()[0].name == "alice"
            for f in files:
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_store_that_cannot_be_tightened_is_refused(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    SQLiteStore(db).close()
    db.chmod(0o640)

    def denied(path: object, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(sqlite_mod.os, "chmod", denied)
    with pytest.raises(StoreError) as e:
        SQLiteStore(db)
    assert f"store file {db} is readable by other users (mode 0640)" in str(e.value)
    assert f"run `chmod 600 {db}` as its owner" in str(e.value)


def test_pragmas(sqlite_store: SQLiteStore, db: Path) -> None:
    conn = sqlite_store._conn
    assert conn is not None
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert raw(db).execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_unwritable_location(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    target = blocker / "sub" / "peers.db"
    with pytest.raises(StoreError) as e:
        SQLiteStore(target)
    assert str(e.value) == (
        f"store {target} is not writable: {blocker} is not a directory;"
        " choose another with --store or WGJIT_STORE"
    )
    with pytest.raises(StoreError, match="is not writable"):
        open_store(f"sqlite://{blocker}/peers.db")


def test_directory_as_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory"):
        SQLiteStore(tmp_path)


def test_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:rel/peers.db") as s:
        assert isinstance(s, SQLiteStore) and s.path == tmp_path / "rel" / "peers.db"
    assert (tmp_path / "rel" / "peers.db").is_file()


def test_migrates_an_empty_database(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    conn = raw(empty)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    with SQLiteStore(empty) as s:
        s.add_peer("alice", new_key(), ips())
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) >= 1
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"peers", "peer_changes"} <= tables


def test_upgrade_runs_new_steps_in_one_transaction(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    SQLiteStore(db).close()
    v = len(MIGRATIONS)
    conn = raw(db)
    # a failing step leaves the database exactly as it was
    broken = [*MIGRATIONS, ("ALTER TABLE peers ADD COLUMN note TEXT", "THIS IS NOT SQL")]
    monkeypatch.setattr(sqlite_mod, "MIGRATIONS", broken)
    with pytest.raises(StoreError, match=f"upgrade its schema from version {v} to {v + 1}"):
        SQLiteStore(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == v
    assert "note" not in {r[1] for r in conn.execute("PRAGMA table_info(peers)")}

    good = [*MIGRATIONS, ("ALTER TABLE peers ADD COLUMN note TEXT",)]
    monkeypatch.setattr(sqlite_mod, "MIGRATIONS", good)
    with SQLiteStore(db) as s:
        s.add_peer("alice", new_key(), ips())
    assert conn.execute("PRAGMA user_version").fetchone()[0] == v + 1
    assert "note" in {r[1] for r in conn.execute("PRAGMA table_info(peers)")}


def test_refuses_a_newer_schema(db: Path) -> None:
    SQLiteStore(db).close()
    raw(db).execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="created by a newer wgjit"):
        SQLiteStore(db)


def test_refuses_foreign_databases(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    raw(other).execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(StoreError, match=r"other tables \(invoices\), not a wgjit store"):
        SQLiteStore(other)
    assert raw(other).execute("PRAGMA user_version").fetchone()[0] == 0

    app = tmp_path / "app.db"
    raw(app).execute("PRAGMA application_id = 1234")
    with pytest.raises(StoreError, match="another application"):
        SQLiteStore(app)


def test_corrupted_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an sqlite database, not at all" * 100)
    with pytest.raises(StoreError, match="is damaged or not a wgjit store") as e:
        SQLiteStore(junk)
    assert "\n" not in str(e.value)


def test_busy_database(db: Path) -> None:
    with SQLiteStore(db, busy_timeout=0.1) as s:
        k = new_key()
        s.add_peer("alice", k, ips())
        holder = raw(db)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            with pytest.raises(StoreError, match="is busy: another process kept it locked"):
                s.add_peer("bob", new_key(), ips())
            with pytest.raises(StoreError, match="is busy"):
                s.advance_handshake(Handshake(k, tai64n(1), 1.0))
            assert s.lookup(k) is not None  # readers are not blocked (WAL)
            assert s.changes_since(0)[0] == [k]
        finally:
            holder.execute("ROLLBACK")
        s.add_peer("bob", new_key(), ips())  # and the store is usable again


def test_disk_full(sqlite_store: SQLiteStore) -> None:
    conn = sqlite_store._conn
    assert conn is not None
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreError, match="disk full"):
        for i in range(1000):
            sqlite_store.add_peer(f"p{i}", new_key(), ips(), PresharedKey.generate())
    assert not conn.in_transaction


def test_closed_store_and_context_manager(db: Path) -> None:
    with SQLiteStore(db) as s:
        pass
    with pytest.raises(StoreError, match="is closed"):
        s.list_peers()
    s.close()  # idempotent


def test_threads_share_one_store(store: Store) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(25):
                k = new_key()
                store.add_peer(f"t{n}-{i}", k, ips())
                assert store.lookup(k) is not None
                store.advance_handshake(Handshake(k, tai64n(i), 1.0))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.list_peers()) == 200
    assert len(store.changes_since(0)[0]) == 200


def test_sqlite_threads_wait_boundedly(db: Path) -> None:
    """A write stuck on another process's lock holds the writer connection: the other threads'
    writes wait at most busy_timeout for it, and their reads do not wait at all."""
    with SQLiteStore(db, busy_timeout=0.5) as s:
        k = new_key()
        s.add_peer("alice", k, NETS)
        other = raw(db)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock

        def write() -> None:
            with pytest.raises(StoreError, match="is busy"):
                s.add_peer("b", new_key(), ips())

        stuck = threading.Thread(target=write)
        stuck.start()
        time.sleep(0.1)  # the writer connection is now busy waiting
        t0 = time.monotonic()
        assert s.lookup(k) is not None and s.lookup_many([k]) != {}
        assert s.changes_since(0)[0] == [k]
        assert time.monotonic() - t0 < 0.2  # reads went past the stuck write
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="is busy"):
            s.advance_handshake(Handshake(k, tai64n(1), 1.0))
        assert time.monotonic() - t0 < 1.5
        stuck.join()
        other.execute("ROLLBACK")
        assert s.advance_handshake(Handshake(k, tai64n(1), 1.0))


# -- presence ------------------------------------------------------------------------------------


def test_claim_moves_and_is_announced(store: Store, open_same: Callable[[], Store]) -> None:
    k, other = new_key(), new_key()
    store.add_peer("alice", k, ips())
    store.add_peer("bob", other, ips())
    a, b = store, open_same()  # two gateways
    a.heartbeat("gw-a")
    b.heartbeat("gw-b")
    cursor = a.change_cursor()
    assert a.claim(k, "gw-a") is None
    assert a.claim(k, "gw-a") is None  # again: nothing moves
    peer = b.lookup(k)
    assert peer is not None and peer.holder == "gw-a"
    assert a.changes_since(cursor) == ([], cursor)  # a first claim concerns nobody else
    assert b.claim(k, "gw-b") == "gw-a"
    keys, cursor = a.changes_since(cursor)
    assert keys == [k]  # gw-a learns through the feed ...
    peer = a.lookup(k)
    assert peer is not None and peer.holder == "gw-b"  # ... that gw-b holds it now
    a.release([k, other], "gw-a")  # not ours any more: gw-b's claim stays
    peer = a.lookup(k)
    assert peer is not None and peer.holder == "gw-b"
    b.release([k], "gw-b")
    peer = a.lookup(k)
    assert peer is not None and peer.holder is None
    assert a.changes_since(cursor) == ([], cursor)  # releases are not announced
    with pytest.raises(UnknownPeer):
        a.claim(new_key(), "gw-a")
    a.claim(k, "gw-a")
    a.remove("alice")  # the claim goes with the peer
    a.add_peer("alice", k, ips())
    peer = a.lookup(k)
    assert peer is not None and peer.holder is None


def test_dead_gateways_claims_expire(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from wgjit.store import postgres as pg_mod

    k = new_key()
    store.add_peer("alice", k, ips())
    store.heartbeat("gw-a")
    store.claim(k, "gw-a")
    store.heartbeat("gw-b")
    peer = store.lookup(k)
    assert peer is not None and peer.holder == "gw-a"  # alive
    for mod in (sqlite_mod, pg_mod):
        monkeypatch.setattr(mod, "PRESENCE_TTL_S", 0.05)
    deadline = time.monotonic() + 5
    while True:  # gw-a has stopped beating; gw-b's heartbeats expire it
        store.heartbeat("gw-b")
        peer = store.lookup(k)
        assert peer is not None
        if peer.holder is None:
            break
        assert time.monotonic() < deadline, "gw-a's claim never expired"
        time.sleep(0.02)


# -- many keys at once (a gateway's reconcile) ----------------------------------------------------


def test_lookup_many(store: Store) -> None:
    from wgjit.store import MANY_CHUNK, Peer

    n = MANY_CHUNK * 2 + 500  # three chunks
    keys = [new_key() for _ in range(n)]
    assert store.import_peers([Peer(f"m{i:05d}", k, ips()) for i, k in enumerate(keys)]).added == n
    store.heartbeat("gw-a")
    store.claim(keys[7], "gw-a")
    store.revoke("m00009")
    store.update_peer("m00011", disabled=True, expires_at=1234.5)  # lifecycle columns too
    absent = [new_key() for _ in range(300)]
    asked = keys + absent + keys[:50]  # unknown keys and duplicates mixed in
    found = store.lookup_many(asked)
    assert set(found) == set(keys)
    for k in (keys[0], keys[7], keys[9], keys[11], keys[MANY_CHUNK], keys[-1]):
        assert found[k] == store.lookup(k)  # the same Peer, holder and revoked flag included
    assert found[keys[7]].holder == "gw-a" and found[keys[9]].revoked
    assert found[keys[11]].disabled and found[keys[11]].expires_at == 1234.5
    assert found[keys[11]].refusal(0.0) == "disabled" and found[keys[0]].refusal(0.0) is None
    assert store.lookup_many(absent) == {}
    assert store.lookup_many([]) == {}
    assert store.lookup_many(iter_keys := tuple(keys[:3])) == {k: found[k] for k in iter_keys}


def test_claim_many_takes_over_and_is_announced(
    store: Store, open_same: Callable[[], Store]
) -> None:
    from wgjit.store import MANY_CHUNK, Peer

    n = MANY_CHUNK + 700  # two chunks
    keys = [new_key() for _ in range(n)]
    store.import_peers([Peer(f"c{i:05d}", k, ips()) for i, k in enumerate(keys)])
    a, b = store, open_same()  # two gateways
    a.heartbeat("gw-a")
    b.heartbeat("gw-b")
    held_by_a = keys[::3]  # in both chunks
    a.claim(held_by_a[0], "gw-a")
    a.claim_many(held_by_a, "gw-a")
    mine = keys[1:40:3]
    b.claim_many(mine, "gw-b")
    cursor = a.change_cursor()
    gone = new_key()
    a.add_peer("gone", gone, ips())
    a.remove("gone")
    cursor = a.change_cursor()
    # gw-b adopts every peer: a's, its own, unclaimed ones, and a key no longer in the store
    b.claim_many([*keys, gone, keys[0]], "gw-b")
    changed, cursor = a.changes_since(cursor)
    assert sorted(k.raw for k in changed) == sorted(k.raw for k in held_by_a)  # a learns ...
    found = a.lookup_many(keys)
    assert {p.holder for p in found.values()} == {"gw-b"}  # ... that b holds them now
    assert a.lookup(gone) is None
    b.claim_many(keys, "gw-b")  # again: nothing moves, nothing announced
    assert a.changes_since(cursor) == ([], cursor)
    b.claim_many([], "gw-b")
    a.claim(keys[0], "gw-a")  # claim() and claim_many() announce alike
    assert b.changes_since(cursor)[0] == [keys[0]]


def test_two_threads_at_once(open_same: Callable[[], Store]) -> None:
    """A gateway's workers: reconcile (lookup_many, claim_many) beside the knock path (lookup,
    advance_handshake), the change feed and presence, all on one store object."""
    from wgjit.store import Peer

    store, admin = open_same(), open_same()
    keys = [new_key() for _ in range(3000)]
    admin.import_peers([Peer(f"w{i:05d}", k, ips()) for i, k in enumerate(keys)])
    cursor = store.change_cursor()
    start = threading.Barrier(3)
    errors: list[BaseException] = []
    fds: list[int | None] = []

    def reconcile() -> None:
        start.wait()
        for _ in range(3):
            assert len(store.lookup_many(keys)) == len(keys)
            store.claim_many(keys, "gw-a")
            fds.append(store.wakeup_fd())

    def knocks(part: list[PublicKey]) -> Callable[[], None]:
        def run() -> None:
            start.wait()
            for i, k in enumerate(part):
                assert store.lookup(k) is not None
                assert store.advance_handshake(Handshake(k, tai64n(i + 1), 1.0))
                if i % 50 == 0:
                    store.changes_since(cursor)
                    store.heartbeat("gw-a")
                    fds.append(store.wakeup_fd())

        return run

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        return run

    jobs = (reconcile, knocks(keys[:300]), knocks(keys[300:600]))
    threads = [threading.Thread(target=guarded(f)) for f in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert {p.holder for p in store.lookup_many(keys).values()} == {"gw-a"}
    assert len(set(fds)) == 1  # one wake-up fd for the life of the store (None for SQLite)


@pytest.mark.parametrize("call", ["advance_handshake", "claim", "claim_many"])
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_held_row_lock_costs_a_call_its_timeout(
    request: pytest.FixtureRequest, db: Path, backend: str, call: str
) -> None:
    """Another session (an operator's psql, an import) holds a peer's row: the call fails after
    the lock timeout (1 s) instead of hanging; reads go on; once the lock is gone, so is the
    error. SQLite locks the whole file for a writer, so there it is its busy timeout."""
    import psycopg

    k = new_key()
    holder: psycopg.Connection[tuple[object, ...]] | sqlite3.Connection
    if backend == "postgresql":
        url = request.getfixturevalue("pg_url")
        store: Store = open_store(url)
        store.add_peer("alice", k, NETS)
        holder = psycopg.connect(url)  # a transaction stays open
        holder.execute("SELECT * FROM peers WHERE public_key = %s FOR UPDATE", (k.raw,))
    else:
        store = SQLiteStore(db, busy_timeout=1.0)
        store.add_peer("alice", k, NETS)
        holder = raw(db)
        holder.execute("BEGIN IMMEDIATE")
    run: Callable[[], object] = {
        "advance_handshake": lambda: store.advance_handshake(Handshake(k, tai64n(1), 1.0)),
        "claim": lambda: store.claim(k, "gw-a"),
        "claim_many": lambda: store.claim_many([k], "gw-a"),
    }[call]
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=r"stayed locked by another session|is busy") as e:
            run()
        took = time.monotonic() - t0
        assert 0.8 < took < 2.0, took
        assert "\n" not in str(e.value)
        assert store.lookup(k) is not None  # readers are not blocked
        holder.rollback()
        run()
        peer = store.lookup(k)
        assert peer is not None
        assert peer.handshake_hwm == tai64n(1) or peer.holder == "gw-a"
    finally:
        holder.close()
        store.close()


def test_postgres_url_overrides_the_timeouts(pg_url: str) -> None:
    import psycopg

    def show(s: PostgresStore, name: str) -> str:
        return str(s._run("show", lambda c: c.execute(f"SHOW {name}").fetchone()[0]))  # type: ignore[index]

    with open_store(pg_url) as s:
        assert isinstance(s, PostgresStore)
        assert (s.connect_timeout, s.statement_timeout, s.lock_timeout) == (5, 5, 1)
        assert (show(s, "lock_timeout"), show(s, "statement_timeout")) == ("1s", "5s")
        assert s.answer_timeout == 6
        for part in ("keepalives=1", "keepalives_idle=10", "tcp_user_timeout=10000"):
            assert part in s._conninfo

    url = f"{pg_url}&lock_timeout=200ms&statement_timeout=0.5s&connect_timeout=3&keepalives_idle=30"
    k = new_key()
    with open_store(url) as s:
        assert isinstance(s, PostgresStore)
        assert (s.connect_timeout, s.statement_timeout, s.lock_timeout) == (3, 0.5, 0.2)
        assert (show(s, "lock_timeout"), show(s, "statement_timeout")) == ("200ms", "500ms")
        assert "keepalives_idle=30" in s._conninfo and "connect_timeout=3" in s._conninfo
        s.add_peer("alice", k, NETS)
        with psycopg.connect(pg_url) as holder:
            holder.execute("SELECT 1 FROM peers FOR UPDATE")
            t0 = time.monotonic()
            with pytest.raises(StoreError, match=r"locked by another session for over 0.2 s"):
                s.advance_handshake(Handshake(k, tai64n(1), 1.0))
            assert time.monotonic() - t0 < 0.9
        with pytest.raises(StoreError, match=r"took over 0.5 s \(statement_timeout"):
            s._run("sleep", lambda c: c.execute("SELECT pg_sleep(2)"))
        assert s.lookup(k) is not None  # the connection is fine afterwards

    # libpq's own `options` count too; a URL parameter wins over them
    opts = "options=-c%20lock_timeout%3D3s%20-c%20statement_timeout%3D7s"
    with open_store(f"{pg_url}&{opts}&statement_timeout=8s") as s:
        assert isinstance(s, PostgresStore)
        assert (s.statement_timeout, s.lock_timeout) == (8, 3)
        assert (show(s, "lock_timeout"), show(s, "statement_timeout")) == ("3s", "8s")
    with open_store(f"{pg_url}&statement_timeout=0") as s:  # no limit, no answer deadline
        assert isinstance(s, PostgresStore) and s.answer_timeout is None
        assert show(s, "statement_timeout") == "0"

    secret = pg_url.replace("postgresql:///", "postgresql://wgjit:hunter2@/", 1)
    for bad in (f"{secret}&lock_timeout=soon", f"{secret}&bogus=1"):
        with pytest.raises(StoreError) as e:
            open_store(bad)
        assert "hunter2" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(StoreError, match="invalid lock_timeout 'soon'"):
        open_store(f"{pg_url}&lock_timeout=soon")


# -- bulk ----------------------------------------------------------------------------------------


def test_import_peers_is_idempotent(store: Store) -> None:
    from wgjit.store import Peer

    keys = [new_key() for _ in range(5)]
    nets = [ips() for _ in range(5)]
    batch = [Peer(f"p{i}", keys[i], nets[i]) for i in range(5)]
    store.add_peer("taken", keys[4], ips())  # p4's key belongs to another peer
    cursor = store.change_cursor()
    res = store.import_peers(batch)
    assert (res.added, res.updated, res.unchanged) == (4, 0, 0)
    assert res.rejected == [(4, "public key is already used by peer 'taken'")]
    assert {p.name for p in store.list_peers()} == {"p0", "p1", "p2", "p3", "taken"}
    keys_changed, cursor = store.changes_since(cursor)
    assert set(keys_changed) == set(keys[:4])
    res = store.import_peers(batch[:4])  # re-run: nothing changes, nothing announced
    assert (res.added, res.updated, res.unchanged, res.rejected) == (0, 0, 4, [])
    assert store.changes_since(cursor) == ([], cursor)
    psk = PresharedKey.generate()
    changed = [
        Peer("p0", keys[0], parse_networks("10.0.0.1/32"), psk),
        Peer("p1", keys[1], nets[1], revoked=True),
        Peer("p2", new_key(), nets[2]),  # same name, another key: refused
        Peer("p3", keys[3], nets[3]),
    ]
    res = store.import_peers(changed)
    assert (res.added, res.updated, res.unchanged) == (0, 2, 1)
    assert res.rejected == [(2, "a peer with this name exists with another public key")]
    p0, p1 = store.get_peer("p0"), store.get_peer("p1")
    assert p0 is not None and p0.preshared_key == psk and str(p0.allowed_ips[0]) == "10.0.0.1/32"
    assert p1 is not None and p1.revoked
    keys_changed, cursor = store.changes_since(cursor)
    assert set(keys_changed) == {keys[0], keys[1]}
    assert store.import_peers([]).added == 0
    # the first file again: p1 stays revoked (an import never reinstates), p0 goes back
    res = store.import_peers(batch[:2])
    assert (res.added, res.updated, res.unchanged) == (0, 1, 1)
    p0, p1 = store.get_peer("p0"), store.get_peer("p1")
    assert p0 is not None and p0.preshared_key is None and p0.allowed_ips == nets[0]
    assert p1 is not None and p1.revoked


def test_iter_peers_streams_in_name_order(store: Store) -> None:
    from wgjit.store import Peer

    batch = [Peer(f"n{i:05d}", new_key(), ips()) for i in range(12345)]
    assert store.import_peers(batch[::-1]).added == len(batch)
    names = [p.name for p in store.iter_peers()]
    assert names == [p.name for p in batch]


# -- PostgreSQL specifics ------------------------------------------------------------------------


def test_postgres_wakeup_fd_and_feed(pg_url: str) -> None:
    import select

    with open_store(pg_url) as gw, open_store(pg_url) as cli:
        fd = gw.wakeup_fd()
        assert fd is not None
        cursor = gw.change_cursor()
        assert select.select([fd], [], [], 0)[0] == []
        k = new_key()
        cli.add_peer("alice", k, ips())
        assert select.select([fd], [], [], 5)[0] == [fd]  # woken by NOTIFY
        keys, cursor = gw.changes_since(cursor)  # drains the wake-up
        assert keys == [k]
        assert gw.wakeup_fd() == fd
        assert select.select([fd], [], [], 0)[0] == []


def test_postgres_feed_pruning_is_detected(pg_url: str) -> None:
    import psycopg

    with open_store(pg_url) as s:
        for i in range(3):
            s.add_peer(f"p{i}", new_key(), ips())
        stale = s.change_cursor() - 2
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("UPDATE peer_changes SET at = at - 2 * 86400")
        current = s.change_cursor()
        k = new_key()
        s.add_peer("fresh", k, ips())
        assert s.changes_since(current) == ([k], current + 1)
        with pytest.raises(ChangeFeedExpired, match="pruned"):
            s.changes_since(stale)
        with pytest.raises(ChangeFeedExpired, match="ahead"):
            s.changes_since(current + 5)


def test_postgres_survives_a_server_restart() -> None:
    import select

    from tests.pgserver import PostgresServer
    from wgjit.store import postgres as pg_mod

    with PostgresServer() as srv:
        url = srv.create_database("restart")
        with open_store(url) as gw, open_store(url) as cli:
            k = new_key()
            cli.add_peer("alice", k, ips())
            cursor = gw.change_cursor()
            assert gw.wakeup_fd() is not None
            srv.restart()
            cli.revoke("alice")  # the pool replaces its dead connection
            # the listener died with the server: the feed itself still has the change
            keys, cursor = gw.changes_since(cursor)
            assert keys == [k]
            peer = gw.lookup(k)
            assert peer is not None and peer.revoked
            deadline = time.monotonic() + 5
            while (fd := gw.wakeup_fd()) is None:  # reconnects (at most once a second)
                assert time.monotonic() < deadline, "LISTEN connection never came back"
                time.sleep(0.05)
            cli.remove("alice")
            assert select.select([fd], [], [], 5)[0] == [fd]
            assert gw.changes_since(cursor)[0] == [k]
        with open_store(url) as s:
            srv.stop()
            # while the server is down a call waits for a connection at most POOL_WAIT_S, and
            # the calls right after fail at once: a gateway's loop never stalls for long
            t0 = time.monotonic()
            with pytest.raises(StoreError, match="no connection to the database"):
                s.lookup(new_key())
            assert time.monotonic() - t0 < pg_mod.POOL_WAIT_S + 1
            t0 = time.monotonic()
            with pytest.raises(StoreError, match="unreachable"):
                s.lookup(new_key())
            assert time.monotonic() - t0 < 0.1
            with pytest.raises(StoreError, match="cannot reach the database"):
                open_store(url)
            srv.start()
            deadline = time.monotonic() + 15
            while True:  # and once it is back, so is the store
                try:
                    assert s.lookup(new_key()) is None
                    break
                except StoreError:
                    assert time.monotonic() < deadline, "the store never reconnected"
                    time.sleep(0.1)


def test_create_false_never_creates(open_same: Callable[[], Store], tmp_path: Path,
                                    request: pytest.FixtureRequest) -> None:  # fmt: skip
    missing = tmp_path / "nope" / "peers.db"
    with pytest.raises(StoreError, match="does not exist; create it with `wgjit store init"):
        open_store(str(missing), create=False)
    assert not missing.parent.exists()
    url = f"sqlite://{tmp_path}/empty.db"
    if "postgresql" in request.node.callspec.id:
        url = request.getfixturevalue("pg_url")  # a fresh, empty database
    else:
        (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(StoreError, match="wgjit store init"):
        open_store(url, create=False)
    with pytest.raises(StoreError, match="wgjit store init"):  # and the failed open left nothing
        open_store(url, create=False)
    open_store(url).close()  # create=True (the default) initialises it
    with open_store(url, create=False) as s:
        assert s.list_peers() == []


def _cluster_pids(srv: object) -> list[int]:
    """The postmaster of a PostgresServer and its children (backends, background workers)."""
    data = Path(str(getattr(srv, "data")))  # noqa: B009 - any server object with a data dir
    main = int((data / "postmaster.pid").read_text().split()[0])
    pids = [main]
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == main:
            pids.append(int(stat_file.parent.name))
    return pids


def test_postgres_frozen_server_costs_a_call_its_answer_deadline() -> None:
    """A server that stops answering (SIGSTOP; over TCP also a black-holed network) cannot
    enforce statement_timeout: the client cuts the call at statement_timeout + 1 s, the calls
    of the next second fail at once, and once the server answers again so does the store."""
    import os
    import select
    import signal

    from tests.pgserver import PostgresServer

    with PostgresServer() as srv:
        url = srv.create_database("frozen")
        with open_store(f"{url}&statement_timeout=500ms") as s:
            k = new_key()
            s.add_peer("alice", k, NETS)
            fd = s.wakeup_fd()
            assert fd is not None
            s.changes_since(0)
            pids = _cluster_pids(srv)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                with pytest.raises(StoreError, match=r"no answer from the database within 1.5 s"):
                    s.lookup(k)
                assert 1.4 < time.monotonic() - t0 < 2.5
                t0 = time.monotonic()
                with pytest.raises(StoreError, match="unreachable"):
                    s.advance_handshake(Handshake(k, tai64n(1), 1.0))
                assert time.monotonic() - t0 < 0.1
                time.sleep(1.0)  # past the fail-fast second: each call waits again, bounded
                t0 = time.monotonic()
                with pytest.raises(StoreError):
                    s.lookup_many([k])
                assert time.monotonic() - t0 < 2.5
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert s.advance_handshake(Handshake(k, tai64n(1), 1.0))
                    break
                except StoreError:
                    assert time.monotonic() < deadline, "the store never recovered"
                    time.sleep(0.1)
            assert s.wakeup_fd() == fd  # the LISTEN connection lived through the freeze
            s.revoke("alice")
            assert select.select([fd], [], [], 5)[0] == [fd]
            assert s.changes_since(1)[0] == [k]
