"""wgjit.gateway.pool with real worker processes: the same answers as in-process verification,
one X25519 for unknown keys, dead and hung workers replaced with fail-open results, and the
policy driven through a pool (--workers 2) deciding as it does in-process."""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.policy_driver import SyncGateway
from tests.unit.test_gateway_core import Clock, FakeDevice, events, initiation, knock
from tests.wgref import reference_initiation, with_mac1
from wgjit.addr import Endpoint, parse_networks
from wgjit.events import EventLog
from wgjit.gateway.core import GatewayConfig
from wgjit.gateway.effects import (
    Admit,
    Effect,
    Install,
    Lookup,
    Verdict,
    Verify,
    perform,
    run_inline,
)
from wgjit.gateway.outcome import Outcome
from wgjit.gateway.pool import LOST, Job, Result, VerifyPool, source_affinity
from wgjit.handshake import (
    BadMac1,
    BadStatic,
    BadTimestamp,
    HandshakeError,
    Malformed,
    Opened,
    Responder,
    Verified,
    build_initiation,
)
from wgjit.keys import PrivateKey
from wgjit.store import open_store

GW = PrivateKey.from_hex("a8" + "11" * 30 + "47")
CLIENT = PrivateKey.from_hex("b0" + "22" * 30 + "58")
ATTACKER = PrivateKey.from_hex("c8" + "33" * 30 + "69")


@pytest.fixture(scope="module")
def pool() -> Iterator[VerifyPool]:
    with VerifyPool(GW, 2, hang_timeout=10.0) as p:
        yield p


def one(pool: VerifyPool, job: Job) -> Result:
    [(_, result)] = pool.run([job])
    return result


def test_valid_initiation_opened_then_verified_like_in_process(pool: VerifyPool) -> None:
    pkt = build_initiation(CLIENT, GW.public_key())
    expected = Responder(GW, static_cache_size=0).verify(pkt)
    job = Job(pkt, 5)
    opened = one(pool, job)
    # the worker has not authenticated this key before: it stops after the first X25519
    assert isinstance(opened, Opened)
    assert opened.public_key == CLIENT.public_key()
    verified = one(pool, Job(pkt, 0, opened, worker=job.worker))
    assert isinstance(verified, tuple)
    assert verified[1] == expected
    # now that worker has the static DH: the next initiation from the same source is
    # verified in one job
    pkt2 = build_initiation(CLIENT, GW.public_key())
    again = one(pool, Job(pkt2, 5))
    assert isinstance(again, tuple)
    assert again[1] == Responder(GW).verify(pkt2)


def test_unknown_key_costs_one_x25519_and_forgery_is_refused(pool: VerifyPool) -> None:
    claimed = PrivateKey.generate().public_key()
    forged = reference_initiation(claimed, ATTACKER, GW.public_key())
    job = Job(forged, 9)
    opened = one(pool, job)
    assert isinstance(opened, Opened) and opened.public_key == claimed  # no timestamp tried
    assert opened.public_key == Responder(GW).open_static(forged).public_key
    # a claim of a key the policy knows: the AUTH job finds the forgery
    result = one(pool, Job(forged, 0, opened, worker=job.worker))
    assert isinstance(result, BadTimestamp)
    with pytest.raises(BadTimestamp):
        Responder(GW).verify(forged)


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda p: b"\x02" + p[1:], Malformed),
        (lambda p: p[:1] + b"\x01" + p[2:], Malformed),
        (lambda p: p[:120] + bytes(1 ^ p[120] for _ in [0]) + p[121:], BadMac1),
        (lambda p: with_mac1(p[:50] + bytes([p[50] ^ 1]) + p[51:], GW.public_key()), BadStatic),
    ],
)
def test_malformed_and_bad_packets_rejected_like_in_process(
    pool: VerifyPool, mutate: object, error: type[HandshakeError]
) -> None:
    pkt = mutate(build_initiation(CLIENT, GW.public_key()))  # type: ignore[operator]
    with pytest.raises(error):
        Responder(GW).verify(pkt)
    assert isinstance(one(pool, Job(pkt, 1, mac1_checked=False)), error)


def test_a_killed_worker_is_replaced_and_its_jobs_come_back_lost() -> None:
    with VerifyPool(GW, 2, hang_timeout=5.0) as pool:
        pkt = build_initiation(CLIENT, GW.public_key())
        assert isinstance(one(pool, Job(pkt, 0)), Opened)  # both started
        victim = pool.pids()[0]
        os.kill(victim, signal.SIGSTOP)  # so the jobs are surely in flight when it dies
        jobs = [Job(pkt, 0) for _ in range(5)]  # affinity 0: worker 0
        for j in jobs:
            assert pool.submit(j)
        assert pool.flush() == []
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        lost: list[tuple[Job, Result]] = []
        while len(lost) < 5 and time.monotonic() < deadline:
            lost += pool.check()
            for fd in pool.fds():
                lost += pool.read(fd)
            time.sleep(0.01)
        assert sorted(id(j) for j, r in lost if r is LOST) == sorted(map(id, jobs))
        assert pool.restarts == 1 and pool.lost == 5
        assert victim not in pool.pids()
        # the successor works
        assert isinstance(one(pool, Job(pkt, 0)), Opened)


def test_a_hung_worker_is_replaced_after_the_hang_timeout() -> None:
    with VerifyPool(GW, 1, hang_timeout=1.0) as pool:
        pkt = build_initiation(CLIENT, GW.public_key())
        assert isinstance(one(pool, Job(pkt, 0)), Opened)
        stuck = pool.pids()[0]
        os.kill(stuck, signal.SIGSTOP)
        results = pool.run([Job(pkt, 0), Job(pkt, 0)], timeout=5.0)
        assert [r for _, r in results] == [LOST, LOST]
        assert pool.pids()[0] != stuck
        assert isinstance(one(pool, Job(pkt, 0)), Opened)


def test_full_pool_refuses_and_close_reaps_every_worker() -> None:
    pool = VerifyPool(GW, 1, inflight=2)
    pkt = build_initiation(CLIENT, GW.public_key())
    assert pool.submit(Job(pkt, 0)) and pool.submit(Job(pkt, 0))
    assert not pool.submit(Job(pkt, 0))
    pids = pool.pids()
    pool.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


# --- the policy through a pool -----------------------------------------------------------------


class PooledGateway(SyncGateway):
    """SyncGateway whose Verify effects go through a real pool (as the loop sends them)."""

    pool: VerifyPool
    jobs: list[Job]

    def run(self, effects: list[Effect]) -> None:
        while effects:
            verify = [e for e in effects if isinstance(e, Verify)]

            def on_done(e: Effect, r: object, err: Exception | None,
                        held: list[Verify] = verify) -> list[Effect]:  # fmt: skip
                out = self.policy.on_done(e, r, err, self.clock())
                held.extend(x for x in out if isinstance(x, Verify))
                return [x for x in out if not isinstance(x, Verify)]

            rest = [e for e in effects if not isinstance(e, Verify)]
            run_inline(rest, on_done, self.store, self.device, self.verdicts.append)
            jobs = []
            for e in verify:
                src = e.knock.source
                affinity = source_affinity(src.host.packed, src.port)
                jobs.append(Job(e.knock.payload, affinity, e.opened, context=e, worker=e.worker))
            self.jobs += jobs
            results: list[tuple[Verify, object]] = []
            for j, r in self.pool.run(jobs):
                c = j.context
                assert isinstance(c, Verify)
                v = Verify(c.knock, c.ticket, c.opened, j.worker, c.waiter)
                results.append((v, Outcome.WORKER_LOST if r is LOST else r))
            effects = self.policy.on_verified(results, self.clock()) if results else []


@pytest.fixture
def gw(tmp_path: Path, pool: VerifyPool) -> Iterator[tuple[PooledGateway, FakeDevice, io.StringIO]]:
    dev = FakeDevice(GW)
    store = open_store(str(tmp_path / "peers.db"))
    store.add_peer("alice", CLIENT.public_key(), parse_networks("100.65.0.11/32"))
    out = io.StringIO()
    g = PooledGateway(dev, store, GatewayConfig(workers=2), EventLog(out), Responder(GW), Clock())
    g.pool, g.jobs = pool, []
    g.start()
    yield g, dev, out
    store.close()


def test_policy_through_the_pool_installs_known_and_refuses_unknown_and_forged(
    gw: tuple[PooledGateway, FakeDevice, io.StringIO],
) -> None:
    g, dev, out = gw
    clock = g.clock
    t = 1e9
    assert g.handle(knock(initiation(CLIENT, GW, t), clock())) == "installed"
    assert CLIENT.public_key() in dev.peers
    # unknown key: one OPEN job, no AUTH job
    stranger = PrivateKey.generate()
    g.jobs.clear()
    assert g.handle(knock(initiation(stranger, GW, t), clock())) == "unknown"
    assert [j.opened for j in g.jobs] == [None]
    assert stranger.public_key() not in dev.peers
    # forged claim of the installed key: refused, nothing on the device changes
    forged = reference_initiation(CLIENT.public_key(), ATTACKER, GW.public_key())
    calls = len(dev.calls)
    assert g.handle(knock(forged, clock())) == "forged"
    assert len(dev.calls) == calls
    assert events(out, "reject")[-1]["reason"] == "forged"


class CountingResponder(Responder):
    """The loop's responder, counting the static·static work it does itself."""

    __slots__ = ("authenticated",)

    def __init__(self, key: PrivateKey) -> None:
        super().__init__(key)
        self.authenticated: list[Opened] = []

    def authenticate(self, opened: Opened) -> Verified:
        self.authenticated.append(opened)
        return super().authenticate(opened)


def test_a_new_known_peer_is_authenticated_on_its_worker_not_in_the_loop(
    gw: tuple[PooledGateway, FakeDevice, io.StringIO],
) -> None:
    g, dev, out = gw
    loop = g.responder = CountingResponder(GW)
    bob = PrivateKey.generate()  # no worker has seen it
    g.store.add_peer("bob", bob.public_key(), parse_networks("100.65.0.13/32"))
    g.jobs.clear()
    assert g.handle(knock(initiation(bob, GW, 1e9), g.clock())) == "installed"
    assert bob.public_key() in dev.peers
    # OPEN, then (known after the look-up) AUTH on the worker that opened it
    assert [j.opened is not None for j in g.jobs] == [False, True]
    assert g.jobs[0].worker == g.jobs[1].worker
    assert loop.authenticated == []
    # a forged claim of a stored key that is not installed: refused by its worker
    victim = PrivateKey.generate()
    g.store.add_peer("victim", victim.public_key(), parse_networks("100.65.0.12/32"))
    forged = reference_initiation(victim.public_key(), ATTACKER, GW.public_key())
    assert g.handle(knock(forged, g.clock())) == "forged"
    assert victim.public_key() not in dev.peers
    assert loop.authenticated == []
    assert events(out, "reject")[-1]["reason"] == "forged"


def test_installed_peer_rekeys_verified_by_the_warm_worker(
    gw: tuple[PooledGateway, FakeDevice, io.StringIO],
) -> None:
    g, dev, _ = gw
    carol = PrivateKey.generate()  # no worker has seen it
    g.store.add_peer("carol", carol.public_key(), parse_networks("100.65.0.14/32"))
    src = Endpoint.parse("198.18.0.77:41000")
    g.jobs.clear()
    assert g.handle(knock(initiation(carol, GW, 1e9), g.clock(), src)) == "installed"
    first = g.jobs[0].worker
    g.responder = Responder(GW)  # the loop's own static-DH cache cold, as after a restart
    # a rekey from the same source: its worker authenticated the key at install, so the
    # OPEN job comes back verified
    g.jobs.clear()
    assert g.handle(knock(initiation(carol, GW, 1e9 + 1), g.clock(), src)) == "already_installed"
    assert [(j.opened, j.worker) for j in g.jobs] == [(None, first)]
    # the client roams to a source the other worker serves: OPEN, then AUTH there (which
    # caches the static DH), and the next rekey from there is one job again
    port = next(p for p in range(40000, 41000)
                if source_affinity(src.host.packed, p) % 2 != first)  # fmt: skip
    roamed = Endpoint.parse(f"198.18.0.77:{port}")
    g.jobs.clear()
    assert g.handle(knock(initiation(carol, GW, 1e9 + 2), g.clock(), roamed)) == "already_installed"
    assert [(j.opened is not None, j.worker) for j in g.jobs] == [
        (False, 1 - first),
        (True, 1 - first),
    ]
    g.jobs.clear()
    assert g.handle(knock(initiation(carol, GW, 1e9 + 3), g.clock(), roamed)) == "already_installed"
    assert [(j.opened, j.worker) for j in g.jobs] == [(None, 1 - first)]


def test_lost_verify_jobs_get_a_fail_open_verdict(
    gw: tuple[PooledGateway, FakeDevice, io.StringIO],
) -> None:
    g, _, _ = gw
    k = knock(initiation(CLIENT, GW, 1e9), g.clock())
    out = g.policy.on_verified([(Verify(k, k), Outcome.WORKER_LOST)], g.clock())
    [verdict] = out
    assert isinstance(verdict, Verdict)
    assert verdict.outcome is Outcome.WORKER_LOST and verdict.outcome.accepts
    assert g.counters["worker_lost"] == 1


def test_a_worker_that_cannot_be_restarted_leaves_its_jobs_to_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with VerifyPool(GW, 2, hang_timeout=5.0) as pool:
        pkt = build_initiation(CLIENT, GW.public_key())
        victim = pool.pids()[0]
        os.kill(victim, signal.SIGKILL)
        os.waitpid(victim, 0)  # (reaped here: the pool only polls it)

        def no_processes_left(self: VerifyPool, index: int) -> None:
            raise BlockingIOError(11, "Resource temporarily unavailable")  # fork's EAGAIN

        with monkeypatch.context() as m:
            m.setattr(VerifyPool, "_start", no_processes_left)
            deadline = time.monotonic() + 10
            while len(pool.pids()) == 2 and time.monotonic() < deadline:
                pool.check()
            assert len(pool.pids()) == 1
            # a job for the dead worker's share goes to the live one
            [(job, result)] = pool.run([Job(pkt, 0)])
            assert isinstance(result, Opened) and job.worker == 1
        pool.check()  # spawning works again: the slot gets its worker back
        assert len(pool.pids()) == 2
        [(job, result)] = pool.run([Job(pkt, 0)])
        assert isinstance(result, Opened) and job.worker == 0


def test_knocks_during_an_admission_are_authenticated_on_their_worker(
    gw: tuple[PooledGateway, FakeDevice, io.StringIO],
) -> None:
    """Step by step: a second knock (and a forgery) of a key whose admission is under way go
    to a worker for their static DH; the genuine one is answered once the peer is installed,
    the forgery refused, and the loop does no X25519."""
    g, dev, _ = gw
    policy, now = g.policy, g.clock()
    loop = g.responder = CountingResponder(GW)
    dave = PrivateKey.generate()
    g.store.add_peer("dave", dave.public_key(), parse_networks("100.65.0.15/32"))

    def through_pool(effects: list[Effect], affinity: int = 0) -> list[Effect]:
        jobs = [Job(e.knock.payload, affinity, e.opened, context=e, worker=e.worker)
                for e in effects if isinstance(e, Verify)]  # fmt: skip
        results: list[tuple[Verify, object]] = []
        for j, r in g.pool.run(jobs):
            c = j.context
            assert isinstance(c, Verify)
            results.append((Verify(c.knock, c.ticket, c.opened, j.worker, c.waiter), r))
        return policy.on_verified(results, now)

    def only(effects: list[Effect], kind: type) -> Effect:
        [e] = effects
        assert isinstance(e, kind), effects
        return e

    k1 = knock(initiation(dave, GW, 1e9), now)
    lookup = only(through_pool(policy.on_knocks([(k1, k1)], now)), Lookup)
    auth = policy.on_done(lookup, perform(lookup, g.store, dev), None, now)
    admit = only(through_pool(auth), Admit)  # authenticated on its worker
    # the admission is under way: a retry of the client, and a forgery of its key
    k2 = knock(initiation(dave, GW, 1e9 + 1), now, Endpoint.parse("198.18.0.12:40001"))
    k3 = knock(reference_initiation(dave.public_key(), ATTACKER, GW.public_key()), now,
               Endpoint.parse("198.18.0.13:40002"))  # fmt: skip
    # (opened by the other worker, which has not authenticated dave: affinity 1)
    opened = through_pool(policy.on_knocks([(k2, k2), (k3, k3)], now), affinity=1)
    assert [isinstance(e, Verify) and e.opened is not None for e in opened] == [True, True]
    install = only(policy.on_done(admit, perform(admit, g.store, dev), None, now), Install)
    done = policy.on_done(install, perform(install, g.store, dev), None, now)
    verdicts = [v for v in done if isinstance(v, Verdict)]
    assert [(v.ticket, v.outcome) for v in verdicts] == [(k1, Outcome.INSTALLED)]
    # the workers answer after the install: the retry is an installed peer's, the forgery not
    late = through_pool(opened)
    verdicts = [v for v in late if isinstance(v, Verdict)]
    assert {v.ticket: v.outcome for v in verdicts} == {
        k2: Outcome.ALREADY_INSTALLED, k3: Outcome.FORGED}  # fmt: skip
    assert loop.authenticated == []
    assert dave.public_key() in dev.peers


def test_a_worker_that_dies_at_start_is_started_again_after_a_growing_pause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t = [0.0]
    with VerifyPool(GW, 1, clock=lambda: t[0]) as pool:
        pkt = build_initiation(CLIENT, GW.public_key())
        with monkeypatch.context() as m:
            m.setattr(sys, "executable", "/bin/false")  # a worker that exits at once
            os.kill(pool.pids()[0], signal.SIGKILL)
            deadline = time.monotonic() + 10
            while pool.restarts == 0 and time.monotonic() < deadline:
                pool.check()  # the killed one (it was ready): replaced at once
            assert pool.restarts == 1
            while not pool._workers[0].dead and time.monotonic() < deadline:
                pool.check()  # the successor exits before it is ready
                time.sleep(0.01)
            for _ in range(5):
                pool.check()
            assert pool.restarts == 1, "started again without a pause"
            assert not pool.submit(Job(pkt, 0))  # no worker: refused
        t[0] += 1.1  # the pause (1 s the first time) is over
        pool.check()
        assert pool.restarts == 2
        pool.wait_ready()
        [(_, result)] = pool.run([Job(pkt, 0)])
        assert isinstance(result, Opened)
