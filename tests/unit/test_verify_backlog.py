"""The loop's verify backlog: a herd larger than the worker pool's in-flight limit waits for
free slots in order instead of getting fail-open verdicts. Real verify worker processes, a
real SQLite store, the fake device of test_gateway_core, the loop's own reactor."""

from __future__ import annotations

import io
import time
from pathlib import Path

from tests.unit.test_gateway_core import FakeDevice, initiation, knock
from wgjit.addr import Endpoint, parse_networks
from wgjit.events import EventLog
from wgjit.gateway.core import GatewayConfig, Policy
from wgjit.gateway.effects import Effect, Verdict, run_inline
from wgjit.gateway.modes import Mode
from wgjit.gateway.pool import VerifyPool
from wgjit.gateway.reactor import Reactor, Workers
from wgjit.gateway.run import DEVICE, STORE, SWEEP, _Loop
from wgjit.handshake import Responder
from wgjit.keys import PrivateKey
from wgjit.store import open_store


class Recording(Mode):
    def __init__(self) -> None:
        self.verdicts: list[Verdict] = []

    def verdict(self, v: Verdict) -> None:
        self.verdicts.append(v)


def test_a_herd_over_the_pools_inflight_limit_waits_in_order_and_is_installed(
    tmp_path: Path,
) -> None:
    gw = PrivateKey.generate()
    store = open_store(str(tmp_path / "peers.db"))
    clients = [PrivateKey.generate() for _ in range(40)]
    for i, c in enumerate(clients):
        store.add_peer(f"p{i}", c.public_key(), parse_networks(f"100.65.0.{i + 1}/32"))
    dev = FakeDevice(gw)
    log = EventLog(io.StringIO())
    policy = Policy(Responder(gw), GatewayConfig(workers=2, global_rate=1e9), log, time.time)
    def done(e: Effect, r: object, err: Exception | None) -> list[Effect]:
        return policy.on_done(e, r, err, time.monotonic())

    run_inline(policy.reconcile(dev.handshakes(), time.monotonic()), done, store, dev)
    pool = VerifyPool(gw, 2, inflight=1)  # two in flight at most
    reactor = Reactor()
    workers = Workers(reactor, {STORE: 1, DEVICE: 1, SWEEP: 1})
    loop = _Loop(policy, store, dev, None, reactor, workers, log, None, pool)
    mode = loop.mode = Recording()
    try:
        loop._watch_pool()
        now = time.monotonic()
        batch = [
            (k := knock(initiation(c, gw, 1e9 + 1), now, Endpoint.parse(f"198.18.0.{i + 1}:4000")),
             k)
            for i, c in enumerate(clients)
        ]  # fmt: skip
        loop.apply(policy.on_knocks(batch, now))
        assert len(loop._backlog) == 38  # two went to the workers, the rest wait
        deadline = time.monotonic() + 20
        while len(dev.peers) < 40 or len({id(v.ticket) for v in mode.verdicts}) < 40:
            assert time.monotonic() < deadline, loop.stats()
            reactor.run_once(0.05)
        outcomes = {v.outcome for v in mode.verdicts}
        assert outcomes == {"installed"}, loop.stats()
        assert set(dev.peers) == {c.public_key() for c in clients}
        assert not loop._backlog and loop.stats()["verify_backlog"] == 0
    finally:
        pool.close()
        workers.close(5)
        reactor.close()
