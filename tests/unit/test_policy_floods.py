"""What floods cost the policy: repeated bodies, reused ephemeral keys, the admission budget as a
sign of load, replays of installed peers. Real SQLite store, the fake device of
test_gateway_core, no sockets."""

from __future__ import annotations

import io
from pathlib import Path

from tests.unit.policy_driver import SyncGateway
from tests.unit.test_gateway_core import Clock, FakeDevice, initiation, knock
from tests.wgref import reference_initiation
from wgjit.addr import Endpoint, parse_networks
from wgjit.events import EventLog
from wgjit.gateway.core import OPENS, GatewayConfig
from wgjit.gateway.limits import SeenFilter
from wgjit.handshake import Responder, Timestamp
from wgjit.keys import PrivateKey
from wgjit.store import open_store


class CountingResponder(Responder):
    """Counts the X25519 operations the policy asks for."""

    __slots__ = ("dh",)

    def __init__(self, key: PrivateKey) -> None:
        super().__init__(key)
        self.dh = 0

    def _open(self, packet: bytes) -> tuple[bytes, bytes, bytes]:
        self.dh += 1
        return super()._open(packet)

    def _decrypt_timestamp(self, static: bytes, packet: bytes, ck: bytes, h: bytes) -> bytes:
        self.dh += not self.cached(static)
        return super()._decrypt_timestamp(static, packet, ck, h)


def gateway(tmp_path: Path, **config: float) -> tuple[SyncGateway, PrivateKey, CountingResponder]:
    gw_key = PrivateKey.generate()
    responder = CountingResponder(gw_key)
    g = SyncGateway(FakeDevice(gw_key), open_store(str(tmp_path / "peers.db")),
                    GatewayConfig(**config), EventLog(io.StringIO()), responder,  # type: ignore[arg-type]
                    Clock())  # fmt: skip
    g.start()
    return g, gw_key, responder


def spoofed(n: int) -> Endpoint:
    return Endpoint.parse(f"198.18.{192 + n // 65536 % 64}.{n // 256 % 256}:{1024 + n % 60000}")


def test_a_repeated_forgery_body_costs_no_x25519_and_no_budget(tmp_path: Path) -> None:
    """The flood of issue 10: one forged initiation of a stored key, resent under fresh sender
    indexes (so fresh mac1s) from spoofed sources. Only the first costs X25519s and budget;
    the copies are replays; the victim's own knock afterwards is admitted."""
    g, gw_key, r = gateway(tmp_path, global_rate=1.0, global_burst=2.0)
    victim, attacker, eph = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    g.store.add_peer("alice", victim.public_key(), parse_networks("100.65.0.11/32"))
    copies = [
        reference_initiation(victim.public_key(), attacker, gw_key.public_key(),
                             ephemeral=eph, index=i)
        for i in range(50)
    ]  # fmt: skip
    assert len({c[116:132] for c in copies}) == 50  # every copy a new mac1
    outcomes = [g.handle(knock(c, g.clock(), spoofed(i))) for i, c in enumerate(copies)]
    assert outcomes == ["forged"] + ["replay"] * 49
    assert r.dh == 2  # the first copy's two; none since
    assert g.counters["repeated_bodies"] == 49
    assert g.counters["rate_limited"] == 0 and g.counters["under_load"] == 0
    # budget left for the real client (burst 2, one spent on the first copy)
    assert g.handle(knock(initiation(victim, gw_key, 1e9 + 5), g.clock())) == "installed"


def test_a_reused_ephemeral_with_fresh_timestamps_costs_no_open(tmp_path: Path) -> None:
    """An attacker who keeps one ephemeral key and varies the rest of the body makes a new
    body each time; its static key still opens from the cache: one X25519 less a packet."""
    g, gw_key, r = gateway(tmp_path)
    victim, attacker, eph = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    g.store.add_peer("alice", victim.public_key(), parse_networks("100.65.0.11/32"))
    for i in range(5):
        stamp = Timestamp.from_unix(1e9 + i).raw
        pkt = reference_initiation(victim.public_key(), attacker, gw_key.public_key(),
                                   ephemeral=eph, timestamp=stamp, index=i)  # fmt: skip
        before = r.dh
        assert g.handle(knock(pkt, g.clock())) == "forged"
        assert r.dh - before == (2 if i == 0 else 1)  # the static·static DH only


def test_a_reused_ephemeral_of_an_unknown_key_is_negative_cached_without_budget(
    tmp_path: Path,
) -> None:
    g, gw_key, r = gateway(tmp_path, global_rate=1.0, global_burst=1.0)
    claimed, eph = PrivateKey.generate(), PrivateKey.generate()
    copies = [
        reference_initiation(claimed.public_key(), claimed, gw_key.public_key(), ephemeral=eph,
                             timestamp=Timestamp.from_unix(1e9 + i).raw, index=i)
        for i in range(30)
    ]  # fmt: skip
    assert g.handle(knock(copies[0], g.clock())) == "unknown"
    assert r.dh == 1  # an unknown key costs one X25519
    # the same ephemeral key and encrypted static, other timestamps: a known unknown, free,
    # and the budget (burst 1, spent) is never asked
    assert {g.handle(knock(p, g.clock())) for p in copies[1:]} == {"negative_cached"}
    assert r.dh == 1 and g.counters["rate_limited"] == 0
    assert g.counters["reused_ephemerals"] == 29


def test_a_spent_admission_budget_is_load_then_per_source_limits_apply(tmp_path: Path) -> None:
    """One source sending more made-up keys than the budget: once it is spent the gateway is
    under load (logged, counted), and that source is held to per_source_rate while a new
    source is still judged."""
    g, gw_key, r = gateway(tmp_path, global_rate=100.0, global_burst=30.0)
    flood = Endpoint.parse("198.18.0.66:4000")
    outcomes = [
        g.handle(knock(initiation(PrivateKey.generate(), gw_key, 1e9), g.clock(), flood))
        for _ in range(60)
    ]
    assert outcomes.count("unknown") == 30 and outcomes.count("rate_limited") == 30
    assert g.counters["under_load"] == 1
    g.clock.t += 0.5  # 50 tokens back; under load for another 0.5 s
    more = [
        g.handle(knock(initiation(PrivateKey.generate(), gw_key, 1e9), g.clock(), flood))
        for _ in range(40)
    ]
    assert more.count("unknown") <= 20  # per source (20 a second, and 20 spent already)
    other = Endpoint.parse("198.18.0.77:4000")
    assert g.handle(knock(initiation(PrivateKey.generate(), gw_key, 1e9), g.clock(), other)) == (
        "unknown"
    )


def test_an_installed_peers_old_initiation_is_a_replay_without_the_device(tmp_path: Path) -> None:
    g, gw_key, r = gateway(tmp_path)
    alice = PrivateKey.generate()
    g.store.add_peer("alice", alice.public_key(), parse_networks("100.65.0.11/32"))
    first = initiation(alice, gw_key, 1e9 + 10)
    assert g.handle(knock(first, g.clock())) == "installed"
    newer = initiation(alice, gw_key, 1e9 + 20)
    assert g.handle(knock(newer, g.clock())) == "already_installed"
    g.clock.t += 5  # past the duplicate filter's window
    for old in (first, newer, initiation(alice, gw_key, 1e9 + 15)):
        assert g.handle(knock(old, g.clock())) == "replay"
    dh = r.dh
    g.clock.t += 5
    # a replayed body again: judged from the cache
    assert g.handle(knock(first, g.clock())) == "replay" and r.dh == dh
    assert g.handle(knock(initiation(alice, gw_key, 1e9 + 30), g.clock())) == "already_installed"


def test_the_open_cache_is_bounded(tmp_path: Path) -> None:
    g, gw_key, r = gateway(tmp_path, global_rate=1e9)
    attacker = PrivateKey.generate()
    victim = PrivateKey.generate()
    g.store.add_peer("alice", victim.public_key(), parse_networks("100.65.0.11/32"))
    for i in range(OPENS + 10):
        pkt = reference_initiation(victim.public_key(), attacker, gw_key.public_key(), index=i)
        assert g.handle(knock(pkt, g.clock(), spoofed(i))) == "forged"
    assert len(g.policy._opens) == OPENS


def test_the_seen_filter_remembers_its_capacity_and_has_few_false_positives() -> None:
    f = SeenFilter(20_000, key=b"k" * 16)
    bodies = [i.to_bytes(4, "little") * 27 for i in range(50_000)]
    assert not any(f.seen(b) for b in bodies[:20_000])
    assert all(f.seen(b) for b in bodies[:20_000])  # all remembered
    fresh = sum(f.seen(b) for b in bodies[20_000:40_000])  # fills the newer filter
    assert fresh <= 40  # false positives: ~0.1 % with one filter full
    assert all(f.seen(b) for b in bodies[20_000:40_000])  # the newest 20 000 still there
    assert sum(f.seen(b) for b in bodies[40_000:]) <= 40
    g = SeenFilter(1000, key=b"k" * 16)
    for b in bodies[:3000]:
        g.seen(b)
    # two fillings later the first bodies are forgotten (bounded memory), bar a few
    assert sum(g.seen(b) for b in bodies[:1000]) <= 5


def test_the_admission_budget_is_measured_from_this_hosts_x25519_rate() -> None:
    from wgjit.gateway.run import measured_admission_rate

    key = PrivateKey.generate()
    alone, pooled = measured_admission_rate(key, 0), measured_admission_rate(key, 4)
    assert 1000 <= alone < pooled  # a worker process each: 8x one loop's share, noise aside
    assert GatewayConfig(global_rate=pooled).validate() == []
