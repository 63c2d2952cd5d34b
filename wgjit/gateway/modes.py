"""Completion modes: where knocks come from and what a verdict does, one object per mode.

- `HoldMode`: initiations wait in an NFQUEUE (our own iptables rules, removed on exit); the
  verdict releases or drops each; the queue releases any packet held for 1 s by itself. An
  install that finishes after its initiation was released re-injects it, as replay does.
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

from wgjit.addr import Endpoint
from wgjit.capture.afpacket import CaptureError, PacketCapture
from wgjit.capture.answers import COOKIE_REPLY, Answer, AnswerCapture
from wgjit.capture.iptables import LimitCounter, QueueRules, RuleError
from wgjit.capture.nfqueue import Held, NfQueue, QueueError
from wgjit.capture.packet import Knock
from wgjit.capture.replay import Reinjector, ReplayError
from wgjit.events import EventLog
from wgjit.gateway.core import FALLBACK_RELEASE_RATE
from wgjit.gateway.effects import Invert, Verdict
from wgjit.gateway.limits import TokenBucket
from wgjit.gateway.outcome import Outcome
from wgjit.gateway.pace import ReleaseWindow, sender_index

MODES = ("auto", "hold", "replay", "invert", "none")
# releases a paced hold mode sends at once: below wireguard-go's under-load mark (128 waiting)
RELEASE_BURST: Final = 64
# hold mode re-injects a late install's initiation only this soon after it came: 5 s after its
# initiation a client sends a new one (a new sender index) and drops answers to the old one
LATE_WITHIN: Final = 4.0
# how long a re-injected copy is expected back through the queue (it goes through `lo` at
# once), and how many may wait or be expected at a time (each was authenticated and installed)
ECHO_WITHIN: Final = 2.0
ECHO_MAX: Final = 65536
# releases of installed peers' initiations kept by sender index (the newest this many), so that
# one the device answers with a cookie reply can be sent again, at most this many times
RESEND_MEMORY: Final = 16384
MAX_RESENDS: Final = 3


# a release with this verdict reaches a device that has the peer
_ON_DEVICE = frozenset({Outcome.INSTALLED, Outcome.ALREADY_INSTALLED})


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

    def readers(self) -> list[tuple[int, Callable[[], None]]]:
        """More sockets the loop watches for this mode: (fd, call when readable)."""
        return []

    def release_delay(self, now: float) -> float:
        """How long the oldest knock whose verdict is given has waited to be released."""
        return 0.0

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

    A herd's verdicts come in bursts of hundreds (one batch of installs), and a device handed
    more initiations at once than its own under-load mark (wireguard-go: 128 waiting, the
    kernel: 512) answers cookie replies to everyone for the next second, so each client waits
    for its 5 s retry. So releases are paced:

    - by the device's own answers (`window`, a pace.ReleaseWindow, with `answers`, the socket
      that sees them leave): at most the window's limit released and not answered yet; cookie
      replies the device sends halve the window;
    - and/or at most `release_rate` per second (bursts of RELEASE_BURST): a cap with a
      window, the only pace without one (0: none).

    Held packets are released in the order their verdicts came; drops are not paced (the
    device never sees them). The queue's 1 s release still applies: a paced release that
    reaches it goes then (counted as released late), whatever the window says.

    Late installs: a knock whose install outlasts its hold (the knock budget's fail-open
    verdict, or the queue's 1 s limit: a slow store, a herd) reached the device before the
    peer did, and the device ignored it. Once the install is done, its initiation is
    re-injected (`replier`, as replay mode does) if it is younger than LATE_WITHIN, paced like
    the held releases; so the client is answered when its peer is installed, not 5 s later.
    The copy comes back through the queue and is released as is: `_echoes` knows its bytes
    and source (the same bytes from another source are judged: a duplicate, dropped, so
    nobody can race our copy to point the peer's endpoint elsewhere).

    Device cookies: a release of an installed peer's initiation that the device answers with
    a cookie reply (it was past its own under-load mark; a release at the queue's hold limit
    goes whatever the window says) is sent again the same way: the client keeps its handshake
    state when it gets a cookie, so an answer to that initiation still completes it, where the
    cookie alone would make it wait for its 5 s retry. Cookied again, it is sent again, up to
    MAX_RESENDS times while younger than LATE_WITHIN; the window, which a cookie halves, paces
    that as everything else.

    What waits for the window goes in the order the knocks came, the oldest first: a held
    release, a late install or a cookied release."""

    name = "hold"

    def __init__(
        self,
        queue: NfQueue,
        log: EventLog,
        replier: Reinjector | None,
        release_rate: float = 0.0,
        *,
        window: ReleaseWindow | None = None,
        answers: AnswerCapture | None = None,
        clock: Callable[[], float] | None = None,
        limits: LimitCounter | None = None,
    ) -> None:
        self.queue = queue
        self.limits = limits  # what the kernel's per-source limit dropped
        self.log = log
        self.replier = replier
        self.clock = clock if clock is not None else time.monotonic
        self._cap = TokenBucket(release_rate, RELEASE_BURST) if release_rate > 0 else None
        self.window = window
        self.answers = answers
        self._paced: collections.deque[Held] = collections.deque()
        self.paced = 0  # releases that waited for the pace
        self.paced_max = 0  # the most that waited at once
        self.late = 0  # paced releases that waited until the queue's hold limit
        # re-injections waiting for the window (late installs, cookied releases): the knock,
        # and how many times it was re-sent before
        self._late: collections.deque[tuple[Knock, int]] = collections.deque()
        # re-injected payload -> (its source, until when expected back through the queue)
        self._echoes: dict[bytes, tuple[Endpoint, float]] = {}
        # sender index -> (the knock, times re-sent) of installed peers' releases
        self._installed_releases: collections.OrderedDict[int, tuple[Knock, int]] = (
            collections.OrderedDict()
        )
        self.reinjected = 0  # initiations re-injected (late installs, device cookies)
        self.reinject_missed = 0  # not re-injected (too old, re-sent enough, or it failed)
        self.cookie_resends = 0  # releases the device cookied, to be re-injected

    @property
    def pacing(self) -> bool:
        return self.window is not None or self._cap is not None

    def fileno(self) -> int:
        return self.queue.fileno()

    def readers(self) -> list[tuple[int, Callable[[], None]]]:
        if self.answers is None:
            return []
        return [(self.answers.fileno(), self.device_answers)]

    def read(self) -> Batch:
        held = self.queue.recv_batch()
        echoes = self._echoes
        if not echoes:
            return [(h.knock, h) for h in held]
        out: Batch = []
        for h in held:
            k = h.knock
            echo = echoes.get(k.payload)
            if echo is not None and echo[0] == k.source:
                del echoes[k.payload]
                self.queue.verdict(h, True)  # our own re-injection: already judged
            else:  # (the same bytes from elsewhere: judged, a duplicate)
                out.append((k, h))
        if len(out) < len(held):
            self.queue.flush()
        return out

    def verdict(self, v: Verdict) -> None:
        self._answer(v, self.log)
        held = v.ticket
        if v.outcome is Outcome.INSTALLED:
            # installed after its initiation left the queue (a fail-open verdict, or the
            # queue's hold limit): the device ignored it. One still paced goes on its own.
            before = v.had if held is None else held
            if isinstance(before, Held) and not self.queue.holds(before):
                self._late_install(v.knock)
                return
        if not isinstance(held, Held):
            return
        if v.outcome in _ON_DEVICE and self.window is not None and self.replier is not None:
            self._remember(held.knock)
        accept = v.outcome.accepts
        if accept and self.pacing:
            if self._paced or not self._may_release(self.clock()):
                self._paced.append(held)
                self.paced += 1
                self.paced_max = max(self.paced_max, len(self._paced))
                return
            self._released(held, self.clock())
        self.queue.verdict(held, accept)

    def release_delay(self, now: float) -> float:
        paced = self._paced
        while paced and not self.queue.holds(paced[0]):
            paced.popleft()  # released by the queue's 1 s limit meanwhile
        # the head was judged first; knocks are judged about in the order they came
        return now - paced[0].knock.received_at if paced else 0.0

    def _may_release(self, now: float) -> bool:
        """Whether one more may go to the device now (spends a token of the cap if so)."""
        if self.window is not None and self.window.room(now) <= 0:
            return False
        return self._cap is None or self._cap.allow(now)

    def _released(self, held: Held, now: float, *, forced: bool = False) -> None:
        if self.window is not None:
            self.window.release(sender_index(held.knock.payload), now, forced=forced)

    def _remember(self, knock: Knock, resends: int = 0) -> None:
        """A release of an installed peer's initiation, in case the device cookies it. Kept
        until the device answers it, or it is too old to be sent again (a release the device
        never answers is forgotten then: rekeys of every installed peer pass here)."""
        releases = self._installed_releases
        index = sender_index(knock.payload)
        releases.pop(index, None)
        releases[index] = (knock, resends)
        too_old = knock.received_at - LATE_WITHIN
        while releases:
            oldest, _ = next(iter(releases.values()))
            if oldest.received_at >= too_old and len(releases) <= RESEND_MEMORY:
                break
            releases.popitem(last=False)

    def _late_install(self, knock: Knock, resent: int = 0) -> None:
        """Send `knock` to the device again once the window lets it (too old: missed);
        `resent`: times it was re-sent already."""
        now = self.clock()
        if (
            self.replier is None
            or now - knock.received_at > LATE_WITHIN
            or len(self._echoes) + len(self._late) >= ECHO_MAX
        ):
            self.reinject_missed += 1
        elif self._paced or self._late or not self._may_release(now):
            self._late.append((knock, resent))
        else:
            self._reinject(knock, resent, now)

    def _reinject(self, knock: Knock, resent: int, now: float) -> None:
        assert self.replier is not None
        self._echoes[knock.payload] = (knock.source, now + ECHO_WITHIN)
        try:
            self.replier.send(knock)
        except OSError as e:
            del self._echoes[knock.payload]
            self.reinject_missed += 1
            self.log.debug("reinject_failed", error=str(e))
            return
        self.reinjected += 1
        if self.window is not None:
            self.window.release(sender_index(knock.payload), now)
            self._remember(knock, resent)  # the peer is installed: if cookied, again

    def device_answers(self) -> None:
        """The answer socket is readable: read what the device sent."""
        assert self.answers is not None
        try:
            answers = self.answers.recv_batch()
        except OSError as e:
            self.log.error("answer_watch_failed", error=str(e))
            return
        self.on_answers(answers, self.clock())

    def on_answers(self, answers: list[Answer], now: float) -> None:
        """The device's answers seen leaving: free their releases' slots, release more."""
        window = self.window
        if window is None:
            return
        releases = self._installed_releases
        for a in answers:
            cookie = a.kind == COOKIE_REPLY
            ours = window.answer(a.receiver, cookie, now)
            release = releases.pop(a.receiver, None) if releases else None
            if cookie and ours and release is not None:
                knock, resent = release
                if knock.payload in self._echoes:
                    # a second copy of this cookie (seen on a bridge and on its port), after
                    # the first one's re-send took the same index: that copy is on its way
                    releases[a.receiver] = release
                elif resent >= MAX_RESENDS:
                    self.reinject_missed += 1
                else:
                    self.cookie_resends += 1
                    self._late_install(knock, resent + 1)
        if self._paced or self._late:
            self._drain(now)
            self.queue.flush()

    def _drain(self, now: float) -> None:
        """Send what waits for the window, the oldest knock first: a held release, or a
        re-injection (a late install, a cookied release)."""
        paced, late = self._paced, self._late
        while True:
            while paced and not self.queue.holds(paced[0]):
                paced.popleft()  # released by the queue's 1 s limit meanwhile
            while late and now - late[0][0].received_at > LATE_WITHIN:
                late.popleft()
                self.reinject_missed += 1
            if not (paced or late) or not self._may_release(now):
                return
            if late and (not paced or late[0][0].received_at < paced[0].knock.received_at):
                self._reinject(*late.popleft(), now)
            else:
                held = paced.popleft()
                self._released(held, now)
                self.queue.verdict(held, True)

    def flush(self) -> None:
        self.queue.flush()

    def next_deadline(self) -> float | None:
        deadline = self.queue.next_deadline()
        if self._paced or self._late:
            now = self.clock()
            due: float | None = now
            if self.window is not None and self.window.room(now) <= 0:
                due = self.window.next_expiry()  # else an answer wakes the loop
            elif self._cap is not None:
                due = self._cap.next_token(now)
            if due is not None:
                deadline = due if deadline is None else min(deadline, due)
        elif self.window is not None and len(self.window):
            due = self.window.next_expiry()  # keeps the window's counters current
            if due is not None:
                deadline = due if deadline is None else min(deadline, due)
        return deadline

    def tick(self, now: float) -> None:
        if self.window is not None:
            self.window.expire(now)
        self._drain(now)
        echoes = self._echoes
        while echoes:  # in the order they were sent: the oldest first
            payload, (_, until) = next(iter(echoes.items()))
            if until > now:
                break
            del echoes[payload]  # never came back (or bypassed the queue)
        late = 0
        due = self.queue.next_deadline()
        if self._paced and due is not None and due <= now:
            # paced releases that reached the queue's hold limit go now (the queue would
            # release them anyway), counted in the window: they are on their way to the device
            limit = self.queue.hold_timeout
            keep: collections.deque[Held] = collections.deque()
            for held in self._paced:
                if not self.queue.holds(held):
                    continue
                if now - held.knock.received_at >= limit:
                    self._released(held, now, forced=True)
                    self.queue.verdict(held, True)
                    late += 1
                else:
                    keep.append(held)
            self._paced = keep
            self.late += late
        released = self.queue.expire(now) + late  # flushes
        if released:
            self.log.warning("held_too_long", released=released)

    def stats(self) -> dict[str, int]:
        out = {
            **self.queue.stats(),
            "source_limited": self.limits.value if self.limits is not None else 0,
            "queue_paced": self.paced,
            "queue_paced_max": self.paced_max,
            "reinjected": self.reinjected,
            "reinject_missed": self.reinject_missed,
            "device_cookies_resent": self.cookie_resends,
        }
        out["queue_expired"] += self.late  # released at the hold limit, by the queue or here
        if self.window is not None:
            out.update(self.window.stats())
        return out


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
    release_window: int = 0,
    source_limit: int = 0,
) -> Mode:
    """Open what `mode` needs (closed by `stack`); for `auto`, the first of hold, replay,
    invert that works. Raises ModeError when an explicitly requested mode cannot work.

    Hold mode paces releases by a window of `release_window` unanswered (0: none), capped at
    `release_rate` a second (0: no cap), and has the kernel drop what one source sends beyond
    `source_limit` initiations a second (0: no limit; warns if the kernel cannot). If the
    device's answers cannot be watched, it warns once and paces at `release_rate`, or
    FALLBACK_RELEASE_RATE if that is 0."""
    if mode in ("auto", "hold"):
        qnum = port if queue_num is None else queue_num
        try:
            queue = NfQueue(qnum, port)
            rules = QueueRules(port, qnum, ifname, source_limit=source_limit)
            try:
                rules.install()  # removes what it inserted if it fails half way
            except BaseException:
                queue.close()
                raise
            stack.enter_context(queue)
            stack.callback(rules.remove)  # runs before the queue is closed
            if rules.removed_stale:
                log.warning("stale_rules_removed", count=rules.removed_stale)
            limits = None
            if rules.limit_error is not None:
                log.warning("source_limit_unavailable", reason=rules.limit_error)
            elif source_limit:
                limits = LimitCounter(rules)
                stack.callback(limits.close)  # runs before the rules are removed
            replier = None
            try:
                replier = Reinjector()
                stack.callback(replier.close)
            except ReplayError as e:
                log.warning("cookies_unavailable", reason=str(e))
            window = answers = None
            if release_window > 0:
                try:
                    answers = AnswerCapture(port)
                    stack.callback(answers.close)
                    window = ReleaseWindow(release_window)
                except (CaptureError, OSError) as e:
                    release_rate = release_rate or FALLBACK_RELEASE_RATE
                    log.warning("release_window_unavailable", reason=str(e),
                                release_rate=release_rate)  # fmt: skip
            return HoldMode(queue, log, replier, release_rate, window=window, answers=answers,
                            limits=limits)  # fmt: skip
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
