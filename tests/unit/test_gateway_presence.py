"""Presence and handoff in the gateway policy: two gateways (fake devices) share one store,
on each backend; a peer installed at B is dropped at A; a restarted gateway gives up peers
another gateway took meanwhile; idle eviction releases the claim."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.unit.policy_driver import SyncGateway
from tests.unit.test_gateway_core import Clock, FakeDevice, events, initiation, knock
from wgjit.addr import Endpoint, parse_networks
from wgjit.device import PeerConfig
from wgjit.events import EventLog
from wgjit.gateway.core import GatewayConfig
from wgjit.handshake import Responder, Timestamp
from wgjit.keys import PrivateKey
from wgjit.store import Store, StoreError, open_store

OTHER_SRC = Endpoint.parse("198.18.0.12:40000")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/peers.db"
    u: str = request.getfixturevalue("pg_url")
    return u


class Node:
    def __init__(self, url: str, gw_key: PrivateKey, gateway_id: str, clock: Clock) -> None:
        self.store: Store = open_store(url)
        self.dev = FakeDevice(gw_key)
        self.out = io.StringIO()
        self.g = SyncGateway(
            self.dev,
            self.store,
            GatewayConfig(idle_timeout=300, sweep_interval=15, gateway_id=gateway_id),
            EventLog(self.out),
            Responder(gw_key),
            clock=clock,
        )


@pytest.fixture
def nodes(url: str) -> Callable[[str], Node]:
    gw_key = PrivateKey.generate()  # floating: every gateway has the same identity
    clock = Clock()
    made: list[Node] = []

    def make(gateway_id: str) -> Node:
        n = Node(url, gw_key, gateway_id, clock)
        made.append(n)
        return n

    yield make  # type: ignore[misc]
    for n in made:
        n.store.close()


def test_handoff(nodes: Callable[[str], Node]) -> None:
    a, b = nodes("gw-a"), nodes("gw-b")
    a.g.start()
    b.g.start()
    c = PrivateKey.generate()
    a.store.add_peer("alice", c.public_key(), parse_networks("100.65.0.11/32"))
    gw_key = a.dev.private_key
    clock = a.g.clock
    assert a.g.handle(knock(initiation(c, gw_key, 1e9), clock())) == "installed"
    a.g.poll_changes()
    b.g.poll_changes()
    assert c.public_key() in a.dev.peers
    # the client roams to B with a fresh initiation
    assert b.g.handle(knock(initiation(c, gw_key, 1e9 + 3), clock(), OTHER_SRC)) == "installed"
    assert events(b.out, "install")[0]["from_gateway"] == "gw-a"
    a.g.poll_changes()
    assert c.public_key() not in a.dev.peers and c.public_key() not in a.g.installed
    ev = events(a.out, "evict")[-1]
    assert (ev["reason"], ev["peer"]) == ("handoff", "alice")
    assert a.g.counters["evicted_handoff"] == 1
    b.g.poll_changes()  # its own claim is no news to B
    assert c.public_key() in b.dev.peers


def test_restarted_gateway_gives_up_what_another_took(nodes: Callable[[str], Node]) -> None:
    a, b = nodes("gw-a"), nodes("gw-b")
    a.g.start()
    b.g.start()
    c = PrivateKey.generate()
    a.store.add_peer("alice", c.public_key(), parse_networks("100.65.0.11/32"))
    gw_key, clock = a.dev.private_key, a.g.clock
    assert a.g.handle(knock(initiation(c, gw_key, 1e9), clock())) == "installed"
    # A goes down (its device keeps the peer); the client moves to B meanwhile
    assert b.g.handle(knock(initiation(c, gw_key, 1e9 + 3), clock(), OTHER_SRC)) == "installed"
    a2 = nodes("gw-a")
    a2.dev.peers = dict(a.dev.peers)
    a2.g.start()
    assert c.public_key() not in a2.dev.peers
    assert events(a2.out, "evict")[-1]["reason"] == "handoff"
    assert events(a2.out, "reconcile")[-1]["removed"] == "1"


def test_idle_eviction_releases_and_adoption_claims(nodes: Callable[[str], Node]) -> None:
    a = nodes("gw-a")
    a.g.start()
    c = PrivateKey.generate()
    a.store.add_peer("alice", c.public_key(), parse_networks("100.65.0.11/32"))
    gw_key, clock = a.dev.private_key, a.g.clock
    assert a.g.handle(knock(initiation(c, gw_key, 1e9), clock())) == "installed"
    peer = a.store.lookup(c.public_key())
    assert peer is not None and peer.holder == "gw-a"
    clock.t += 400  # type: ignore[attr-defined]
    a.g.sweep()
    peer = a.store.lookup(c.public_key())
    assert peer is not None and peer.holder is None
    # a restarted gateway claims the peers it keeps
    a.g.handle(knock(initiation(c, gw_key, 1e9 + 500), clock()))
    a.store.release([c.public_key()], "gw-a")
    a2 = nodes("gw-a2")
    a2.dev.peers = dict(a.dev.peers)
    a2.g.start()
    peer = a2.store.lookup(c.public_key())
    assert peer is not None and peer.holder == "gw-a2"


def test_replayed_rekey_at_another_gateway_never_moves_the_client(
    nodes: Callable[[str], Node],
) -> None:
    """An eavesdropper copies a live client's rekey to gateway B before A wrote its mark:
    B admits it, but A sees B admitted a timestamp A had already seen, keeps the client and
    claims the peer back; B drops it."""
    a, b = nodes("gw-a"), nodes("gw-b")
    a.g.start()
    b.g.start()
    c = PrivateKey.generate()
    a.store.add_peer("alice", c.public_key(), parse_networks("100.65.0.11/32"))
    gw_key, clock = a.dev.private_key, a.g.clock
    assert a.g.handle(knock(initiation(c, gw_key, 1e9), clock())) == "installed"
    rekey = initiation(c, gw_key, 1e9 + 120)
    assert a.g.handle(knock(rekey, clock())) == "already_installed"
    # copied to B at once, from the attacker's address (A has not written the mark yet)
    assert b.g.handle(knock(rekey, clock(), OTHER_SRC)) == "installed"
    a.g.poll_changes()
    assert c.public_key() in a.dev.peers and c.public_key() in a.g.installed
    assert events(a.out, "handoff_refused")[-1]["to_gateway"] == "gw-b"
    b.g.poll_changes()
    assert c.public_key() not in b.dev.peers
    assert events(b.out, "evict")[-1]["reason"] == "handoff"
    peer = a.store.lookup(c.public_key())
    assert peer is not None and peer.holder == "gw-a"
    # a real roam (a newer initiation) still moves the peer
    assert b.g.handle(knock(initiation(c, gw_key, 1e9 + 130), clock(), OTHER_SRC)) == "installed"
    a.g.poll_changes()
    assert c.public_key() not in a.dev.peers


def test_marks_written_within_a_second(nodes: Callable[[str], Node]) -> None:
    a = nodes("gw-a")
    a.g.start()
    c = PrivateKey.generate()
    a.store.add_peer("alice", c.public_key(), parse_networks("100.65.0.11/32"))
    gw_key, clock = a.dev.private_key, a.g.clock
    a.g.handle(knock(initiation(c, gw_key, 1e9), clock()))
    a.g.handle(knock(initiation(c, gw_key, 1e9 + 120), clock()))
    clock.t += 1.0  # type: ignore[attr-defined]
    a.g.tick()
    peer = a.store.lookup(c.public_key())
    assert peer is not None and peer.handshake_hwm == Timestamp.from_unix(1e9 + 120).raw


def test_claims_reasserted_after_a_pause(nodes: Callable[[str], Node]) -> None:
    a = nodes("gw-a")
    a.g.start()
    c = PrivateKey.generate()
    a.store.add_peer("alice", c.public_key(), parse_networks("100.65.0.11/32"))
    gw_key, clock = a.dev.private_key, a.g.clock
    a.g.handle(knock(initiation(c, gw_key, 1e9), clock()))
    a.store.release([c.public_key()], "gw-a")  # as when an outage let our claims expire
    clock.t += 40  # type: ignore[attr-defined]  # no heartbeat for 40 s
    a.g.tick()
    peer = a.store.lookup(c.public_key())
    assert peer is not None and peer.holder == "gw-a"
    assert events(a.out, "reassert_claims")


def test_store_back_is_logged_once_when_heartbeats_succeed_again(
    nodes: Callable[[str], Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = nodes("gw-a")
    a.g.start()
    clock, heartbeat = a.g.clock, a.store.heartbeat

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("store x: could not record a heartbeat: the database is unreachable")

    monkeypatch.setattr(a.store, "heartbeat", unreachable)
    for _ in range(3):
        clock.t += 5.0  # type: ignore[attr-defined]  # the heartbeat interval
        a.g.tick()
    assert len(events(a.out, "heartbeat_failed")) == 3
    assert not events(a.out, "store_back")
    monkeypatch.setattr(a.store, "heartbeat", heartbeat)
    for _ in range(2):
        clock.t += 5.0  # type: ignore[attr-defined]
        a.g.tick()
    (back,) = events(a.out, "store_back")
    assert float(back["down_s"]) == 15.0  # from the first failed heartbeat to the one that worked


def test_a_long_reconcile_beats_between_its_chunks(
    nodes: Callable[[str], Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconcile that outlasts the presence TTL (100 000 peers under emulation) renews the
    gateway's presence between its chunks: its claims never lapse, and nothing is re-checked
    once it is ready (a re-check of 100 000 peers costs the loop seconds and ~3 MiB)."""
    from wgjit.gateway import core

    monkeypatch.setattr(core, "RECONCILE_CHUNK", 2)
    a = nodes("gw-a")
    for i in range(10):
        key = PrivateKey.generate().public_key()
        a.store.add_peer(f"p{i}", key, parse_networks(f"100.65.0.{i + 1}/32"))
        a.dev.set_peer(PeerConfig(key))
    clock = a.g.clock
    lookup_many, heartbeat = a.store.lookup_many, a.store.heartbeat
    beats: list[float] = []

    def slow_lookup(*args: Any, **kwargs: Any) -> Any:
        clock.t += 4.0  # type: ignore[attr-defined]  # five chunks: a 20 s reconcile
        return lookup_many(*args, **kwargs)

    def beat(*args: Any, **kwargs: Any) -> Any:
        beats.append(clock())
        return heartbeat(*args, **kwargs)

    monkeypatch.setattr(a.store, "lookup_many", slow_lookup)
    monkeypatch.setattr(a.store, "heartbeat", beat)
    started = clock()
    a.g.start()
    assert len(a.g.installed) == 10 and clock() - started == 20.0
    gaps = [b - a for a, b in zip([started, *beats], [*beats, clock()], strict=True)]
    assert max(gaps) <= 8.0, f"heartbeats at {beats} over a reconcile from {started}"
    a.g.tick()  # the first tick after `ready`
    assert not events(a.out, "reassert_claims")


def test_far_future_timestamp_refused_and_leaves_the_mark(nodes: Callable[[str], Node]) -> None:
    a = nodes("gw-a")
    a.g.start()
    c = PrivateKey.generate()
    a.store.add_peer("alice", c.public_key(), parse_networks("100.65.0.11/32"))
    gw_key, clock = a.dev.private_key, a.g.clock
    future = clock() + 2 * 3600
    assert a.g.handle(knock(initiation(c, gw_key, future), clock())) == "future"
    assert events(a.out, "suspicious_timestamp")[-1]["peer"] == "alice"
    peer = a.store.lookup(c.public_key())
    assert peer is not None and peer.handshake_hwm is None
    assert a.g.handle(knock(initiation(c, gw_key, 1e9), clock())) == "installed"
    # installed: still refused, and the mark does not move
    assert a.g.handle(knock(initiation(c, gw_key, future + 1), clock())) == "future"
    clock.t += 1.0  # type: ignore[attr-defined]
    a.g.tick()
    peer = a.store.lookup(c.public_key())
    assert peer is not None and peer.handshake_hwm == Timestamp.from_unix(1e9).raw
