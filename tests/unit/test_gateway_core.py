"""Gateway policy with a fake device and a real SQLite store: every admission rule, no sockets."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.unit.policy_driver import SyncGateway
from tests.wgref import reference_initiation
from wgjit.addr import Endpoint, parse_networks
from wgjit.capture.packet import Knock
from wgjit.device import DeviceState, PeerConfig, PeerState, PeerStats, SnapshotDump, StatsDump
from wgjit.events import EventLog, parse_logfmt
from wgjit.gateway.core import ConfigError, GatewayConfig
from wgjit.handshake import Opened, Responder, Timestamp, Verified, build_initiation
from wgjit.keys import PrivateKey, PublicKey
from wgjit.store import Store, open_store

SRC = Endpoint.parse("198.18.0.11:40000")
DST = Endpoint.parse("198.18.0.1:51820")


class FakeDevice:
    """Records calls; keeps peers like a WireGuard device would."""

    name = "wgfake0"

    def __init__(self, private_key: PrivateKey) -> None:
        self.private_key = private_key
        self.peers: dict[PublicKey, PeerState] = {}
        self.calls: list[PeerConfig] = []

    def read(self, peers: bool = True) -> DeviceState:
        return DeviceState(self.name, self.private_key, 51820, dict(self.peers) if peers else {})

    def set_peer(self, config: PeerConfig) -> None:
        self.calls.append(config)
        old = self.peers.get(config.public_key)
        if old is None:
            if config.update_only:
                return
            old = PeerState(config.public_key)
        self.peers[config.public_key] = replace(
            old,
            endpoint=config.endpoint or old.endpoint,
            allowed_ips=config.allowed_ips if config.allowed_ips is not None else old.allowed_ips,
            persistent_keepalive=(
                config.persistent_keepalive
                if config.persistent_keepalive is not None
                else old.persistent_keepalive
            ),
        )

    def handshakes(self) -> dict[PublicKey, float]:
        return {k: ps.last_handshake or 0.0 for k, ps in self.peers.items()}

    def stats(self) -> dict[PublicKey, PeerStats]:
        return {
            k: (ps.last_handshake or 0.0, ps.rx_bytes, ps.tx_bytes,
                str(ps.endpoint) if ps.endpoint else None)
            for k, ps in self.peers.items()
        }  # fmt: skip

    def stats_dump(self) -> StatsDump:
        return SnapshotDump(self.stats())

    def set_peers(self, configs: Sequence[PeerConfig]) -> None:
        for c in configs:
            self.set_peer(c)

    def remove_peers(self, keys: Iterable[PublicKey]) -> None:
        for k in keys:
            self.peers.pop(k, None)

    def identity(self) -> object:
        return id(self)

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.t = 1.8e9  # wall clock too: after the tests' initiation timestamps (1e9 + ...)

    def __call__(self) -> float:
        return self.t


class Env(NamedTuple):
    g: SyncGateway
    dev: FakeDevice
    store: Store
    gw_key: PrivateKey
    out: io.StringIO
    clock: Clock


@pytest.fixture
def env(tmp_path: Path) -> Env:
    gw_key = PrivateKey.generate()
    dev = FakeDevice(gw_key)
    store = open_store(str(tmp_path / "peers.db"))
    out = io.StringIO()
    clock = Clock()
    g = SyncGateway(
        dev,
        store,
        GatewayConfig(idle_timeout=300, sweep_interval=15),
        EventLog(out),
        Responder(gw_key),
        clock=clock,
    )
    g.start()
    return Env(g, dev, store, gw_key, out, clock)


def knock(payload: bytes, at: float, source: Endpoint = SRC) -> Knock:
    return Knock(source=source, destination=DST, payload=payload, ifindex=2, received_at=at)


def initiation(client: PrivateKey, gw: PrivateKey, t: float) -> bytes:
    return build_initiation(client, gw.public_key(), timestamp=Timestamp.from_unix(t))


def events(out: io.StringIO, name: str) -> list[dict[str, str]]:
    return [e for e in map(parse_logfmt, out.getvalue().splitlines()) if e["event"] == name]


def test_known_peer_installed_with_endpoint_and_no_keepalive_left(env: Env) -> None:
    g, dev, store, gw_key, out, clock = env
    c = PrivateKey.generate()
    store.add_peer("alice", c.public_key(), parse_networks("100.65.0.11/32"))
    assert g.handle(knock(initiation(c, gw_key, 1e9), clock.t)) == "installed"
    assert [cfg.persistent_keepalive for cfg in dev.calls] == [None]
    ps = dev.peers[c.public_key()]
    assert ps.endpoint == SRC
    assert ps.allowed_ips == parse_networks("100.65.0.11/32")
    # the install's verdict names the key (a completion mode acts on it)
    assert g.verdicts[-1].key == c.public_key()
    assert events(out, "install")[0]["peer"] == "alice"
    # the store remembers the accepted timestamp
    peer = store.lookup(c.public_key())
    assert peer is not None and peer.handshake_hwm == Timestamp.from_unix(1e9).raw


def test_duplicate_and_already_installed(env: Env) -> None:
    g, dev, store, gw_key, out, clock = env
    c = PrivateKey.generate()
    store.add_peer("alice", c.public_key(), parse_networks("100.65.0.11/32"))
    pkt = initiation(c, gw_key, 1e9)
    assert g.handle(knock(pkt, clock.t)) == "installed"
    assert g.handle(knock(pkt, clock.t)) == "duplicate"  # same datagram seen on a 2nd interface
    assert g.handle(knock(initiation(c, gw_key, 1e9 + 5), clock.t)) == "already_installed"
    assert len(dev.calls) == 1


def test_unknown_revoked_forged_malformed_never_touch_device(env: Env) -> None:
    g, dev, store, gw_key, out, clock = env
    unknown = PrivateKey.generate()
    revoked = PrivateKey.generate()
    store.add_peer("bob", revoked.public_key(), parse_networks("100.65.0.12/32"))
    store.revoke("bob")
    assert g.handle(knock(initiation(unknown, gw_key, 1e9), clock.t)) == "unknown"
    # the second knock of an unknown key is answered from the negative cache
    assert g.handle(knock(initiation(unknown, gw_key, 1e9 + 1), clock.t)) == "negative_cached"
    assert g.handle(knock(initiation(revoked, gw_key, 1e9), clock.t)) == "revoked"
    other_gw = PrivateKey.generate()
    assert g.handle(knock(initiation(unknown, other_gw, 1e9), clock.t)) == "bad_mac1"
    assert g.handle(knock(b"\x01\x00\x00\x00" + bytes(144), clock.t)) == "bad_mac1"
    assert g.handle(knock(b"\x01garbage", clock.t)) == "malformed"
    assert dev.calls == []
    reasons = {e["reason"] for e in events(out, "reject")}
    assert {"unknown", "revoked"} <= reasons


def test_negative_cache_cleared_when_peer_added(env: Env) -> None:
    g, dev, store, gw_key, out, clock = env
    c = PrivateKey.generate()
    assert g.handle(knock(initiation(c, gw_key, 1e9), clock.t)) == "unknown"
    store.add_peer("late", c.public_key(), parse_networks("100.65.0.13/32"))
    g.poll_changes()
    assert g.handle(knock(initiation(c, gw_key, 1e9 + 1), clock.t)) == "installed"


def test_replay_after_eviction_refused(env: Env) -> None:
    g, dev, store, gw_key, out, clock = env
    c = PrivateKey.generate()
    store.add_peer("alice", c.public_key(), parse_networks("100.65.0.11/32"))
    first = initiation(c, gw_key, 1e9)
    assert g.handle(knock(first, clock.t)) == "installed"
    later = initiation(c, gw_key, 1e9 + 120)  # a rekey while installed
    assert g.handle(knock(later, clock.t)) == "already_installed"
    clock.t += 400
    g.sweep()
    assert c.public_key() not in dev.peers
    assert events(out, "evict")[-1]["reason"] == "idle"
    other = Endpoint.parse("198.18.0.66:1234")
    for old in (first, later):  # both were seen; both are replays now
        clock.t += 20  # past the duplicate window
        assert g.handle(knock(old, clock.t, other)) == "replay"
    assert c.public_key() not in dev.peers
    assert g.handle(knock(initiation(c, gw_key, 1e9 + 500), clock.t)) == "installed"


def test_revocation_evicts_installed_peer(env: Env) -> None:
    g, dev, store, gw_key, out, clock = env
    c = PrivateKey.generate()
    store.add_peer("alice", c.public_key(), parse_networks("100.65.0.11/32"))
    g.handle(knock(initiation(c, gw_key, 1e9), clock.t))
    store.revoke("alice")
    g.poll_changes()
    assert c.public_key() not in dev.peers
    assert events(out, "evict")[-1] == {**events(out, "evict")[-1], "reason": "revoked"}


def test_reconcile_removes_what_store_does_not_allow(tmp_path: Path) -> None:
    gw_key = PrivateKey.generate()
    dev = FakeDevice(gw_key)
    store = open_store(str(tmp_path / "p.db"))
    keep, revoked, stranger = (PrivateKey.generate().public_key() for _ in range(3))
    store.add_peer("keep", keep, parse_networks("100.65.0.2/32"))
    store.add_peer("rev", revoked, parse_networks("100.65.0.3/32"))
    store.revoke("rev")
    for k in (keep, revoked, stranger):
        dev.peers[k] = PeerState(k)
    g = SyncGateway(
        dev, store, GatewayConfig(), EventLog(io.StringIO()), Responder(gw_key), Clock()
    )
    g.start()
    assert set(dev.peers) == {keep}
    assert set(g.installed) == {keep}


def test_per_source_rate_limit_only_under_load(tmp_path: Path) -> None:
    """Like the kernel's: a crowd behind one address (NAT) is not limited while the gateway
    keeps up; under load each address gets per_source_rate."""
    for under_load, limited in ((False, 0), (True, 20)):
        gw_key = PrivateKey.generate()
        g = SyncGateway(
            FakeDevice(gw_key), open_store(str(tmp_path / f"{under_load}.db")),
            GatewayConfig(testing_always_under_load=under_load), EventLog(io.StringIO()),
            Responder(gw_key), Clock(),
        )  # fmt: skip
        g.start()
        outcomes = [
            g.handle(knock(initiation(PrivateKey.generate(), gw_key, 1e9), g.clock()))
            for _ in range(40)
        ]
        assert outcomes.count("rate_limited") == limited
        assert outcomes.count("unknown") == 40 - limited


def test_short_timers_need_explicit_testing_flag() -> None:
    with pytest.raises(ConfigError, match="--idle-timeout"):
        GatewayConfig(idle_timeout=60).validate()
    warnings = GatewayConfig(
        idle_timeout=5, sweep_interval=0.2, testing_short_timers=True
    ).validate()
    assert any("never use in production" in w for w in warnings)
    assert GatewayConfig().validate() == []
    with pytest.raises(ConfigError, match="--source-limit must be 0"):
        GatewayConfig(source_limit=-1).validate()
    [low] = GatewayConfig(source_limit=20).validate()
    assert low.startswith("--source-limit 20 is low: clients behind one address")
    assert GatewayConfig(source_limit=0).validate() == []


def test_forged_initiation_refused_and_does_not_poison_the_victim(env: Env) -> None:
    g, dev, store, gw_key, out, clock = env
    victim, attacker = PrivateKey.generate(), PrivateKey.generate()
    store.add_peer("alice", victim.public_key(), parse_networks("100.65.0.11/32"))
    ts = Timestamp.from_unix(1e9).raw
    forged = reference_initiation(victim.public_key(), attacker, gw_key.public_key(), timestamp=ts)
    assert g.handle(knock(forged, clock.t)) == "forged"
    assert dev.calls == []
    assert events(out, "reject")[-1]["reason"] == "forged"
    # the victim's own knock right after is not held back by any cache
    assert g.handle(knock(initiation(victim, gw_key, 1e9 + 1), clock.t)) == "installed"


def test_unknown_key_costs_no_second_dh(env: Env) -> None:
    """A made-up key is refused after decrypting the static key, before authenticating."""
    g, dev, store, gw_key, out, clock = env
    attacker = PrivateKey.generate()
    claimed = PrivateKey.generate().public_key()
    authenticated = []

    class Counting(Responder):
        def authenticate(self, opened: Opened) -> Verified:
            authenticated.append(opened.public_key)
            return super().authenticate(opened)

    g.responder = Counting(gw_key)
    pkt = reference_initiation(claimed, attacker, gw_key.public_key())
    assert g.handle(knock(pkt, clock.t)) == "unknown"
    assert authenticated == []


def test_store_changes_pushed_only_when_they_change_the_device(env: Env) -> None:
    g, dev, store, gw_key, out, clock = env
    a, b = PrivateKey.generate(), PrivateKey.generate()
    store.add_peer("a", a.public_key(), parse_networks("100.65.0.11/32"))
    g.handle(knock(initiation(a, gw_key, 1e9), clock.t))
    store.add_peer("b", b.public_key(), parse_networks("100.65.0.12/32"))
    calls = len(dev.calls)
    g.poll_changes()  # a's own insert and b's are in the feed: nothing to push
    assert len(dev.calls) == calls


def test_reconcile_corrects_allowed_ips_the_store_changed_meanwhile(tmp_path: Path) -> None:
    gw_key = PrivateKey.generate()
    dev = FakeDevice(gw_key)
    store = open_store(str(tmp_path / "p.db"))
    k = PrivateKey.generate().public_key()
    store.add_peer("moved", k, parse_networks("100.65.0.9/32"))
    dev.peers[k] = PeerState(k, allowed_ips=parse_networks("100.65.0.2/32"))  # the old config
    g = SyncGateway(dev, store, GatewayConfig(), EventLog(io.StringIO()), Responder(gw_key),
                    Clock())  # fmt: skip
    g.start()
    assert dev.peers[k].allowed_ips == parse_networks("100.65.0.9/32")
    assert k in g.installed


def test_disabled_peer_evicted_and_refused_then_back_when_enabled(env: Env) -> None:
    g, dev, store, gw_key, out, clock = env
    c = PrivateKey.generate()
    store.add_peer("alice", c.public_key(), parse_networks("100.65.0.11/32"))
    assert g.handle(knock(initiation(c, gw_key, 1e9), clock.t)) == "installed"
    store.update_peer("alice", disabled=True)
    g.poll_changes()
    assert c.public_key() not in dev.peers
    assert events(out, "evict")[-1]["reason"] == "disabled"
    clock.t += 3
    assert g.handle(knock(initiation(c, gw_key, 1e9 + 1), clock.t)) == "disabled"
    store.update_peer("alice", disabled=False)
    g.poll_changes()  # the change also clears the negative cache
    assert g.handle(knock(initiation(c, gw_key, 1e9 + 2), clock.t)) == "installed"


def test_expired_peer_evicted_when_the_time_comes_and_refused(env: Env) -> None:
    g, dev, store, gw_key, out, clock = env
    c = PrivateKey.generate()
    store.add_peer("temp", c.public_key(), parse_networks("100.65.0.12/32"),
                   expires_at=clock.t + 60)  # fmt: skip
    assert g.handle(knock(initiation(c, gw_key, 1e9), clock.t)) == "installed"
    clock.t += 59
    g.tick()
    assert c.public_key() in dev.peers
    clock.t += 1.5
    g.tick()  # no store change announces an expiry: the gateway's own timer does
    assert c.public_key() not in dev.peers
    assert events(out, "evict")[-1]["reason"] == "expired"
    assert g.handle(knock(initiation(c, gw_key, 1e9 + 1), clock.t)) == "expired"


@pytest.mark.parametrize("adopt", [False, True])
def test_a_store_that_knows_none_of_the_device_peers_removes_nothing(
    tmp_path: Path, adopt: bool
) -> None:
    gw_key = PrivateKey.generate()
    dev = FakeDevice(gw_key)
    store = open_store(str(tmp_path / "other.db"))
    store.add_peer("someone-else", PrivateKey.generate().public_key(),
                   parse_networks("100.65.0.2/32"))  # fmt: skip
    live = [PrivateKey.generate().public_key() for _ in range(3)]
    for k in live:
        dev.peers[k] = PeerState(k)
    g = SyncGateway(dev, store, GatewayConfig(adopt_empty_store=adopt), EventLog(io.StringIO()),
                    Responder(gw_key), Clock())  # fmt: skip
    g.start()
    if adopt:
        assert g.policy.refused_start is None and dev.peers == {}
    else:
        assert g.policy.refused_start and "--adopt-empty-store" in g.policy.refused_start
        assert set(dev.peers) == set(live)  # the live peers are still there


def test_installing_a_prefix_another_installed_peer_holds_is_logged(env: Env) -> None:
    g, dev, store, gw_key, out, clock = env
    a, b = PrivateKey.generate(), PrivateKey.generate()
    store.add_peer("site-a", a.public_key(), parse_networks("10.9.0.0/24"))
    store.add_peer("site-b", b.public_key(), parse_networks("10.9.0.0/24"), allow_overlap=True)
    assert g.handle(knock(initiation(a, gw_key, 1e9), clock.t)) == "installed"
    assert not events(out, "prefix_conflict")
    assert g.handle(knock(initiation(b, gw_key, 1e9), clock.t)) == "installed"
    ev = events(out, "prefix_conflict")[-1]
    assert (ev["prefix"], ev["peer"], ev["taken_from"]) == ("10.9.0.0/24", "site-b", "site-a")
