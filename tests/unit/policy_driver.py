"""Drives the sans-IO gateway policy synchronously against a device and a store, for tests.

`SyncGateway.handle(knock)` feeds one knock, carries out every effect it leads to at once
(`run_inline`) and returns the knock's outcome. Verdicts are kept in `verdicts`. The clock is
one callable used as both monotonic and wall time, so tests move time by hand.
"""

from __future__ import annotations

from collections.abc import Callable

from wgjit.capture.packet import Knock
from wgjit.device import Device
from wgjit.events import EventLog
from wgjit.gateway.core import GatewayConfig, Installed, Policy
from wgjit.gateway.effects import Effect, Verdict, run_inline
from wgjit.gateway.outcome import Outcome
from wgjit.handshake import Responder
from wgjit.keys import PublicKey
from wgjit.store import Store


class SyncGateway:
    def __init__(
        self,
        device: Device,
        store: Store,
        config: GatewayConfig,
        log: EventLog,
        responder: Responder,
        clock: Callable[[], float],
    ) -> None:
        self.device, self.store, self.config, self.log = device, store, config, log
        self.clock = clock
        self.policy = Policy(responder, config, log, wall=clock)
        self.verdicts: list[Verdict] = []

    @property
    def responder(self) -> Responder:
        return self.policy.responder

    @responder.setter
    def responder(self, r: Responder) -> None:
        self.policy.responder = r

    @property
    def installed(self) -> dict[PublicKey, Installed]:
        return self.policy.installed

    @property
    def counters(self) -> dict[str, int]:
        return self.policy.counters

    def run(self, effects: list[Effect]) -> None:
        run_inline(
            effects,
            lambda e, r, err: self.policy.on_done(e, r, err, self.clock()),
            self.store,
            self.device,
            self.verdicts.append,
        )

    def start(self) -> None:
        self.run(self.policy.reconcile(self.device.handshakes(), self.clock()))

    def handle(self, knock: Knock) -> Outcome:
        seen = len(self.verdicts)
        self.run(self.policy.on_knocks([(knock, knock)], self.clock()))
        mine = [v.outcome for v in self.verdicts[seen:] if v.ticket is knock]
        assert len(mine) == 1, f"one verdict per knock, got {mine}"
        return mine[0]

    def tick(self) -> None:
        self.run(self.policy.on_tick(self.clock()))

    def sweep(self) -> None:
        self.policy._next_sweep = 0.0  # due now
        self.tick()
        while self.policy.sweeping:  # its steps
            self.tick()

    def poll_changes(self) -> None:
        self.policy.wake_changes()
        self.tick()
