"""The policy as a state machine: what it asks for, and what it does when answers are slow,
fail, or never come. No threads: the test plays the loop and decides when results arrive."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from tests.unit.test_gateway_core import Clock, FakeDevice, events, initiation, knock
from tests.wgref import reference_initiation
from wgjit.addr import Endpoint, parse_networks
from wgjit.capture.packet import Knock
from wgjit.cookie import CookieChecker, add_mac2, open_cookie_reply
from wgjit.device import PeerState
from wgjit.events import EventLog
from wgjit.gateway.core import LOAD_WORK_MIN, GatewayConfig, Policy
from wgjit.gateway.effects import (
    Admit,
    Effect,
    Heartbeat,
    Install,
    Lookup,
    Purpose,
    ReadHandshakes,
    ReadIdentity,
    Remove,
    Verdict,
    perform,
    run_inline,
)
from wgjit.gateway.outcome import Outcome
from wgjit.handshake import OFF_MAC1, OFF_MAC2, Responder
from wgjit.keys import PrivateKey
from wgjit.store import Store, StoreError, open_store


class Loop:
    """Plays the loop by hand: effects are kept until the test answers them."""

    def __init__(self, tmp_path: Path, **config: object) -> None:
        self.gw_key = PrivateKey.generate()
        self.dev = FakeDevice(self.gw_key)
        self.store: Store = open_store(str(tmp_path / "peers.db"))
        self.out = io.StringIO()
        self.clock = Clock()
        self.policy = Policy(
            Responder(self.gw_key),
            GatewayConfig(**config),  # type: ignore[arg-type]
            EventLog(self.out),
            wall=self.clock,
        )
        self.pending: list[Effect] = []
        self.verdicts: list[Verdict] = []
        run_inline(
            self.policy.reconcile({}, self.clock.t),
            lambda e, r, err: self.policy.on_done(e, r, err, self.clock.t),
            self.store,
            self.dev,
        )

    def take(self, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Verdict):
                self.verdicts.append(e)
            else:
                self.pending.append(e)

    def knock(self, k: Knock) -> None:
        self.take(self.policy.on_knocks([(k, k)], self.clock.t))

    def answer(self, kind: type, error: Exception | None = None) -> Effect:
        """Carry out the oldest pending effect of `kind` (or fail it with `error`)."""
        e = next(e for e in self.pending if isinstance(e, kind))
        self.pending.remove(e)
        result = None if error else perform(e, self.store, self.dev)
        self.take(self.policy.on_done(e, result, error, self.clock.t))
        return e

    def tick(self) -> None:
        self.take(self.policy.on_tick(self.clock.t))

    def outcome(self, k: Knock) -> Outcome | None:
        mine = [v.outcome for v in self.verdicts if v.ticket is k]
        assert len(mine) <= 1
        return mine[0] if mine else None

    def peer(self, name: str) -> PrivateKey:
        c = PrivateKey.generate()
        n = self._peers = getattr(self, "_peers", 0) + 1  # one address each
        self.store.add_peer(name, c.public_key(), parse_networks(f"100.64.{n // 250}.{n % 250}/32"))
        return c


@pytest.fixture
def loop(tmp_path: Path) -> Loop:
    return Loop(tmp_path)


def test_installed_peer_is_judged_while_another_key_waits_for_the_store(loop: Loop) -> None:
    a, b = loop.peer("alice"), loop.peer("bob")
    ka = knock(initiation(a, loop.gw_key, 1e9), loop.clock.t)
    loop.knock(ka)
    loop.answer(Lookup)
    loop.answer(Admit)
    loop.answer(Install)
    assert loop.outcome(ka) == Outcome.INSTALLED
    # bob's look-up is outstanding (a slow store): alice's next handshake needs nothing
    kb = knock(initiation(b, loop.gw_key, 1e9), loop.clock.t)
    loop.knock(kb)
    assert loop.outcome(kb) is None and any(isinstance(e, Lookup) for e in loop.pending)
    before = len(loop.pending)
    ka2 = knock(initiation(a, loop.gw_key, 1e9 + 120), loop.clock.t)
    loop.knock(ka2)
    assert loop.outcome(ka2) == Outcome.ALREADY_INSTALLED
    assert len(loop.pending) == before  # no store or device call for it


def test_knocks_of_one_key_share_one_lookup_and_install(loop: Loop) -> None:
    a = loop.peer("alice")
    k1 = knock(initiation(a, loop.gw_key, 1e9), loop.clock.t)
    k2 = knock(initiation(a, loop.gw_key, 1e9 + 1), loop.clock.t)
    loop.knock(k1)
    loop.knock(k2)
    assert sum(isinstance(e, Lookup) for e in loop.pending) == 1
    loop.answer(Lookup)
    admit = loop.answer(Admit)
    assert isinstance(admit, Admit) and admit.handshake.timestamp > b""  # the newest one
    loop.answer(Install)
    assert {loop.outcome(k1), loop.outcome(k2)} == {Outcome.INSTALLED, Outcome.ALREADY_INSTALLED}
    assert loop.outcome(k2) == Outcome.INSTALLED  # the newer initiation was admitted
    assert len(loop.dev.calls) == 1


def test_slow_lookup_gets_a_fail_open_verdict_then_installs(loop: Loop) -> None:
    a = loop.peer("alice")
    k = knock(initiation(a, loop.gw_key, 1e9), loop.clock.t)
    loop.knock(k)
    assert loop.policy.next_deadline() <= k.received_at + 0.8
    loop.clock.t += 0.79
    loop.tick()
    assert loop.outcome(k) is None
    loop.clock.t += 0.02
    loop.tick()
    assert loop.outcome(k) == Outcome.TIMEOUT and Outcome.TIMEOUT.accepts
    ev = events(loop.out, "fail_open")[-1]
    assert ev["stage"] == "lookup" and 790 <= int(ev["age_ms"]) <= 820
    # the answer comes within max_install_age: the peer is installed for the client's retry
    loop.answer(Lookup)
    loop.answer(Admit)
    loop.answer(Install)
    assert a.public_key() in loop.dev.peers
    assert [v.outcome for v in loop.verdicts].count(Outcome.INSTALLED) == 1  # no ticket left
    # with the ticket its fail-open verdict went with: hold mode re-injects if it left
    assert loop.verdicts[-1].ticket is None and loop.verdicts[-1].had is k


def test_answer_older_than_max_install_age_installs_nothing(loop: Loop) -> None:
    a = loop.peer("alice")
    k = knock(initiation(a, loop.gw_key, 1e9), loop.clock.t)
    loop.knock(k)
    loop.answer(Lookup)
    loop.clock.t += 14  # the row was locked for 14 s
    loop.tick()
    loop.answer(Admit)
    assert not any(isinstance(e, Install) for e in loop.pending)
    assert a.public_key() not in loop.dev.peers
    assert events(loop.out, "stale")[-1]["stage"] == "admit"
    assert loop.policy.pending == 0


def test_stalled_store_lets_new_keys_through_at_once(loop: Loop) -> None:
    a, b = loop.peer("alice"), loop.peer("bob")
    loop.knock(knock(initiation(a, loop.gw_key, 1e9), loop.clock.t))
    loop.clock.t += 2.5  # the look-up has been running for 2.5 s
    loop.tick()
    kb = knock(initiation(b, loop.gw_key, 1e9), loop.clock.t)
    loop.knock(kb)
    assert loop.outcome(kb) == Outcome.STORE_UNAVAILABLE and Outcome.STORE_UNAVAILABLE.accepts
    assert sum(isinstance(e, Lookup) for e in loop.pending) == 1
    # once the store answers, new keys queue for it again
    loop.answer(Lookup)
    kb2 = knock(initiation(b, loop.gw_key, 1e9 + 1), loop.clock.t)
    loop.knock(kb2)
    assert loop.outcome(kb2) is None
    # bob's look-up is the oldest still running now, and it is what stalls
    c = loop.peer("carmen")
    loop.clock.t += 1.0
    kc = knock(initiation(c, loop.gw_key, 1e9), loop.clock.t)
    loop.knock(kc)
    assert loop.outcome(kc) is None
    loop.clock.t += 1.5
    kc2 = knock(initiation(loop.peer("dave"), loop.gw_key, 1e9), loop.clock.t)
    loop.knock(kc2)
    assert loop.outcome(kc2) == Outcome.STORE_UNAVAILABLE


def test_failed_lookup_fails_open_and_caches_nothing(loop: Loop) -> None:
    a = loop.peer("alice")
    k = knock(initiation(a, loop.gw_key, 1e9), loop.clock.t)
    loop.knock(k)
    loop.answer(Lookup, StoreError("database is down"))
    assert loop.outcome(k) == Outcome.INSTALL_FAILED
    # not negatively cached: the next knock asks the store again
    loop.knock(knock(initiation(a, loop.gw_key, 1e9 + 1), loop.clock.t))
    assert any(isinstance(e, Lookup) for e in loop.pending)


def test_pending_knocks_are_bounded(tmp_path: Path) -> None:
    loop = Loop(tmp_path, max_pending=3)
    outcomes = []
    for i in range(5):
        c = PrivateKey.generate()
        src = Endpoint.parse(f"198.18.0.{20 + i}:4000")
        k = knock(initiation(c, loop.gw_key, 1e9), loop.clock.t, src)
        loop.knock(k)
        outcomes.append(loop.outcome(k))
    assert outcomes == [None, None, None, Outcome.OVERLOADED, Outcome.OVERLOADED]


def test_sweep_forgets_peers_the_device_lost_and_adopts_strangers(loop: Loop) -> None:
    a, b = loop.peer("alice"), loop.peer("bob")
    loop.knock(knock(initiation(a, loop.gw_key, 1e9), loop.clock.t))
    loop.answer(Lookup)
    loop.answer(Admit)
    loop.answer(Install)
    assert a.public_key() in loop.policy.installed
    # the device restarted empty; bob was added to it by hand
    loop.dev.peers = {b.public_key(): PeerState(b.public_key())}
    loop.clock.t += 16
    loop.tick()
    loop.answer(ReadHandshakes)
    while loop.policy.sweeping:
        loop.tick()
    assert a.public_key() not in loop.policy.installed
    assert events(loop.out, "lost")[-1]["peer"] == "alice"
    lookup = loop.answer(Lookup)
    assert isinstance(lookup, Lookup) and lookup.purpose is Purpose.ADOPT
    assert b.public_key() in loop.policy.installed
    # alice knocks again: installed afresh (not answered "already installed" from memory)
    k = knock(initiation(a, loop.gw_key, 1e9 + 200), loop.clock.t)
    loop.knock(k)
    assert loop.outcome(k) is None and any(isinstance(e, Lookup) for e in loop.pending)


def test_peer_installed_during_a_sweep_is_not_forgotten(loop: Loop) -> None:
    a = loop.peer("alice")
    loop.clock.t += 16
    loop.tick()  # the sweep's device read is issued (and slow)
    assert any(isinstance(e, ReadHandshakes) for e in loop.pending)
    snapshot = perform(ReadHandshakes(), loop.store, loop.dev)  # read before the install
    loop.knock(knock(initiation(a, loop.gw_key, 1e9), loop.clock.t))
    loop.answer(Lookup)
    loop.answer(Admit)
    loop.answer(Install)
    sweep = next(e for e in loop.pending if isinstance(e, ReadHandshakes))
    loop.pending.remove(sweep)
    loop.take(loop.policy.on_done(sweep, snapshot, None, loop.clock.t))
    while loop.policy.sweeping:
        loop.tick()
    assert a.public_key() in loop.policy.installed
    assert not any(isinstance(e, Remove) for e in loop.pending)


def test_under_load_a_knock_without_mac2_gets_a_cookie_and_no_dh(tmp_path: Path) -> None:
    loop = Loop(tmp_path)
    loop.policy.cookies = CookieChecker(loop.gw_key.public_key())
    junk(loop, 16)  # a flood: what cookie replies spare
    a = loop.peer("alice")
    pkt = initiation(a, loop.gw_key, 1e9)
    # not under load: straight to the look-up
    k0 = knock(pkt, loop.clock.t)
    loop.knock(k0)
    assert loop.outcome(k0) is None
    # a knock that waited 300 ms in the kernel's queue amid that flood means load
    k = knock(initiation(a, loop.gw_key, 1e9 + 1), loop.clock.t - 0.3)
    loop.knock(k)
    assert loop.outcome(k) == Outcome.COOKIE and not Outcome.COOKIE.accepts
    v = next(v for v in loop.verdicts if v.ticket is k)
    assert v.reply is not None
    assert events(loop.out, "under_load")
    # the client puts the cookie into mac2 of its retry: admitted (while load lasts)
    cookie = open_cookie_reply(v.reply, loop.gw_key.public_key(), k.payload[OFF_MAC1:OFF_MAC2])
    retry = knock(add_mac2(initiation(a, loop.gw_key, 1e9 + 5), cookie), loop.clock.t)
    loop.knock(retry)
    assert loop.outcome(retry) is None  # waits for alice's look-up with the first knock
    loop.answer(Lookup)
    loop.answer(Admit)
    loop.answer(Install)
    assert loop.outcome(retry) == Outcome.INSTALLED
    # load ends a second after its last sign
    loop.clock.t += 1.5
    k2 = knock(initiation(PrivateKey.generate(), loop.gw_key, 1e9), loop.clock.t)
    loop.knock(k2)
    assert loop.outcome(k2) is None


def test_a_sign_of_load_from_the_mode_cookies_new_senders(tmp_path: Path) -> None:
    """Hold mode's releases waiting long for the device (the loop's note_load): like a late
    queue, a new sender without mac2 gets a cookie reply for the next second."""
    loop = Loop(tmp_path)
    loop.policy.cookies = CookieChecker(loop.gw_key.public_key())
    loop.policy.note_load(loop.clock.t, "release_delay")
    k = knock(initiation(loop.peer("alice"), loop.gw_key, 1e9), loop.clock.t)
    loop.knock(k)
    assert loop.outcome(k) == Outcome.COOKIE
    assert [e["sign"] for e in events(loop.out, "under_load")] == ["release_delay"]
    loop.clock.t += 1.5  # a second after its last sign, load is over
    k2 = knock(initiation(loop.peer("bob"), loop.gw_key, 1e9), loop.clock.t)
    loop.knock(k2)
    assert loop.outcome(k2) is None  # on to its look-up


def install_herd(loop: Loop, n: int) -> None:
    """`n` stored peers knock at once and are installed (INSTALLED verdicts)."""
    keys = [loop.peer(f"herd-{i}") for i in range(n)]
    ks = [knock(initiation(c, loop.gw_key, 1e9), loop.clock.t) for c in keys]
    loop.take(loop.policy.on_knocks([(k, k) for k in ks], loop.clock.t))
    loop.answer(Lookup)
    for kind in (Admit, Install):  # one a peer (the loop batches them)
        while any(isinstance(e, kind) for e in loop.pending):
            loop.answer(kind)
    assert [loop.outcome(k) for k in ks] == [Outcome.INSTALLED] * n


def junk(loop: Loop, n: int) -> None:
    """`n` knocks of unknown keys from as many addresses, each refused after an X25519 and a
    look-up."""
    before = loop.policy.counters[Outcome.UNKNOWN]
    for i in range(n):
        src = Endpoint.parse(f"198.51.100.{i + 1}:4000")
        loop.knock(knock(initiation(PrivateKey.generate(), loop.gw_key, 1e9), loop.clock.t, src))
        loop.answer(Lookup)  # not in the store
    assert loop.policy.counters[Outcome.UNKNOWN] == before + n


def late_knock(loop: Loop) -> Knock:
    """A new peer's knock that waited 300 ms in the kernel's queue."""
    c = loop.peer(f"late-{len(loop.verdicts)}")
    k = knock(initiation(c, loop.gw_key, 1e9), loop.clock.t - 0.3)
    loop.knock(k)
    return k


def test_late_knocks_amid_a_herd_are_load(tmp_path: Path) -> None:
    """Knocks running late while new peers are being installed: load, as in WireGuard. The
    cookies spread a failover herd over its clients' retries."""
    loop = Loop(tmp_path)
    loop.policy.cookies = CookieChecker(loop.gw_key.public_key())
    install_herd(loop, 16)
    assert loop.outcome(late_knock(loop)) == Outcome.COOKIE
    assert [e["sign"] for e in events(loop.out, "under_load")] == ["queue_delay"]


def test_late_knocks_amid_a_flood_of_made_up_keys_are_load(tmp_path: Path) -> None:
    """Knocks refused after an X25519 and a look-up: late knocks mean load, and new senders
    get cookies. Load lasts while the flood's new keys get cookies (what their X25519s
    became); once the flood goes on with copies only, dropped before any of that, it is
    not load any more, though knocks still run late."""
    loop = Loop(tmp_path)
    loop.policy.cookies = CookieChecker(loop.gw_key.public_key())
    junk(loop, 16)
    copy = knock(initiation(PrivateKey.generate(), loop.gw_key, 1e9), loop.clock.t)
    loop.knock(copy)
    loop.answer(Lookup)
    assert loop.outcome(late_knock(loop)) == Outcome.COOKIE
    assert [e["sign"] for e in events(loop.out, "under_load")] == ["queue_delay"]
    for step in range(5):  # the count of the first refusals ages out after one to two seconds
        loop.clock.t += 0.9
        for i in range(LOAD_WORK_MIN):
            src = Endpoint.parse(f"203.0.113.{i + 1}:{5000 + step}")
            k = knock(initiation(PrivateKey.generate(), loop.gw_key, 1e9), loop.clock.t, src)
            loop.knock(k)
            assert loop.outcome(k) == Outcome.COOKIE
        assert loop.outcome(late_knock(loop)) == Outcome.COOKIE
    for _ in range(4):  # copies, late as well: nothing they cost is spared by load
        loop.clock.t += 0.9
        for _ in range(50):
            k = knock(copy.payload, loop.clock.t - 0.3)
            loop.knock(k)
            assert loop.outcome(k) in (Outcome.DUPLICATE, Outcome.REPLAY)
        # (copies are dropped before any sign is read; hold mode's releases still wait)
        loop.policy.note_late(loop.clock.t, "release_delay")
    # load ended a second after the last sign that came amid work: no cookie, on to its look-up
    assert loop.outcome(late_knock(loop)) is None
    assert len(events(loop.out, "under_load")) == 1 and events(loop.out, "running_late")


@pytest.mark.parametrize("sign", ["queue_delay", "release_delay"])
def test_late_knocks_amid_cheap_junk_are_not_load(tmp_path: Path, sign: str) -> None:
    """Cookies spare X25519s and look-ups: knocks running late while the loop drops cheap
    junk (bad mac1, replays), after a flood that ended seconds ago and with a few installs
    (fewer than 16), are no sign of load. A real client is not sent to its 5 s retry."""
    loop = Loop(tmp_path)
    loop.policy.cookies = CookieChecker(loop.gw_key.public_key())
    junk(loop, 20)
    loop.clock.t += 5  # only the last one to two seconds count
    for _ in range(30):
        loop.knock(knock(b"\x01\0\0\0" + os.urandom(144), loop.clock.t))
    assert loop.policy.counters[Outcome.BAD_MAC1] == 30
    install_herd(loop, 15)
    if sign == "release_delay":
        loop.policy.note_late(loop.clock.t, sign)
    assert loop.outcome(late_knock(loop)) is None  # on to its look-up, no cookie
    assert not events(loop.out, "under_load")
    late = events(loop.out, "running_late")
    assert [(e["sign"], e["judged_at_cost"]) for e in late] == [(sign, "15")]
    assert loop.policy.counters["running_late"] == 1


def test_under_load_ipv6_senders_share_a_limit_per_64(tmp_path: Path) -> None:
    loop = Loop(tmp_path, testing_always_under_load=True)  # no cookies: limits only
    outcomes = []
    for i in range(30):
        src = Endpoint.parse(f"[fd18:0:0:1::{i + 1:x}]:4000")  # one /64, many addresses
        k = knock(initiation(PrivateKey.generate(), loop.gw_key, 1e9), loop.clock.t, src)
        loop.knock(k)
        outcomes.append(loop.outcome(k))
    assert outcomes.count(Outcome.RATE_LIMITED) == 10
    other = knock(
        initiation(PrivateKey.generate(), loop.gw_key, 1e9), loop.clock.t,
        Endpoint.parse("[fd18:0:0:2::1]:4000"),
    )  # fmt: skip
    loop.knock(other)
    assert loop.outcome(other) is None  # another /64 has its own budget


def test_garbage_spends_no_budget(tmp_path: Path) -> None:
    loop = Loop(tmp_path, global_rate=1.0, global_burst=1.0)
    for _ in range(50):
        junk = knock(initiation(PrivateKey.generate(), PrivateKey.generate(), 1e9), loop.clock.t)
        loop.knock(junk)
        assert loop.outcome(junk) == Outcome.BAD_MAC1
    k = knock(initiation(loop.peer("alice"), loop.gw_key, 1e9), loop.clock.t)
    loop.knock(k)
    assert loop.outcome(k) is None  # the one token was still there


def test_device_created_anew_is_swept_at_once(loop: Loop) -> None:
    a = loop.peer("alice")
    loop.knock(knock(initiation(a, loop.gw_key, 1e9), loop.clock.t))
    loop.answer(Lookup)
    loop.answer(Admit)
    loop.answer(Install)
    loop.clock.t += 1.0
    loop.tick()
    loop.answer(ReadIdentity)  # the same device: nothing to do
    assert not any(isinstance(e, ReadHandshakes) for e in loop.pending)
    # wireguard-go restarts: an empty device with a new identity
    loop.dev.peers.clear()
    loop.dev.identity = lambda: "new"  # type: ignore[method-assign]
    loop.clock.t += 1.0
    loop.tick()
    loop.answer(ReadIdentity)
    assert events(loop.out, "device_changed")
    loop.tick()  # the sweep is due now, not in 15 s
    loop.answer(ReadHandshakes)
    while loop.policy.sweeping:
        loop.tick()
    assert a.public_key() not in loop.policy.installed


def test_a_knock_dropped_from_a_waiting_group_gets_one_verdict(loop: Loop) -> None:
    """A forged initiation waiting with a real one for the same key is refused when the
    look-up comes back, and never times out afterwards (a second, fail-open verdict)."""
    victim, attacker = PrivateKey.generate(), PrivateKey.generate()
    loop.store.add_peer("alice", victim.public_key(), parse_networks("100.65.0.11/32"))
    real = knock(initiation(victim, loop.gw_key, 1e9), loop.clock.t)
    forged = knock(
        reference_initiation(victim.public_key(), attacker, loop.gw_key.public_key()),
        loop.clock.t, Endpoint.parse("198.18.0.66:1"),
    )  # fmt: skip
    loop.knock(real)
    loop.knock(forged)
    loop.answer(Lookup)
    assert loop.outcome(forged) == Outcome.FORGED
    loop.clock.t += 0.9  # past the knock budget while alice's admission is under way
    loop.tick()
    assert [v.outcome for v in loop.verdicts if v.ticket is forged] == [Outcome.FORGED]
    assert loop.policy.counters[Outcome.TIMEOUT] == 1  # alice's, not the forgery's


def test_claims_are_rechecked_a_chunk_at_a_time_one_after_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a pause every installed peer is looked up again, RECONCILE_CHUNK (here 2) at a
    time and one look-up after the other: issued at once they came back faster than the
    loop worked through them and waited in its queue, Peer objects and all."""
    from wgjit.gateway import core

    monkeypatch.setattr(core, "RECONCILE_CHUNK", 2)
    loop = Loop(tmp_path)
    clients = [loop.peer("p" * (i + 1)) for i in range(5)]
    for i, c in enumerate(clients):
        loop.knock(knock(initiation(c, loop.gw_key, 1e9 + i), loop.clock.t))
        loop.answer(Lookup)
        loop.answer(Admit)
        loop.answer(Install)
    loop.clock.t += 40  # no heartbeat for 40 s: our claims may have expired
    loop.tick()
    loop.answer(Heartbeat)
    assert events(loop.out, "reassert_claims")

    def rechecks() -> list[Lookup]:
        return [e for e in loop.pending if isinstance(e, Lookup) and e.purpose is Purpose.RECHECK]

    sizes = []
    while rechecks():
        assert len(rechecks()) == 1
        sizes.append(len(rechecks()[0].keys))
        loop.answer(Lookup)
    assert sizes == [2, 2, 1]
    assert all(loop.store.get_peer("p" * (i + 1)).holder for i in range(5))  # type: ignore[union-attr]


def test_a_device_created_anew_during_a_sweeps_read_is_swept_again_at_once(loop: Loop) -> None:
    a = loop.peer("alice")
    loop.knock(knock(initiation(a, loop.gw_key, 1e9), loop.clock.t))
    loop.answer(Lookup)
    loop.answer(Admit)
    loop.answer(Install)
    loop.clock.t += 16
    loop.tick()  # the sweep's read starts (and takes its time)
    loop.answer(ReadIdentity)
    loop.dev.identity = lambda: "new"  # type: ignore[method-assign]
    loop.clock.t += 1.0
    loop.tick()
    loop.answer(ReadIdentity)
    assert events(loop.out, "device_changed")
    loop.answer(ReadHandshakes)  # the read (of the old device) ends after the change
    for _ in range(10):  # its steps; then the next sweep starts at once, not in 15 s
        loop.tick()
        if any(isinstance(e, ReadHandshakes) for e in loop.pending):
            break
    assert any(isinstance(e, ReadHandshakes) for e in loop.pending)
