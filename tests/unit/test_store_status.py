"""Per-peer status and gateway presence on both backends: traffic totals accumulate across
batches (and so across installs), handshakes only move forward, heartbeats carry a gateway's
installed count and drops, and a store of the previous schema upgrades keeping its peers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgjit.addr import IPNetwork, parse_networks
from wgjit.keys import PrivateKey, PublicKey
from wgjit.store import Handshake, Peer, Store, Traffic, open_store


def key() -> PublicKey:
    return PrivateKey.generate().public_key()


def net(i: int) -> tuple[IPNetwork, ...]:
    return parse_networks(f"100.66.{i // 250}.{i % 250 + 1}/32")


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = f"sqlite://{tmp_path}/peers.db"
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    with open_store(url) as s:
        yield s


def test_traffic_accumulates_and_handshakes_only_move_forward(store: Store) -> None:
    a, b = key(), key()
    added = store.add_peer("alice", a, net(1))
    assert (added.rx_bytes, added.tx_bytes, added.last_handshake, added.endpoint) == (
        0, 0, None, None
    )  # fmt: skip
    store.add_peer("bob", b, net(2))
    cursor = store.change_cursor()
    store.record_traffic([Traffic(a, 100, 200, 1_800_000_000.5, "198.18.0.11:40000")])
    # a second install's counters (the device restarted them): added, not replacing
    store.record_traffic(
        [Traffic(a, 10, 20, 1_800_000_100.0, None), Traffic(b, 0, 0, None, "[2001:db8::1]:7")]
    )
    p = store.get_peer("alice")
    assert p is not None
    assert (p.rx_bytes, p.tx_bytes) == (110, 220)
    assert p.last_handshake == 1_800_000_100.0
    assert p.endpoint == "198.18.0.11:40000"  # a row without one keeps it
    # an older handshake (another gateway's late batch) does not move it back
    store.record_traffic([Traffic(a, 1, 1, 1_700_000_000.0, "198.18.0.12:1")])
    p = store.lookup(a)
    assert p is not None and p.last_handshake == 1_800_000_100.0
    assert (p.rx_bytes, p.tx_bytes, p.endpoint) == (111, 221, "198.18.0.12:1")
    q = store.get_peer("bob")
    assert q is not None and (q.rx_bytes, q.last_handshake, q.endpoint) == (
        0,
        None,
        "[2001:db8::1]:7",
    )
    # status is no change a gateway must act on
    assert store.changes_since(cursor) == ([], cursor)
    # a key given twice in one batch counts twice; unknown keys are skipped
    store.record_traffic([Traffic(b, 5, 6), Traffic(key(), 9, 9), Traffic(b, 5, 6, 3.0)])
    q = store.get_peer("bob")
    assert q is not None and (q.rx_bytes, q.tx_bytes, q.last_handshake) == (10, 12, 3.0)
    with pytest.raises(ValueError, match="negative"):
        store.record_traffic([Traffic(b, -1, 0)])


def test_traffic_in_chunks_and_the_busiest(store: Store) -> None:
    keys = [key() for _ in range(2500)]  # more than one chunk on either backend
    res = store.import_peers([Peer(f"p{i:04d}", k, net(i)) for i, k in enumerate(keys)])
    assert res.added == 2500
    store.record_traffic([Traffic(k, i, 2 * i, float(i)) for i, k in enumerate(keys)])
    store.record_traffic([Traffic(k, 1, 0) for k in keys])
    p = store.get_peer("p2499")
    assert p is not None and (p.rx_bytes, p.tx_bytes, p.last_handshake) == (2500, 4998, 2499.0)
    top = store.busiest_peers(3)
    assert [t.name for t in top] == ["p2499", "p2498", "p2497"]
    assert store.count_peers() == 2500
    assert store.busiest_peers(0) == []


def test_busiest_leaves_out_peers_without_traffic(store: Store) -> None:
    a = key()
    store.add_peer("a", a, net(1))
    store.add_peer("b", key(), net(2))
    assert store.busiest_peers(10) == []
    store.record_traffic([Traffic(a, 0, 1)])
    assert [p.name for p in store.busiest_peers(10)] == ["a"]


def test_heartbeat_carries_installed_and_drops(store: Store) -> None:
    a, b = key(), key()
    store.add_peer("a", a, net(1))
    store.add_peer("b", b, net(2))
    store.heartbeat("gw-a", installed=2, rejects={"unknown": 3, "replay": 1})
    store.heartbeat("gw-b")  # an older gateway says nothing more
    store.claim(a, "gw-a")
    store.claim(b, "gw-a")
    before = time.time()
    gws = store.gateways()
    assert [g.gateway_id for g in gws] == ["gw-a", "gw-b"]
    ga, gb = gws
    assert (ga.installed, ga.claimed, ga.rejects) == (2, 2, {"replay": 1, "unknown": 3})
    assert (gb.installed, gb.claimed, gb.rejects) == (None, 0, {})
    assert before - 5 < ga.heartbeat_at <= time.time() + 1
    store.heartbeat("gw-a", installed=0, rejects={})  # the latest heartbeat is what counts
    assert store.gateways()[0].installed == 0 and store.gateways()[0].rejects == {}


def _old_heartbeat(store: Store, gateway_id: str) -> None:
    from wgjit.store.postgres import PostgresStore
    from wgjit.store.sqlite import SQLiteStore

    if isinstance(store, SQLiteStore):
        with store._write("beat") as conn:
            conn.execute("INSERT INTO gateways VALUES (?, ?)", (gateway_id, time.time()))
    else:
        assert isinstance(store, PostgresStore)
        store._run(
            "beat",
            lambda c: c.execute("INSERT INTO gateways VALUES (%s, %s)", (gateway_id, time.time())),
        )


def test_a_store_of_the_previous_schema_upgrades_with_zero_totals(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wgjit.store import postgres as pg_mod
    from wgjit.store import sqlite as sqlite_mod

    for mod, url in (
        (sqlite_mod, f"sqlite://{tmp_path}/old.db"),
        (pg_mod, request.getfixturevalue("pg_url")),
    ):
        full = mod.MIGRATIONS
        step = next(i for i, s in enumerate(full) if "rx_bytes" in str(s))  # the status step
        monkeypatch.setattr(mod, "MIGRATIONS", full[:step])  # a store made before it
        k = key()
        with open_store(url) as old:
            old.add_peer("alice", k, net(1))
            old.advance_handshake(Handshake(k, bytes(12), 1.0))
            old.claim(k, "gw-a")
            # the heartbeat of an older gateway (this one writes the new columns)
            _old_heartbeat(old, "gw-a")
        monkeypatch.setattr(mod, "MIGRATIONS", full)
        with open_store(url, create=False) as new:
            p = new.get_peer("alice")
            assert p is not None
            assert (p.holder, p.rx_bytes, p.tx_bytes, p.last_handshake, p.endpoint) == (
                "gw-a", 0, 0, None, None
            )  # fmt: skip
            assert [(g.gateway_id, g.installed, g.claimed) for g in new.gateways()] == [
                ("gw-a", None, 1)
            ]
            new.record_traffic([Traffic(k, 7, 8, 2.0, "198.18.0.11:1")])
            p = new.get_peer("alice")
            assert p is not None and (p.rx_bytes, p.tx_bytes) == (7, 8)
