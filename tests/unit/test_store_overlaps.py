"""Allowed IPs and keys a store refuses, on both backends: overlaps with other peers (found by
index seeks, not scans), special-purpose ranges, low-order keys; `allow_overlap`; imports."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgjit.addr import parse_networks
from wgjit.keys import InvalidKey, PrivateKey, PublicKey
from wgjit.store import Peer, PeerRefused, Store, open_store
from wgjit.store import sqlite as sqlite_mod
from wgjit.store.prefixes import LOW_ORDER_KEYS, overlaps_within, supernet_firsts


def key() -> PublicKey:
    return PrivateKey.generate().public_key()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = f"sqlite://{tmp_path}/peers.db"
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    with open_store(url) as s:
        yield s


@pytest.mark.parametrize(
    ("held", "new"),
    [
        ("100.65.0.2/32", "100.65.0.2/32"),  # the same
        ("100.65.0.2/32", "100.65.0.0/24"),  # new contains held
        ("100.65.0.0/24", "100.65.0.7/32"),  # held contains new
        ("10.0.0.0/8", "10.200.0.0/16"),
        ("fd00:65::/64", "fd00:65::9/128"),
        ("fd00:65::9/128", "fd00::/16"),
        ("100.65.0.0/24,fd00:65::2/128", "fd00:65::/120"),  # any of the peer's prefixes
    ],
)
def test_overlap_refused_naming_the_peer(store: Store, held: str, new: str) -> None:
    store.add_peer("alice", key(), parse_networks(held))
    with pytest.raises(PeerRefused) as e:
        store.add_peer("bob", key(), parse_networks(f"100.99.0.1/32,{new}"))
    msg = str(e.value)
    assert f"allowed IP {parse_networks(new)[0]} overlaps" in msg and "of peer 'alice'" in msg
    assert "--allow-overlap" in msg
    assert [p.name for p in store.list_peers()] == ["alice"]
    # deliberately: accepted, and the prefixes are held from then on
    store.add_peer("bob", key(), parse_networks(new), allow_overlap=True)
    with pytest.raises(PeerRefused):
        store.add_peer("carol", key(), parse_networks(new))


def test_neighbours_and_other_families_do_not_overlap(store: Store) -> None:
    store.add_peer("a", key(), parse_networks("100.65.0.0/25,fd00::/64"))
    store.add_peer("b", key(), parse_networks("100.65.0.128/25"))  # adjacent
    store.add_peer("c", key(), parse_networks("100.64.255.255/32,100.65.1.0/32"))
    store.add_peer("d", key(), parse_networks("fd00:0:0:1::/64"))
    store.add_peer("e", key(), ())
    store.add_peer("f", key(), ())
    store.remove("a")
    store.add_peer("g", key(), parse_networks("100.65.0.0/25"))  # freed by the removal


@pytest.mark.parametrize(
    ("prefix", "why", "allowable"),
    [
        ("127.0.0.1/32", "loopback", False),
        ("127.0.0.0/8", "loopback", False),
        ("::1/128", "loopback", False),
        ("224.0.0.0/4", "multicast", False),
        ("239.1.2.3/32", "multicast", False),
        ("ff02::1/128", "multicast", False),
        ("0.0.0.0/32", "unspecified", False),
        ("::/128", "unspecified", False),
        ("169.254.1.0/24", "link-local", True),
        ("fe80::/64", "link-local", True),
        ("0.0.0.0/0", "whole address family", True),
        ("::/0", "whole address family", True),
    ],
)
def test_special_purpose_ranges(store: Store, prefix: str, why: str, allowable: bool) -> None:
    with pytest.raises(PeerRefused, match=why):
        store.add_peer("x", key(), parse_networks(prefix))
    if allowable:
        store.add_peer("x", key(), parse_networks(prefix), allow_overlap=True)
    else:
        with pytest.raises(PeerRefused, match=why):
            store.add_peer("x", key(), parse_networks(prefix), allow_overlap=True)


def test_a_peers_own_prefixes_must_not_overlap(store: Store) -> None:
    with pytest.raises(PeerRefused, match="overlap each other"):
        store.add_peer("x", key(), parse_networks("10.1.0.0/16,10.1.2.0/24"))


def test_low_order_keys_are_refused(store: Store) -> None:
    own = PrivateKey.generate()
    for raw in LOW_ORDER_KEYS:  # the table is right: X25519 with each is all zeros
        with pytest.raises(InvalidKey):
            own.exchange(raw)
        with pytest.raises(PeerRefused, match="low-order"):
            store.add_peer("x", PublicKey(raw), parse_networks("100.65.0.2/32"))
    assert len(LOW_ORDER_KEYS) == 14
    assert store.list_peers() == []


def test_import_checks_the_store_and_earlier_rows(store: Store) -> None:
    store.add_peer("held", key(), parse_networks("100.65.0.0/24"))
    ka = key()
    batch = [
        Peer("a", ka, parse_networks("100.66.0.1/32")),
        Peer("b", key(), parse_networks("100.65.0.9/32")),  # inside held's
        Peer("c", key(), parse_networks("100.66.0.0/24")),  # contains a's (earlier row)
        Peer("d", key(), parse_networks("127.0.0.1/32")),
        Peer("e", PublicKey(bytes(32)), parse_networks("100.67.0.1/32")),
        Peer("f", key(), parse_networks("100.68.0.1/32")),
    ]
    dry = store.import_peers(batch, dry_run=True)
    assert [p.name for p in store.list_peers()] == ["held"]  # a dry run writes nothing
    res = store.import_peers(batch)
    assert (dry.added, dry.rejected) == (res.added, res.rejected)
    assert (res.added, res.updated, res.unchanged) == (2, 0, 0)
    why = dict(res.rejected)
    assert sorted(why) == [1, 2, 3, 4]
    assert "100.65.0.9/32 overlaps 100.65.0.0/24 of peer 'held'" in why[1]
    assert "100.66.0.0/24 overlaps 100.66.0.1/32 of peer 'a'" in why[2]
    assert "loopback" in why[3] and "low-order" in why[4]
    # a's own prefix is no conflict when a is re-imported; moving it checks again
    assert store.import_peers(batch[:1]).unchanged == 1
    res = store.import_peers([Peer("a", ka, parse_networks("100.65.0.0/25"))])
    assert res.updated == 0 and "of peer 'held'" in res.rejected[0][1]
    res = store.import_peers([Peer("a", ka, parse_networks("100.69.0.0/24"))])
    assert res.updated == 1
    store.add_peer("z", key(), parse_networks("100.66.0.1/32"))  # a's old prefix is free
    with pytest.raises(PeerRefused, match="of peer 'a'"):
        store.add_peer("y", key(), parse_networks("100.69.0.128/25"))
    res = store.import_peers([Peer("w", key(), parse_networks("100.65.0.1/32"))],
                             allow_overlap=True)  # fmt: skip
    assert res.added == 1


def test_overlaps_within_a_batch() -> None:
    n = parse_networks
    rows = [
        (0, "a", n("10.0.0.0/24")),
        (1, "b", n("10.0.1.0/24")),
        (2, "c", n("10.0.0.128/25")),  # in a's
        (3, "d", n("10.0.0.0/16")),  # contains a, b, c
        (4, "a2", n("fd00::1/128,10.9.0.0/16")),
        (5, "e", n("fd00::/64")),  # contains a2's v6
        (6, "f", n("10.0.0.5/32")),  # in d's (d is refused itself: still an earlier row)
    ]
    bad = overlaps_within(rows)
    assert sorted(bad) == [2, 3, 5, 6]
    assert "of peer 'd'" in bad[6]
    assert overlaps_within([(0, "a", n("10.0.0.0/24")), (1, "a", n("10.0.0.5/32"))]) == {}
    assert "10.0.0.128/25 overlaps 10.0.0.0/24 of peer 'a'" in bad[2]
    assert "of peer 'a2'" in bad[5]


def test_supernet_firsts() -> None:
    net = parse_networks("10.1.2.4/30")[0]
    firsts = supernet_firsts(net)
    assert bytes([10, 1, 2, 0]) in firsts and bytes([0, 0, 0, 0]) in firsts
    assert bytes([10, 1, 2, 4]) not in firsts  # its own (equal prefixes: the range query)
    assert len(firsts) == len(set(firsts)) <= 30


def test_sqlite_overlap_queries_seek_the_index(tmp_path: Path) -> None:
    db = tmp_path / "peers.db"
    with open_store(str(db)) as s:
        s.add_peer("a", key(), parse_networks("10.0.0.0/24"))
    conn = sqlite3.connect(db)
    plans: list[str] = []
    real = sqlite_mod._overlap

    class Spy:
        def __init__(self, c: sqlite3.Connection) -> None:
            self.c = c

        def execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
            plans.extend(r[3] for r in self.c.execute("EXPLAIN QUERY PLAN " + sql, params))
            return self.c.execute(sql, params)

    assert real(Spy(conn), parse_networks("10.0.0.7/32"), None) is not None  # type: ignore[arg-type]
    assert real(Spy(conn), parse_networks("10.1.0.0/16"), None) is None  # type: ignore[arg-type]
    assert plans and not [p for p in plans if p.startswith("SCAN")], plans
    assert any("peer_prefixes_by_first" in p for p in plans), plans


def test_sqlite_migration_indexes_existing_peers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "peers.db"
    full = sqlite_mod.MIGRATIONS
    monkeypatch.setattr(sqlite_mod, "MIGRATIONS", full[:2])  # a store from before overlaps
    open_store(str(db)).close()
    with sqlite3.connect(db) as conn:  # a peer written by that version
        conn.execute(
            "INSERT INTO peers (name, public_key, allowed_ips, created_at, updated_at)"
            " VALUES ('old', ?, '100.65.0.0/24,fd00::/64', 0, 0)",
            (key().raw,),
        )
    conn.close()
    monkeypatch.setattr(sqlite_mod, "MIGRATIONS", full)
    with open_store(str(db)) as s, pytest.raises(PeerRefused, match="of peer 'old'"):
        s.add_peer("new", key(), parse_networks("100.65.0.5/32"))


def test_postgres_migration_indexes_existing_peers(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    from wgjit.store import postgres as pg_mod

    full = pg_mod.MIGRATIONS
    monkeypatch.setattr(pg_mod, "MIGRATIONS", full[:1])
    open_store(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO peers (name, public_key, allowed_ips, created_at, updated_at)"
            " VALUES ('old', %s, '100.65.0.0/24,fd00::/64', 0, 0)",
            (key().raw,),
        )
    monkeypatch.setattr(pg_mod, "MIGRATIONS", full)
    with open_store(pg_url) as s, pytest.raises(PeerRefused, match="of peer 'old'"):
        s.add_peer("new", key(), parse_networks("fd00::5/128"))
