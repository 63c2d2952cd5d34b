"""Hold mode's release window: releases paced by the device's own answers (sans-IO).

A WireGuard device marks itself under load when initiations pile up in its handshake queue
(wireguard-go: 128 waiting, the kernel: 512) and then answers every initiation without a valid
mac2 with a cookie reply for the next second, so each client waits for its 5 s retry. A herd's
verdicts come in bursts of hundreds; released at once, they pass that mark.

`ReleaseWindow` keeps the initiations released to the device and not answered yet below a
limit (the window), the way a transport keeps its unacknowledged data below a congestion
window. Each release is remembered by the initiation's sender index; the device's answer (a
type-2 response or a type-3 cookie reply, seen leaving the host) carries it back as its receiver
index, so an answer frees exactly the slot of the initiation it answers, and a second copy of
the same frame (seen on a bridge and on its port) matches nothing. A cookie reply means the
device passed its mark: the window halves (at most once per answer timeout); each response
grows it back by 1/window, up to the configured size. An initiation the device never answers
(it was lost, or the device ignores it: a key it does not have, a stale timestamp) leaves the
window once REORDER later releases were answered (the device works through its queue in
order), or after the answer timeout, which follows the device's measured answer time
(smoothed, like TCP's retransmission timeout) between MIN_TIMEOUT and MAX_TIMEOUT: nothing
stalls the window.

Takes the time as an argument (`now`, monotonic seconds); never does I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

# the window never shrinks below this many in flight
MIN_WINDOW: Final = 4
# an unanswered release leaves the window after the smoothed answer time plus 4 deviations,
# kept within these bounds (seconds); the start value before any answer was measured
MIN_TIMEOUT: Final = 0.05
MAX_TIMEOUT: Final = 0.5
INITIAL_TIMEOUT: Final = 0.25
# releases that timed out are still matched (late answers, counted) for this long
LATE_MEMORY: Final = 2.0
# a device works through its handshake queue in order, give or take its few workers: a
# release still unanswered once this many later releases were answered was passed over (the
# device ignores it: a key it does not have, a stale timestamp) and leaves the window then
REORDER: Final = 8


def sender_index(initiation: bytes) -> int:
    """The sender index of a handshake initiation (bytes 4-8, little-endian): the device's
    response and cookie reply carry it back as their receiver index."""
    return int.from_bytes(initiation[4:8], "little")


class ReleaseWindow:
    """Released initiations the device has not answered yet, at most `limit` of them."""

    def __init__(self, size: int, *, min_size: int = MIN_WINDOW) -> None:
        if size < 1:
            raise ValueError(f"a release window holds at least 1, not {size}")
        self.size = size  # the most the window grows to
        self.min_size = min(min_size, size)
        self.limit = float(size)  # now: halved by cookies, grown back by answers
        # sender index -> (release number, released at), in release order
        self._inflight: OrderedDict[int, tuple[int, float]] = OrderedDict()
        self._newest_answered = -1  # the release number of the newest release answered
        self._late: OrderedDict[int, float] = OrderedDict()  # timed out -> released at
        self._srtt: float | None = None
        self._rttvar = 0.0
        self.timeout = INITIAL_TIMEOUT
        self._no_backoff_until = float("-inf")
        self.released = 0
        self.answered = 0  # type-2 responses to our releases
        self.cookies = 0  # cookie replies the device sent to our releases
        self.unanswered = 0  # releases that timed out (some are answered late)
        self.late = 0  # answers that came after their release timed out
        self.backoffs = 0  # times a cookie halved the window
        self.inflight_max = 0  # the most in flight after a release the window allowed

    def __len__(self) -> int:
        """Releases in flight (not answered, not timed out as of the last expire())."""
        return len(self._inflight)

    def room(self, now: float) -> int:
        """How many more may be released now."""
        self.expire(now)
        return max(0, int(self.limit) - len(self._inflight))

    def release(self, index: int, now: float, *, forced: bool = False) -> None:
        """An initiation with sender index `index` was handed to the device: one room()
        allowed, or a `forced` one (the queue's hold limit let it go, room or not)."""
        inflight = self._inflight
        inflight.pop(index, None)  # the same index again (a copy of the same datagram)
        inflight[index] = (self.released, now)
        self.released += 1
        if not forced and len(inflight) > self.inflight_max:
            self.inflight_max = len(inflight)

    def answer(self, index: int, cookie: bool, now: float) -> bool:
        """The device answered receiver index `index` (a cookie reply if `cookie`); False if
        it answers none of our releases (a copy already counted, a rekey of an installed
        peer, the gateway's own cookie reply)."""
        entry = self._inflight.pop(index, None)
        if entry is None:
            released = self._late.pop(index, None)
            if released is None or now - released >= LATE_MEMORY:
                return False
            self.late += 1
        else:
            number, released = entry
            self._measure(now - released)
            self._newest_answered = max(self._newest_answered, number)
        if cookie:
            self.cookies += 1
            if now >= self._no_backoff_until:
                self.limit = max(float(self.min_size), self.limit / 2)
                self._no_backoff_until = now + self.timeout
                self.backoffs += 1
        else:
            self.answered += 1
            self.limit = min(float(self.size), self.limit + 1 / self.limit)
        return True

    def _measure(self, rtt: float) -> None:
        rtt = max(0.0, rtt)
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        self.timeout = min(MAX_TIMEOUT, max(MIN_TIMEOUT, self._srtt + 4 * self._rttvar))

    def expire(self, now: float) -> int:
        """Releases unanswered for longer than the timeout, or passed over (REORDER later
        ones answered), leave the window; how many."""
        inflight, late = self._inflight, self._late
        passed = self._newest_answered - REORDER
        n = 0
        while inflight:
            index, (number, released) = next(iter(inflight.items()))
            if now - released < self.timeout and number > passed:
                break
            del inflight[index]
            late[index] = released
            n += 1
        self.unanswered += n
        while late:
            index, released = next(iter(late.items()))
            if now - released < LATE_MEMORY and len(late) <= 16 * self.size:
                break
            del late[index]
        return n

    def next_expiry(self) -> float | None:
        """When the oldest release in flight times out (monotonic), or None."""
        for _, released in self._inflight.values():
            return released + self.timeout
        return None

    def stats(self) -> dict[str, int]:
        return {
            "release_window": int(self.limit),
            "release_inflight": len(self._inflight),
            "release_inflight_max": self.inflight_max,
            "release_timeout_ms": round(self.timeout * 1000),
            "device_answers": self.answered,
            "device_cookies": self.cookies,
            "release_unanswered": self.unanswered,
            "release_late_answers": self.late,
            "release_backoffs": self.backoffs,
        }
