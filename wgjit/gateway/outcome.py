"""What became of one knock: a stable label for logs, counters and metrics, and whether a held
initiation with that outcome goes on to the device."""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    """What became of one knock: a stable label for logs, counters and metrics."""

    INSTALLED = "installed"
    ALREADY_INSTALLED = "already_installed"
    OWN_INTERFACE = "own_interface"  # came through the tunnel itself: not a knock for us
    DUPLICATE = "duplicate"  # the same datagram seen again (bridge port + bridge) or replayed
    RATE_LIMITED = "rate_limited"
    COOKIE = "cookie"  # under load, no valid mac2: answered with a cookie reply, no DH
    MALFORMED = "malformed"
    BAD_MAC1 = "bad_mac1"
    BAD_STATIC = "bad_static"
    FORGED = "forged"  # static key decrypted, but the sender does not hold its private key
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    DISABLED = "disabled"
    EXPIRED = "expired"
    NEGATIVE_CACHED = "negative_cached"
    REPLAY = "replay"
    FUTURE = "future"  # timestamp too far ahead of the gateway's clock
    TIMEOUT = "timeout"  # still pending after the knock budget: fail-open
    OVERLOADED = "overloaded"  # too many knocks pending: fail-open
    STORE_UNAVAILABLE = "store_unavailable"  # the store is stalled: fail-open, nothing pending
    INSTALL_FAILED = "install_failed"  # a store or device call failed: fail-open
    ERROR = "error"  # an unexpected exception while judging this knock: fail-open
    WORKER_LOST = "worker_lost"  # its verify worker died or hung before answering: fail-open

    @property
    def accepts(self) -> bool:
        """Whether a held initiation with this outcome goes on to the device (hold mode).

        Dropped: what is known to be unwanted (unknown, revoked, forged, replayed, malformed,
        duplicate), and what is over a rate limit: passed on, a flood would reach the device,
        which past its own under-load mark answers everyone, real clients too, with cookie
        replies (and the kernel's limiter drops such senders too). Everything else passes: the
        device authenticates every initiation and ignores keys it does not have, so passing
        one admits nobody, while dropping a real client's initiation costs it a 5 s retry."""
        return self in ACCEPTS


ACCEPTS = frozenset(
    {
        Outcome.INSTALLED,
        Outcome.ALREADY_INSTALLED,
        Outcome.OWN_INTERFACE,
        Outcome.TIMEOUT,
        Outcome.OVERLOADED,
        Outcome.STORE_UNAVAILABLE,
        Outcome.INSTALL_FAILED,
        Outcome.ERROR,
        Outcome.WORKER_LOST,
    }
)
# knocks judged with an X25519 and a store look-up: the work cookie replies spare
COSTLY = frozenset(
    {
        Outcome.INSTALLED,
        Outcome.UNKNOWN,
        Outcome.FORGED,
        Outcome.BAD_STATIC,
        Outcome.REVOKED,
        Outcome.DISABLED,
        Outcome.EXPIRED,
        Outcome.FUTURE,
    }
)
# knocks that load turned away before any X25519 (cookie replies, rate limits): while under
# load they stand for the costly knocks they would have been
SPARED = frozenset({Outcome.COOKIE, Outcome.RATE_LIMITED})
# outcomes that are normal or too frequent for a line each at info level
QUIET = frozenset(
    {
        Outcome.DUPLICATE,
        Outcome.RATE_LIMITED,
        Outcome.NEGATIVE_CACHED,
        Outcome.ALREADY_INSTALLED,
        Outcome.MALFORMED,
        Outcome.BAD_MAC1,
        Outcome.OWN_INTERFACE,
        Outcome.COOKIE,
    }
)
