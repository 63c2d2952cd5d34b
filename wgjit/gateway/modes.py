"""Completion modes: where knocks come from and what a verdict does, one object per mode.

- `HoldMode`: initiations wait in an NFQUEUE (our own iptables rules, removed on exit); the
  verdict releases or drops each; the queue releases any packet held for 1 s by itself.
- `ReplayMode`: AF_PACKET copies; an install re-injects the captured initiation.
- `InvertMode`: AF_PACKET copies; an install makes the device initiate back, `invert_delay`
  after the knock (so the device is done with the client's own initiation first).
- `WatchMode`: AF_PACKET copies and nothing else (`--testing-no-completion`).

`open_mode()` opens what a mode needs; `auto` takes the first of hold, replay, invert that works
here. A mode decides no verdict: the policy does. Everything here runs on the loop's thread and
never blocks (device work for invert goes through `submit`).
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable
from typing import Final

from wgjit.capture.afpacket import PacketCapture
from wgjit.capture.iptables import QueueRules, RuleError
from wgjit.capture.nfqueue import Held, NfQueue, QueueError
from wgjit.capture.packet import Knock
from wgjit.capture.replay import Reinjector, ReplayError
from wgjit.events import EventLog
from wgjit.gateway.effects import Invert, Verdict
from wgjit.gateway.limits import TokenBucket
from wgjit.gateway.outcome import Outcome

MODES = ("auto", "hold", "replay", "invert", "none")
# releases a paced hold mode sends at once: below wireguard-go's under-load mark (128 waiting)
RELEASE_BURST: Final = 64


class ModeError(RuntimeError):
    """The requested mode cannot work here; the message says why."""


Batch = list[tuple[Knock, object]]


class Mode:
    name = ""
    # sends cookie replies (Verdict.reply) back to knocks' senders
    replier: Reinjector | None = None

    def fileno(self) -> int:
        raise NotImplementedError

    def read(self) -> Batch:
        """The knocks waiting now (never blocks), each with its verdict ticket."""
        raise NotImplementedError

    def verdict(self, v: Verdict) -> None:
        """Act on one knock's outcome."""

    def _answer(self, v: Verdict, log: EventLog) -> None:
        if v.reply is not None and self.replier is not None:
            try:
                self.replier.answer(v.knock, v.reply)
            except OSError as e:
                log.debug("cookie_reply_failed", error=str(e))

    def flush(self) -> None:
        """Send what verdict() queued."""

    def next_deadline(self) -> float | None:
        return None

    def tick(self, now: float) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {}


class _Capture(Mode):
    """Modes that see copies of initiations (the device gets the originals)."""

    def __init__(self, capture: PacketCapture) -> None:
        self.capture = capture

    def fileno(self) -> int:
        return self.capture.fileno()

    def read(self) -> Batch:
        return [(k, k) for k in self.capture.recv_batch()]

    def stats(self) -> dict[str, int]:
        packets, drops = self.capture.stats()
        return {"captured": packets, "capture_drops": drops}


class WatchMode(_Capture):
    name = "none"


class ReplayMode(_Capture):
    name = "replay"

    def __init__(self, capture: PacketCapture, reinjector: Reinjector, log: EventLog) -> None:
        super().__init__(capture)
        self.reinjector = self.replier = reinjector
        self.log = log

    def verdict(self, v: Verdict) -> None:
        self._answer(v, self.log)
        if v.outcome is Outcome.INSTALLED:
            try:
                self.reinjector.send(v.knock)
            except (ReplayError, OSError) as e:
                self.log.error("replay_failed", error=str(e))

    def stats(self) -> dict[str, int]:
        r = self.reinjector
        return {**super().stats(), "replayed": r.sent, "replay_errors": r.errors}


class InvertMode(_Capture):
    name = "invert"

    def __init__(
        self,
        capture: PacketCapture,
        delay: float,
        call_at: Callable[[float, Callable[[], None]], None],
        submit: Callable[[Invert], None],
    ) -> None:
        super().__init__(capture)
        self.delay = delay
        self.call_at = call_at
        self.submit = submit

    def verdict(self, v: Verdict) -> None:
        key = v.key
        if v.outcome is Outcome.INSTALLED and key is not None:
            self.call_at(v.knock.received_at + self.delay, lambda: self.submit(Invert(key)))


class HoldMode(Mode):
    """Initiations wait in an NFQUEUE for their verdict.

    Releases are paced (`release_rate` per second, bursts of RELEASE_BURST; 0: unpaced): a
    herd's verdicts come in bursts of hundreds (one batch of installs), and a device handed
    more initiations at once than its own under-load mark (wireguard-go: 128 waiting, the
    kernel: 512) answers cookie replies to everyone for the next second, so each client waits
    for its 5 s retry. Held packets are released in the order their verdicts came; drops
    are not paced (the device never sees them). The queue's 1 s release still applies."""

    name = "hold"

    def __init__(
        self, queue: NfQueue, log: EventLog, replier: Reinjector | None, release_rate: float = 0.0
    ) -> None:
        self.queue = queue
        self.log = log
        self.replier = replier
        self._pace = TokenBucket(release_rate, RELEASE_BURST) if release_rate > 0 else None
        self._paced: collections.deque[Held] = collections.deque()
        self.paced = 0  # releases that waited for the pace
        self.paced_max = 0  # the most that waited at once

    def fileno(self) -> int:
        return self.queue.fileno()

    def read(self) -> Batch:
        return [(h.knock, h) for h in self.queue.recv_batch()]

    def verdict(self, v: Verdict) -> None:
        self._answer(v, self.log)
        held = v.ticket
        if not isinstance(held, Held):
            return
        accept = v.outcome.accepts
        if (
            accept
            and self._pace is not None
            and (self._paced or not self._pace.allow(time.monotonic()))
        ):
            self._paced.append(held)
            self.paced += 1
            self.paced_max = max(self.paced_max, len(self._paced))
            return
        self.queue.verdict(held, accept)

    def flush(self) -> None:
        self.queue.flush()

    def next_deadline(self) -> float | None:
        deadline = self.queue.next_deadline()
        if self._paced and self._pace is not None:
            due = self._pace.next_token(time.monotonic())
            deadline = due if deadline is None else min(deadline, due)
        return deadline

    def tick(self, now: float) -> None:
        paced, pace = self._paced, self._pace
        while paced and pace is not None:
            if not self.queue.holds(paced[0]):
                paced.popleft()  # released by the queue's 1 s limit meanwhile
            elif pace.allow(now):
                self.queue.verdict(paced.popleft(), True)
            else:
                break
        released = self.queue.expire(now)  # flushes
        if released:
            self.log.warning("held_too_long", released=released)
            if paced:
                self._paced = collections.deque(h for h in paced if self.queue.holds(h))

    def stats(self) -> dict[str, int]:
        return {**self.queue.stats(), "queue_paced": self.paced, "queue_paced_max": self.paced_max}


def open_mode(
    stack: contextlib.ExitStack,
    mode: str,
    *,
    port: int,
    queue_num: int | None,
    ifname: str,
    capture_interface: str | None,
    invert_delay: float,
    call_at: Callable[[float, Callable[[], None]], None],
    submit: Callable[[Invert], None],
    log: EventLog,
    release_rate: float = 0.0,
) -> Mode:
    """Open what `mode` needs (closed by `stack`); for `auto`, the first of hold, replay,
    invert that works. Raises ModeError when an explicitly requested mode cannot work."""
    if mode in ("auto", "hold"):
        qnum = port if queue_num is None else queue_num
        try:
            queue = NfQueue(qnum, port)
            rules = QueueRules(port, qnum, ifname)
            try:
                rules.install()  # removes what it inserted if it fails half way
            except BaseException:
                queue.close()
                raise
            stack.enter_context(queue)
            stack.callback(rules.remove)  # runs before the queue is closed
            if rules.removed_stale:
                log.warning("stale_rules_removed", count=rules.removed_stale)
            replier = None
            try:
                replier = Reinjector()
                stack.callback(replier.close)
            except ReplayError as e:
                log.warning("cookies_unavailable", reason=str(e))
            return HoldMode(queue, log, replier, release_rate)
        except (QueueError, RuleError, OSError) as e:
            if mode == "hold":
                raise ModeError(f"--mode hold: {e}") from None
            log.warning("mode_unavailable", mode="hold", reason=str(e))
    reinjector = None
    if mode in ("auto", "replay"):
        try:
            reinjector = Reinjector()
            stack.callback(reinjector.close)
        except ReplayError as e:
            if mode == "replay":
                raise ModeError(f"--mode replay: {e}") from None
            log.warning("mode_unavailable", mode="replay", reason=str(e))
    capture = stack.enter_context(PacketCapture(port, interface=capture_interface))
    if reinjector is not None:
        return ReplayMode(capture, reinjector, log)
    if mode == "none":
        return WatchMode(capture)
    return InvertMode(capture, invert_delay, call_at, submit)
