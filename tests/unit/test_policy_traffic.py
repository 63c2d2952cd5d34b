"""Per-peer traffic accounting in the policy: what a sweep or an eviction adds to the store's
totals when the device's counters restart at every (re)install, and in how many writes."""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.unit.policy_driver import SyncGateway
from tests.unit.test_gateway_core import SRC, Clock, FakeDevice, initiation, knock
from wgjit.addr import parse_networks
from wgjit.device import PeerState, PeerStats, SnapshotDump
from wgjit.events import EventLog
from wgjit.gateway.core import GatewayConfig
from wgjit.handshake import Responder
from wgjit.keys import PrivateKey, PublicKey
from wgjit.store import Peer, Store, StoreError, Traffic, open_store


class CountingStore:
    """A real store that records each record_traffic batch (and can fail the next ones)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.batches: list[list[Traffic]] = []
        self.fail = 0

    def record_traffic(self, rows: Any) -> None:
        if self.fail:
            self.fail -= 1
            raise StoreError("store x: could not record traffic: database unreachable")
        self.batches.append(list(rows))
        self.store.record_traffic(rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


class Rig:
    def __init__(self, tmp_path: Path, device_peers: dict[PublicKey, PeerState] | None = None):
        self.gw_key = PrivateKey.generate()
        self.dev = FakeDevice(self.gw_key)
        self.dev.peers.update(device_peers or {})
        self.real = open_store(str(tmp_path / "peers.db"))
        self.store = CountingStore(self.real)
        self.clock = Clock()
        self.out = io.StringIO()
        self.ts = 1e9
        self.g = SyncGateway(
            self.dev,
            self.store,  # type: ignore[arg-type]
            GatewayConfig(idle_timeout=300, sweep_interval=15, gateway_id="gw-t"),
            EventLog(self.out),
            Responder(self.gw_key),
            clock=self.clock,
        )

    def start(self) -> None:
        self.g.start()

    def add(self, name: str) -> PrivateKey:
        c = PrivateKey.generate()
        n = len(self.real.list_peers()) + 2
        self.real.add_peer(name, c.public_key(), parse_networks(f"100.65.0.{n}/32"))
        return c

    def connect(self, c: PrivateKey) -> str:
        """A knock of `c`; then a second passes (a sweep's snapshot of the same instant as
        the install may be of the peer before it: not accounted)."""
        self.ts += 10
        outcome = self.g.handle(knock(initiation(c, self.gw_key, self.ts), self.clock.t))
        self.clock.t += 1
        return str(outcome)

    def count(self, c: PrivateKey, rx: int, tx: int, handshake: float | None = None) -> None:
        """The device's counters for `c` now (and its last handshake: now by default)."""
        k = c.public_key()
        hs = self.clock.t if handshake is None else handshake
        self.dev.peers[k] = replace(self.dev.peers[k], rx_bytes=rx, tx_bytes=tx, last_handshake=hs)

    def totals(self, name: str) -> Peer:
        p = self.real.get_peer(name)
        assert p is not None
        return p


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    r.start()
    return r


def test_totals_survive_eviction_and_reinstall(rig: Rig) -> None:
    c = rig.add("alice")
    assert rig.connect(c) == "installed"
    rig.count(c, 1000, 2000)
    rig.g.sweep()
    p = rig.totals("alice")
    assert (p.rx_bytes, p.tx_bytes, p.last_handshake, p.endpoint) == (
        1000, 2000, rig.clock.t, str(SRC)
    )  # fmt: skip
    hs = rig.clock.t
    rig.clock.t += 20
    rig.count(c, 1500, 2100, handshake=hs)  # more bytes, same session
    rig.g.sweep()
    assert (rig.totals("alice").rx_bytes, rig.totals("alice").tx_bytes) == (1500, 2100)
    # a last trickle, then the peer goes idle: the sweep that evicts it counts the trickle
    rig.count(c, 1600, 2150, handshake=hs)
    rig.clock.t += 400
    rig.g.sweep()
    assert c.public_key() not in rig.dev.peers
    assert (rig.totals("alice").rx_bytes, rig.totals("alice").tx_bytes) == (1600, 2150)
    # it connects again: a new device peer, counters from zero, added to the totals
    assert rig.connect(c) == "installed"
    assert rig.dev.peers[c.public_key()].rx_bytes == 0
    rig.count(c, 300, 30)
    rig.g.sweep()
    p = rig.totals("alice")
    assert (p.rx_bytes, p.tx_bytes, p.last_handshake) == (1900, 2180, rig.clock.t)


def test_counters_that_restart_behind_our_back_are_added_whole(rig: Rig) -> None:
    c = rig.add("alice")
    rig.connect(c)
    rig.count(c, 1000, 1000)
    rig.g.sweep()
    rig.clock.t += 20
    rig.count(c, 100, 50)  # lower than accounted: the device has it anew (e.g. `wg set`)
    rig.g.sweep()
    assert (rig.totals("alice").rx_bytes, rig.totals("alice").tx_bytes) == (1100, 1050)


def test_one_write_per_sweep_and_none_without_news(rig: Rig) -> None:
    clients = [rig.add(f"p{i}") for i in range(5)]
    for c in clients:
        assert rig.connect(c) == "installed"
    for i, c in enumerate(clients[:4]):
        rig.count(c, 100 * (i + 1), 10)
    rig.g.sweep()
    # one batch for the sweep: the four with traffic (p4 had no handshake and no bytes)
    assert len(rig.store.batches) == 1
    assert sorted(t.rx_bytes for t in rig.store.batches[0]) == [100, 200, 300, 400]
    rig.clock.t += 20
    rig.g.sweep()  # nothing moved since: no write at all
    assert len(rig.store.batches) == 1
    rig.count(clients[4], 7, 7)
    rig.g.sweep()
    assert [(t.public_key, t.rx_bytes) for t in rig.store.batches[-1]] == [
        (clients[4].public_key(), 7)
    ]


def test_a_revoked_peer_has_its_last_bytes_read_before_removal(rig: Rig) -> None:
    c, d = rig.add("alice"), rig.add("bob")
    rig.connect(c)
    rig.connect(d)
    rig.count(c, 1000, 100)
    rig.g.sweep()
    rig.clock.t += 5
    rig.count(c, 1234, 150)  # after the sweep, before the revocation
    rig.count(d, 10, 10)
    rig.real.revoke("alice")
    before = len(rig.store.batches)
    rig.g.poll_changes()
    assert c.public_key() not in rig.dev.peers
    assert (rig.totals("alice").rx_bytes, rig.totals("alice").tx_bytes) == (1234, 150)
    # one write for the eviction batch, of the evicted peer only (bob waits for the sweep)
    assert [[t.public_key for t in b] for b in rig.store.batches[before:]] == [[c.public_key()]]
    assert rig.totals("bob").rx_bytes == 0


def test_adopted_peers_count_from_the_first_sweep(tmp_path: Path) -> None:
    """A restarted gateway adopts the device's peers: what the device counted before is not
    counted again (the gateway that installed them did); what comes after is."""
    c = PrivateKey.generate()
    k = c.public_key()
    rig = Rig(tmp_path, {k: PeerState(k, SRC, (), 1.8e9 - 10, rx_bytes=5000, tx_bytes=6000)})
    rig.real.add_peer("alice", k, parse_networks("100.65.0.2/32"))
    rig.start()
    assert k in rig.g.installed
    rig.g.sweep()
    p = rig.totals("alice")
    assert (p.rx_bytes, p.tx_bytes, p.last_handshake, p.endpoint) == (0, 0, 1.8e9 - 10, str(SRC))
    rig.clock.t += 20
    rig.count(c, 5100, 6010)
    rig.g.sweep()
    assert (rig.totals("alice").rx_bytes, rig.totals("alice").tx_bytes) == (100, 10)


def test_a_failed_write_is_written_with_the_next(rig: Rig) -> None:
    c = rig.add("alice")
    rig.connect(c)
    rig.count(c, 1000, 10)
    rig.store.fail = 1
    rig.g.sweep()
    assert rig.totals("alice").rx_bytes == 0 and rig.g.counters["errors"] == 1
    rig.clock.t += 20
    rig.count(c, 1500, 20)
    rig.g.sweep()
    assert (rig.totals("alice").rx_bytes, rig.totals("alice").tx_bytes) == (1500, 20)


def test_heartbeat_says_installed_and_drops_by_reason(rig: Rig) -> None:
    c = rig.add("alice")
    rig.connect(c)
    stranger = PrivateKey.generate()
    assert rig.connect(stranger) == "unknown"
    assert rig.connect(stranger) == "negative_cached"
    rig.g.policy._next_beat = 0.0
    rig.g.tick()
    (gw,) = rig.real.gateways()
    assert (gw.gateway_id, gw.installed, gw.claimed) == ("gw-t", 1, 1)
    assert gw.rejects == {"unknown": 1, "negative_cached": 1}


def test_a_snapshot_older_than_the_install_is_not_counted(rig: Rig) -> None:
    """The sweep's device read may come before an install that finishes while its steps run:
    those counters may be a former install's (already counted at its eviction)."""
    c = rig.add("alice")
    rig.connect(c)
    rig.count(c, 1000, 1000)
    policy = rig.g.policy
    policy._next_sweep = 0.0
    rig.g.tick()  # the device is read (into the sweep's steps), the steps not yet run
    assert policy.sweeping
    policy.installed[c.public_key()].installed_at = rig.clock.t + 1  # installed after the read
    while policy.sweeping:
        rig.g.tick()
    assert rig.store.batches == [] and rig.totals("alice").rx_bytes == 0


def test_the_sweep_asks_for_one_store_write_and_does_not_do_it(tmp_path: Path) -> None:
    """Sans-IO: the sweep's accounting is one RecordTraffic effect for a store worker (the
    loop runs it like any other store call); the policy itself writes nothing."""
    from tests.unit.test_policy_events import Loop
    from wgjit.gateway.effects import (
        STORE,
        Admit,
        Install,
        Lookup,
        ReadHandshakes,
        RecordTraffic,
    )

    loop = Loop(tmp_path)
    clients = [loop.peer(n) for n in ("alice", "bob", "caroline")]
    for i, c in enumerate(clients):
        loop.knock(knock(initiation(c, loop.gw_key, 1e9 + i), loop.clock.t))
        loop.answer(Lookup)
        loop.answer(Admit)
        loop.answer(Install)
    loop.clock.t += 16
    for c in clients[:2]:
        k = c.public_key()
        loop.dev.peers[k] = replace(loop.dev.peers[k], rx_bytes=50, last_handshake=loop.clock.t)
    loop.tick()
    loop.answer(ReadHandshakes)
    while loop.policy.sweeping:
        loop.tick()
    writes = [e for e in loop.pending if isinstance(e, RecordTraffic)]
    assert len(writes) == 1 and writes[0].where == STORE
    assert {t.public_key for t in writes[0].rows} == {c.public_key() for c in clients[:2]}
    assert loop.store.get_peer("alice").rx_bytes == 0  # type: ignore[union-attr]
    loop.answer(RecordTraffic)
    assert loop.store.get_peer("alice").rx_bytes == 50  # type: ignore[union-attr]


# -- sweeps that read the device in chunks ----------------------------------------------------


def _sweep_outcome(tmp_path: Path, chunk: int, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """One scenario swept with SWEEP_CHUNK `chunk`: active, idle, lost peers and a stranger."""
    from wgjit.gateway import core

    monkeypatch.setattr(core, "SWEEP_CHUNK", chunk)
    rig = Rig(tmp_path)
    rig.start()
    names = [f"p{i}" for i in range(9)]
    clients = {n: rig.add(n) for n in names}
    for c in clients.values():
        assert rig.connect(c) == "installed"
    installed_at = rig.clock.t
    rig.clock.t += 400  # everybody idle unless counted below
    for i, n in enumerate(names[:5]):
        rig.count(clients[n], 1000 * (i + 1), 10 * (i + 1))
    lost = clients["p5"].public_key()
    del rig.dev.peers[lost]  # removed behind the gateway's back
    stranger = PrivateKey.generate()
    k = stranger.public_key()
    rig.real.add_peer("q", k, parse_networks("100.65.1.2/32"))
    rig.dev.peers[k] = PeerState(k, SRC, (), installed_at, rx_bytes=70, tx_bytes=7)
    rig.g.sweep()
    out = rig.out.getvalue()
    return {
        "installed": sorted(inst.name for inst in rig.g.installed.values()),
        "on_device": len(rig.dev.peers),
        "totals": {n: (rig.totals(n).rx_bytes, rig.totals(n).tx_bytes) for n in names},
        "lost": out.count("event=lost"),
        "idle": out.count("reason=idle"),
        "rows": sum(len(b) for b in rig.store.batches),
        "writes": len(rig.store.batches),
        "incomplete": rig.g.counters["sweeps_incomplete"],
    }


def test_a_sweep_in_chunks_does_what_one_read_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read two peers at a time (five chunks here), a sweep accounts, evicts idle peers,
    forgets the one the device lost and adopts the stranger exactly as from one read; only
    its traffic is written per chunk."""
    whole = _sweep_outcome(tmp_path / "whole", 4096, monkeypatch)
    chunked = _sweep_outcome(tmp_path / "chunked", 2, monkeypatch)
    assert whole["installed"] == ["p0", "p1", "p2", "p3", "p4", "q"]
    assert whole["totals"]["p4"] == (5000, 50) and whole["totals"]["p8"] == (0, 0)
    assert (whole["lost"], whole["idle"], whole["rows"], whole["writes"]) == (1, 3, 5, 1)
    assert whole["on_device"] == 6 and whole["incomplete"] == 0
    assert chunked["writes"] > 1
    del whole["writes"], chunked["writes"]
    assert chunked == whole


class ChangingDump(SnapshotDump):
    """A read the device changed during (netlink's NLM_F_DUMP_INTR): peers may be missing."""

    def take(self, peers: int) -> dict[PublicKey, PeerStats]:
        chunk = super().take(peers)
        if self.done:
            self.complete = False
        return chunk


def test_nobody_is_taken_for_lost_after_an_incomplete_read(rig: Rig) -> None:
    a, b = rig.add("alice"), rig.add("bob")
    rig.connect(a)
    rig.connect(b)
    rig.count(a, 100, 10)
    real = rig.dev.stats_dump
    rig.dev.stats_dump = lambda: ChangingDump(  # type: ignore[method-assign]
        {k: v for k, v in rig.dev.stats().items() if k != b.public_key()}
    )
    rig.g.sweep()
    assert b.public_key() in rig.g.installed and rig.g.counters["sweeps_incomplete"] == 1
    assert rig.totals("alice").rx_bytes == 100  # what was read is accounted all the same
    rig.dev.stats_dump = real  # type: ignore[method-assign]
    del rig.dev.peers[b.public_key()]
    rig.g.sweep()  # a complete read without bob: now he is lost
    assert b.public_key() not in rig.g.installed and rig.g.counters["lost"] == 1


class RecordingDump(SnapshotDump):
    def __init__(self, stats: dict[PublicKey, PeerStats], log: list[str]) -> None:
        super().__init__(stats)
        self.log = log

    def take(self, peers: int) -> dict[PublicKey, PeerStats]:
        self.log.append("take")
        return super().take(peers)


def test_a_chunks_last_idle_peer_is_removed_after_the_next_chunk_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel goes on with a dump after the last peer it sent; removing that peer
    before the next message is read would end the dump there."""
    from wgjit.gateway import core

    monkeypatch.setattr(core, "SWEEP_CHUNK", 2)
    rig = Rig(tmp_path)
    rig.start()
    clients = [rig.add(f"p{i}") for i in range(4)]
    for c in clients:
        rig.connect(c)
    rig.clock.t += 400  # all idle
    log: list[str] = []
    keys = {c.public_key(): i for i, c in enumerate(clients)}
    rig.dev.stats_dump = lambda: RecordingDump(rig.dev.stats(), log)  # type: ignore[method-assign]
    remove = rig.dev.remove_peers

    def recorded(removed: Iterable[PublicKey]) -> None:
        removed = list(removed)
        log.append("remove " + " ".join(f"p{keys[k]}" for k in removed))
        remove(removed)

    rig.dev.remove_peers = recorded  # type: ignore[method-assign]
    rig.g.sweep()
    assert not rig.dev.peers and not rig.g.installed
    # (the second chunk is read while the first is worked through) p1, the first chunk's
    # last, is removed with the second chunk's peers, not with p0; p3 ends the read
    assert log == ["take", "take", "remove p0", "remove p1 p2 p3"]
