"""The gateway's policy as a sans-IO state machine: events in, effects out.

`Policy` never calls the store or the device. It takes events — a batch of captured knocks
(`on_knocks`), the result of an effect it asked for (`on_done`), a clock tick (`on_tick`) — and
returns effects (`wgjit.gateway.effects`): look peers up, admit (anti-replay + claim), install,
remove, read the device's handshake times, read the change feed, and one `Verdict` per knock.
The loop (`wgjit.gateway.run`) carries effects out on worker threads and feeds results back, so a
slow store or device never holds the packet path; tests drive the same policy synchronously.

Every knock gets exactly one verdict. Order on the hot path, cheapest first: own-interface and
duplicate drops, mac1 (one BLAKE2s), per-source then global rate limits, static-key decryption
(one X25519). An installed peer is then judged from memory (cached static DH + timestamp) with
no store or device call. Any other key waits for a look-up (coalesced per key, batched per
knock batch), then authentication, the stored anti-replay mark, admission (the mark advanced
atomically in the store, the peer claimed) and the install. A knock still pending after
`knock_budget` gets a fail-open verdict (the device refuses keys it does not have); a result
that comes back after `max_install_age` installs nothing.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
import socket
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from wgjit.addr import Endpoint, IPNetwork
from wgjit.capture.iptables import MAX_SOURCE_LIMIT as MAX_SOURCE_LIMIT
from wgjit.capture.packet import Knock
from wgjit.cookie import CookieChecker
from wgjit.device import PeerStats, StatsDump
from wgjit.errors import WgjitError
from wgjit.events import EventLog
from wgjit.gateway.effects import (
    Admit,
    Admitted,
    Changes,
    Claim,
    Effect,
    Heartbeat,
    Install,
    Lookup,
    Purpose,
    ReadChanges,
    ReadHandshakes,
    ReadIdentity,
    RecordHandshakes,
    RecordTraffic,
    Release,
    Remove,
    StatsChunk,
    Update,
    Verdict,
    Verify,
)
from wgjit.gateway.limits import LRU, KeyedRateLimiter, SeenFilter, TokenBucket, TTLSet
from wgjit.gateway.outcome import COSTLY, SPARED, Outcome
from wgjit.gateway.outcome import QUIET as _QUIET
from wgjit.handshake import (
    OFF_EPHEMERAL,
    OFF_MAC1,
    OFF_MAC2,
    OFF_TIMESTAMP,
    HandshakeError,
    Opened,
    Responder,
    Verified,
)
from wgjit.keys import PresharedKey, PublicKey
from wgjit.store import PRESENCE_TTL_S, ChangeFeedExpired, Handshake, Peer, Traffic

# WireGuard's REJECT_AFTER_TIME (messages.h): a session older than this is dead, so evicting a
# peer idle for longer can never cut a live session.
REJECT_AFTER_TIME = 180.0
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_SWEEP_INTERVAL = 15.0
MIN_SWEEP_INTERVAL = 1.0
# A held initiation is released by the queue itself 1 s after the kernel queued it
# (nfqueue.DEFAULT_HOLD_TIMEOUT); the policy gives its own fail-open verdict a little earlier.
DEFAULT_KNOCK_BUDGET = 0.8
# A client retries its initiation after REKEY_TIMEOUT (5 s, messages.h); a result older than
# this would install the peer with an endpoint the client may have left.
DEFAULT_MAX_INSTALL_AGE = 3.0
DEFAULT_MAX_CLOCK_SKEW = 3600.0
# messages.h UNDER_LOAD_AFTER_TIME: load lasts this long after its last sign
UNDER_LOAD_FOR = 1.0
# A late knock means load only if LOAD_WORK_MIN knocks were judged at a cost (outcome.COSTLY),
# or turned away by load before that cost (outcome.SPARED), over the last one to two seconds
# (LOAD_WINDOW apart)
LOAD_WINDOW = 1.0
LOAD_WORK_MIN = 16
_AT_COST = COSTLY | SPARED
# The admission budget (GatewayConfig.global_rate) when none was set or measured: knocks per
# second that may cost an X25519 or a store look-up
FALLBACK_GLOBAL_RATE = 5000.0
# An initiation's body (ephemeral key, encrypted static, encrypted timestamp) is new in every
# initiation a client makes, retries included; a body seen before is a copy, a replay, dropped
# with no X25519. A flood that resends bodies under fresh sender indexes (which change only
# mac1) then costs a keyed BLAKE2s a packet, however many bodies it cycles through up to
# SEEN_BODIES (Bloom filters of up to 2 MiB, touched as they fill; a bigger pool means that
# much X25519 work up front).
SEEN_BODIES = 1 << 19
# What the ephemeral key and encrypted static opened to, for the last OPENS bodies: a flood
# that keeps one ephemeral key and varies the timestamp bytes skips the first X25519.
# ~0.4 KB an entry; an attacker reuses a few ephemeral keys, not thousands.
OPENS = 1024
# how often the loop checks that the device is still the one it installed peers on
DEVICE_CHECK_INTERVAL = 1.0
_UNKNOWN = object()
# device peers looked up per store call at start and per re-check: bounds the Peer objects
# alive at once (~1 KB a peer with its row) and a re-check's step on the loop
RECONCILE_CHUNK = 1024
# work per sweep step (a peer looked at costs 1, one evicted or forgotten EVICT_COST more:
# its log line); the loop handles packets between steps
SWEEP_STEP = 2000
EVICT_COST = 10
# device peers per chunk of a sweep's read: a sweep holds at most two chunks' PeerStats (one
# worked through, the next being read), ~250 bytes a peer, never the whole device's
SWEEP_CHUNK = 4096
# Peers evicted outside a sweep (revoked, disabled, removed, expired, handed off) have their
# counters read just before the removal, so their last bytes are counted: one device dump per
# eviction batch, on the device's thread. Above this many installed peers a dump takes too
# long to put before a revocation; their bytes since the last sweep are then not counted.
FINAL_READ_MAX = 8192
# traffic rows kept for the next write when a write fails (the store unreachable)
TRAFFIC_RETRY_MAX = 100_000


MAX_WORKERS = 64

# How the handshake is completed after an install (GatewayConfig.completion):
#   hold   - the initiation waits in an NFQUEUE; the loop releases it once installed
#   replay - the loop re-injects the captured initiation once installed
#   invert - the device initiates back to the captured endpoint
#   none   - nothing: the client's 5 s retry does it (testing/benchmarks only)
COMPLETIONS = ("hold", "replay", "invert", "none")


# hold mode: released initiations the device has not answered yet, at most (see modes.HoldMode)
DEFAULT_RELEASE_WINDOW = 64
# hold mode's per-source limit in the kernel, initiations a second: far above what one address
# of real clients sends (a stock client sends one per peer every 2 minutes, retries 5 s apart;
# 1 000/s is 120 000 clients behind one address), far below a flood
DEFAULT_SOURCE_LIMIT = 1000
# hold mode's pace when it cannot watch the device's answers (releases per second)
FALLBACK_RELEASE_RATE = 6000.0


class ConfigError(WgjitError, ValueError):
    """A gateway setting is out of range; the message names the option and the fix."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    sweep_interval: float = DEFAULT_SWEEP_INTERVAL
    change_poll_interval: float = 0.5  # revocations must reach the device within ~1 s
    negative_cache_ttl: float = 30.0
    # the same datagram crossing several interfaces (bridge port, bridge) arrives within
    # microseconds; a short window also lets a replay be seen (and logged) as a replay
    duplicate_ttl: float = 2.0
    per_source_rate: float = 20.0  # like the kernel's handshake limiter: 20/s per source IP
    per_source_burst: float = 20.0
    # the admission budget: knocks per second that may cost an X25519 or a store look-up;
    # more are dropped (rate_limited) and put the gateway under load. 0: set at start from
    # the X25519 rate measured there (see admission_rate), else FALLBACK_GLOBAL_RATE
    global_rate: float = 0.0
    global_burst: float = 0.0  # 0: a quarter second's worth of global_rate
    # how long after a knock the gateway initiates back (invert mode, see modes.InvertMode)
    invert_delay: float = 0.005
    completion: str = "invert"  # one of COMPLETIONS
    # presence in a shared store: who we are (default: the host name), how often we say so
    gateway_id: str = ""
    heartbeat_interval: float = 5.0
    # how often installed peers' newest handshake timestamps are written to the store (one
    # batch): until then, a copy of one sent to another gateway is caught by the handoff check
    mark_interval: float = 1.0
    # an initiation whose timestamp is further ahead of our clock than this is refused
    # (`future`): its mark would lock the peer out until the clock caught up
    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW
    # a knock that waited longer than this in the kernel's queue is a sign of load
    load_delay: float = 0.25
    # hold mode keeps at most this many released initiations unanswered by the device (0: no
    # window), so a herd's releases stay below its under-load mark (see modes.HoldMode) ...
    release_window: int = DEFAULT_RELEASE_WINDOW
    # ... and hands it at most this many per second (0: no cap; without a window's answer
    # watch, 0 means modes.FALLBACK_RELEASE_RATE)
    release_rate: float = 0.0
    # hold mode: the kernel drops what one source (an IPv4 address, an IPv6 /64) sends beyond
    # this many initiations a second, before they are queued (0: no limit)
    source_limit: int = DEFAULT_SOURCE_LIMIT
    testing_always_under_load: bool = False
    knock_budget: float = DEFAULT_KNOCK_BUDGET
    max_install_age: float = DEFAULT_MAX_INSTALL_AGE
    # knocks waiting for the store or the device at once; more are let through (fail-open).
    # As many as the kernel's queue holds (nfqueue.DEFAULT_MAXLEN): a herd waits, in order.
    max_pending: int = 16384
    # a store call running longer than this marks the store stalled: new keys are let
    # through at once (fail-open) instead of queueing behind it
    store_stall_after: float = 2.0
    testing_short_timers: bool = False
    # reconcile may remove every device peer (a store that knows none of them); without
    # it the gateway refuses to start (the store is likely the wrong one)
    adopt_empty_store: bool = False
    # worker processes doing the X25519 work of knocks (wgjit.gateway.pool); 0 or 1: the
    # loop's own process verifies, as before
    workers: int = 0

    def validate(self) -> list[str]:
        """Raise ConfigError for unsafe values; return warnings to log."""
        warnings: list[str] = []
        for name, value in (
            ("--idle-timeout", self.idle_timeout),
            ("--sweep-interval", self.sweep_interval),
        ):
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value}")
        short = self.idle_timeout < REJECT_AFTER_TIME or self.sweep_interval < MIN_SWEEP_INTERVAL
        if short and not self.testing_short_timers:
            if self.idle_timeout < REJECT_AFTER_TIME:
                raise ConfigError(
                    f"--idle-timeout {self.idle_timeout:g} is below WireGuard's "
                    f"{REJECT_AFTER_TIME:g} s session lifetime: peers with live sessions would be "
                    f"evicted; use >= {REJECT_AFTER_TIME:g} (default {DEFAULT_IDLE_TIMEOUT:g})"
                )
            raise ConfigError(
                f"--sweep-interval {self.sweep_interval:g} is below {MIN_SWEEP_INTERVAL:g} s; "
                "it reads the whole device each time"
            )
        if self.testing_short_timers:
            warnings.append(
                "--testing-short-timers is set: timers below production minimums are allowed "
                "and peers may be evicted while their sessions are alive; never use in production"
            )
        if not 0 <= self.workers <= MAX_WORKERS:
            raise ConfigError(
                f"--workers must be 0 to {MAX_WORKERS} (0 or 1: verify in the loop's process), "
                f"got {self.workers}"
            )
        if not 0 <= self.source_limit <= MAX_SOURCE_LIMIT:
            raise ConfigError(
                f"--source-limit must be 0 (no limit) to {MAX_SOURCE_LIMIT} initiations a "
                f"second, got {self.source_limit}"
            )
        if 0 < self.source_limit < 100:
            warnings.append(
                f"--source-limit {self.source_limit} is low: clients behind one address (a "
                "carrier-grade NAT, an office) share it; the default is "
                f"{DEFAULT_SOURCE_LIMIT}"
            )
        if not (self.per_source_rate > 0 and self.global_burst >= 0):
            raise ConfigError("rate limits must be positive")
        if not (math.isfinite(self.global_rate) and self.global_rate >= 0):
            raise ConfigError(
                f"--admission-rate must be a number of initiations per second >= 0 (0: measured "
                f"at start), got {self.global_rate:g}"
            )
        if self.completion not in COMPLETIONS:
            raise ConfigError(f"--mode must be one of {', '.join(COMPLETIONS)}")
        if self.testing_always_under_load:
            warnings.append(
                "--testing-always-under-load is set: every initiation without a cookie gets a "
                "cookie reply (clients wait for their 5 s retry); never use in production"
            )
        if self.completion == "none":
            warnings.append(
                "--testing-no-completion is set: new peers wait for their client's 5 s retry; "
                "for latency comparisons only, never use in production"
            )
        return warnings


@dataclass(slots=True)
class Installed:
    name: str
    installed_at: float  # wall clock
    # what the device was given (allowed IPs and PSK, as a hash: a peer's config objects
    # would cost ~400 bytes each), so a store change is pushed only if it changes something
    fingerprint: int
    # the newest initiation timestamp accepted from this peer (here, or the store's mark at
    # install): a handoff to the same or an older one is a replay
    seen: bytes | None = None
    # the timestamp this gateway itself advanced the store's mark to when it installed the
    # peer (None if adopted from the device)
    admitted: bytes | None = None
    expires_at: float | None = None  # unix time; evicted then (reason expired)
    # the device's byte counters (received, sent) already added to the store's totals; rx -1:
    # not known (a peer adopted from the device: the next sweep takes its counters as the
    # start, since whoever installed it counted those)
    rx: int = 0
    tx: int = 0
    # the last sweep whose device read had this peer in it (Policy._sweep_gen): a peer
    # installed before a sweep and not in its whole read is one the device lost
    swept: int = 0


def _source_key(knock: Knock) -> bytes:
    """What per-source limits count by: an IPv4 address, or an IPv6 /64 (one host's share;
    anyone can have a /64 of addresses, as in the kernel's ratelimiter)."""
    return knock.source_address[:8]


def _account(key: PublicKey, inst: Installed, st: PeerStats, since: float) -> Traffic | None:
    """What the device counted for an installed peer since it was last accounted (its
    counters as `st` has them, `inst.rx`/`inst.tx` as accounted), and its handshake and
    endpoint if anything happened after `since` (unix time); None if nothing did. Moves the
    accounted counters to `st`'s."""
    last, rx, tx, endpoint = st
    if inst.rx < 0:
        drx = dtx = 0  # adopted: what it counted so far was counted by whoever installed it
    elif rx < inst.rx or tx < inst.tx:
        drx, dtx = rx, tx  # the counters restarted: the peer was added anew behind our back
    else:
        drx, dtx = rx - inst.rx, tx - inst.tx
    inst.rx, inst.tx = rx, tx
    if drx or dtx or last > since:
        return Traffic(key, drx, dtx, last or None, endpoint)
    return None


# Hashes kept per installed peer are cut to 60 bits: an int of two 30-bit digits is a 32-byte
# object, a full 64-bit hash a 48-byte one (3.2 MB in all at 100 000 peers, two per peer)
HASH_BITS: Final = (1 << 60) - 1


def fingerprint(peer: Peer) -> int:
    """What a peer's device config depends on, as one hash."""
    return hash((frozenset(peer.allowed_ips), peer.preshared_key)) & HASH_BITS


@dataclass(slots=True)
class _Knock:
    """A knock waiting for a look-up, an admission or an install."""

    knock: Knock
    ticket: object  # what the loop needs to give the verdict; None once it has one
    opened: Opened
    verified: Verified | None = None
    worker: int = -1  # the verify worker that opened it (-1: opened in the loop's process)
    failed_open: object = None  # the ticket of its fail-open verdict, if it had one


class _Stage(enum.Enum):
    LOOKUP = "lookup"
    AUTH = "auth"  # known: its knocks' static DH on the verify workers (--workers > 1)
    ADMIT = "admit"
    INSTALL = "install"


@dataclass(slots=True)
class _Pending:
    """One key on its way in: the knocks that asked for it and how far it got."""

    key: PublicKey
    stage: _Stage
    knocks: list[_Knock]
    peer: Peer | None = None
    admitting: _Knock | None = None  # the knock whose timestamp and endpoint are used
    auth_left: int = 0  # AUTH: knocks whose verify worker has not answered yet


@dataclass
class Policy:
    """The gateway's decisions. Owns no socket, thread or clock: `now` (monotonic) comes with
    every event and `wall` (unix time, for handshake marks and idle times) is injected."""

    responder: Responder
    config: GatewayConfig
    log: EventLog
    wall: Callable[[], float]
    ignore_ifindex: int = -1
    # makes cookie replies under load; None where the loop cannot send them (no raw socket)
    cookies: CookieChecker | None = None
    installed: dict[PublicKey, Installed] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)
    cursor: int = 0

    def __post_init__(self) -> None:
        c = self.config
        self._dupes: TTLSet[bytes] = TTLSet(c.duplicate_ttl, 65536)
        self._negative: TTLSet[PublicKey] = TTLSet(c.negative_cache_ttl, 65536)
        rate = c.global_rate or FALLBACK_GLOBAL_RATE
        self._global = TokenBucket(rate, c.global_burst or max(1.0, rate / 4))
        self._seen = SeenFilter(SEEN_BODIES)
        # ephemeral key and encrypted static -> (claimed key, C, H, verify worker) or
        # BAD_STATIC (see OPENS)
        self._opens: LRU[bytes, tuple[PublicKey, bytes, bytes, int] | Outcome] = LRU(OPENS)
        self._per_source: KeyedRateLimiter[bytes] = KeyedRateLimiter(
            c.per_source_rate, c.per_source_burst
        )
        self._reject_log = TokenBucket(20.0, 50.0)  # bound log volume under attack
        self._load_until = float("-inf")
        self._late_until = float("-inf")
        # (costly knocks judged, when) as counted at two moments LOAD_WINDOW apart
        self._tally = self._tally_before = (0, float("-inf"))
        self._reply = b""
        self._error_log = TokenBucket(5.0, 20.0)
        self._fail_log = TokenBucket(20.0, 50.0)
        self.gateway_id = c.gateway_id or socket.gethostname()
        self._pending: dict[PublicKey, _Pending] = {}
        self._pending_knocks = 0
        # (deadline, knock, its pending entry) in arrival order: the knock budgets
        self._budgets: deque[tuple[float, _Knock, _Pending]] = deque()
        # store calls in flight: effect -> when issued (monotonic); for stall detection
        self._store_calls: dict[int, float] = {}
        self._next_sweep = math.inf
        self._next_poll = math.inf
        self._next_beat = math.inf
        self._next_marks = math.inf
        self._last_beat = 0.0
        self._beat_failed = False
        # when the first of the heartbeats failing now failed (the store unreachable since)
        self._beats_failing_since: float | None = None
        # installed peers whose newest handshake timestamp is not in the store yet
        self._unwritten: set[PublicKey] = set()
        self._writing_marks = False
        self._sweeping = False
        self._polling = False
        self._sweep_started = 0.0
        self._removed_during_sweep: set[PublicKey] = set()
        self._sweep_work: Iterator[list[Effect]] | None = None
        # a sweep reads the device in chunks (ReadHandshakes, StatsChunk) and works through
        # each in steps while the next is read: see _sweep_read() and _sweep_next()
        self._sweep_gen = 0  # sweeps started (what Installed.swept refers to)
        self._sweep_chunks: deque[StatsChunk] = deque()  # read, waiting to be worked
        self._sweep_dump: StatsDump | None = None  # the read to go on with; None: over
        self._sweep_reading = False  # a chunk is being read
        self._sweep_read_over = False  # the last chunk came (or a read failed)
        self._sweep_complete = False  # ... and the read had every device peer in it
        self._sweep_ending = False  # _sweep_work is the sweep's last phase (_sweep_end)
        self._sweep_since = 0.0  # what _account() takes as news: handshakes after this
        self._sweep_peers = 0  # device peers read so far (for the sweep's log line)
        # an idle peer whose removal waits for the next chunk (see _chunk_steps)
        self._sweep_held: list[PublicKey] = []
        # re-checks of every installed peer, a chunk at a time (see _recheck_all)
        self._recheck_todo: deque[tuple[PublicKey, ...]] = deque()
        self._recheck_inflight: Lookup | None = None
        self._reconciling = [0, 0, 0]  # look-ups to go, peers kept, peers the store knows
        self._reconcile_todo: Iterator[tuple[PublicKey, float]] = iter(())  # not looked up yet
        self._reconcile_bad: list[tuple[PublicKey, str, str]] = []
        # why the policy refuses to start (set by reconcile), or None
        self.refused_start: str | None = None
        self._next_check = math.inf
        self._checking = False
        self._identity: object = _UNKNOWN
        self._expiries: list[tuple[float, PublicKey]] = []  # a heap of (unix time, key)
        # hash of an allowed IP -> the peer last installed with it (for prefix_conflict)
        self._prefixes: dict[int, PublicKey] = {}
        # when the last sweep read the device (unix time): a handshake after it is news
        self._accounted_at = 0.0
        # traffic rows whose write failed: written with the next batch
        self._traffic_retry: list[Traffic] = []

    # -- start-up -------------------------------------------------------------------------

    def reconcile(self, device_peers: dict[PublicKey, float], now: float) -> list[Effect]:
        """Start: adopt the device's peers (key -> last handshake) that the store allows,
        pushing the store's config to them (it may have changed while we were down), and
        remove the others. The loop runs the returned effects to completion (and then the
        timers start) before any knock is captured."""
        self._next_sweep = now + self.config.sweep_interval
        self._next_poll = now + self.config.change_poll_interval
        self._next_beat = now + self.config.heartbeat_interval
        self._next_marks = now + self.config.mark_interval
        self._next_check = now
        self._last_beat = now
        effects: list[Effect] = [self._heartbeat(), ReadChanges(None), ReadIdentity()]
        # one chunk looked up at a time, the next made when one is done: 100 000 peers' chunks
        # made at once (and kept by the effects until reconcile ends) cost ~5 MB at the peak
        self._reconciling = [-(-len(device_peers) // RECONCILE_CHUNK), 0, 0]
        self._reconcile_todo = iter(device_peers.items())
        self._next_reconcile(effects)
        if not device_peers:
            self.log.info("reconcile", kept=0, removed=0)
        return effects

    def _next_reconcile(self, out: list[Effect]) -> None:
        chunk = dict(itertools.islice(self._reconcile_todo, RECONCILE_CHUNK))
        if chunk:
            out.append(Lookup(tuple(chunk), Purpose.RECONCILE, chunk))
        else:
            self._reconcile_todo = iter(())  # the device's peers are let go

    # -- events ---------------------------------------------------------------------------

    def on_knocks(self, batch: Iterable[tuple[Knock, object]], now: float) -> list[Effect]:
        """Captured knocks (each with the loop's ticket for its verdict)."""
        out: list[Effect] = []
        lookups: list[PublicKey] = []
        self._roll_tally(now)
        for knock, ticket in batch:
            try:
                outcome = self._knock(knock, ticket, now, lookups, out)
            except Exception as e:  # a bug must cost one knock, never the gateway
                self._error("knock_failed", e)
                outcome = Outcome.ERROR
            if outcome is Outcome.COOKIE:
                self.counters[outcome] += 1
                out.append(Verdict(ticket, outcome, knock, reply=self._reply))
            elif outcome is not None:
                self._verdict(out, ticket, outcome, knock)
        if lookups:
            out.append(self._store_call(Lookup(tuple(lookups), Purpose.ADMIT), now))
        return out

    def on_done(self, effect: Effect, result: object, error: Exception | None, now: float
                ) -> list[Effect]:  # fmt: skip
        """The loop finished `effect` (on a worker): `result` is its value, or `error`."""
        self._store_calls.pop(id(effect), None)
        out: list[Effect] = []
        try:
            self._done(effect, result, error, now, out)
        except Exception as e:
            self._error("result_failed", e, effect=type(effect).__name__)
        return out

    def on_tick(self, now: float) -> list[Effect]:
        """Timers: knock budgets, the change feed, the sweep, the heartbeat."""
        out: list[Effect] = []
        budgets = self._budgets
        while budgets and (budgets[0][1].ticket is None or budgets[0][0] <= now):
            _, k, p = budgets.popleft()
            if k.ticket is not None:
                self._fail_open(out, p, k, Outcome.TIMEOUT, now)
        if now >= self._next_poll and not self._polling:
            self._polling = True
            out.append(self._store_call(ReadChanges(self.cursor), now))
        if now >= self._next_beat:
            self._next_beat = now + self.config.heartbeat_interval
            out.append(self._store_call(self._heartbeat(), now))
        if now >= self._next_check and not self._checking:
            self._checking = True
            self._next_check = now + DEVICE_CHECK_INTERVAL
            out.append(ReadIdentity())
        if now >= self._next_marks:
            self._next_marks = now + self.config.mark_interval
            out.extend(self._write_marks())
        if self._expiries and self._expiries[0][0] <= self.wall():
            self._expire(out)
        if self._sweep_work is not None:
            step = next(self._sweep_work, None)
            if step is None:
                self._sweep_work = None
                if self._sweep_ending:
                    self._sweep_ending = self._sweeping = False
                else:
                    self._sweep_next(out)
            else:
                out.extend(step)
        if now >= self._next_sweep and not self._sweeping:
            self._sweeping = True
            self._next_sweep = math.inf  # set when the read ends (-inf: the device changed)
            self._sweep_started = self.wall()
            self._removed_during_sweep.clear()
            self._sweep_gen += 1
            self._sweep_peers = 0
            self._sweep_read_over = self._sweep_complete = False
            self._sweep_reading = True
            out.append(ReadHandshakes(None, SWEEP_CHUNK))
        return out

    def next_deadline(self) -> float:
        """When on_tick() next has work (monotonic)."""
        if self._sweep_work is not None:
            return -math.inf  # more sweep steps: now
        due = min(
            self._next_sweep if not self._sweeping else math.inf,
            self._next_poll if not self._polling else math.inf,
            self._next_beat,
            self._next_marks if self._unwritten else math.inf,
            self._next_check if not self._checking else math.inf,
        )
        budgets = self._budgets
        while budgets and budgets[0][1].ticket is None:
            budgets.popleft()
        return min(due, budgets[0][0]) if budgets else due

    def wake_changes(self) -> None:
        """The store signalled news (NOTIFY): read the feed at the next tick."""
        self._next_poll = 0.0

    def shutdown(self) -> list[Effect]:
        self._writing_marks = False
        return self._write_marks()

    def store_stalled(self, now: float) -> bool:
        """A store call has been running for longer than `store_stall_after`. Asked for every
        knock of a key not pending yet, so in O(1): calls are kept in the order they started
        (each leaves when its answer comes), so the first is the oldest still running."""
        for started in self._store_calls.values():
            return now - started > self.config.store_stall_after
        return False

    @property
    def sweeping(self) -> bool:
        """A sweep is under way (its device read, or its steps)."""
        return self._sweeping

    @property
    def pending(self) -> int:
        """Knocks waiting for the store or the device."""
        return self._pending_knocks

    # -- the hot path ---------------------------------------------------------------------

    def _knock(
        self,
        knock: Knock,
        ticket: object,
        now: float,
        lookups: list[PublicKey],
        out: list[Effect],
    ) -> Outcome | None:
        """Judge one knock; an Outcome now, or None if it waits (then it is in _pending)."""
        if knock.ifindex == self.ignore_ifindex:
            return Outcome.OWN_INTERFACE
        payload = knock.payload
        # garbage and other gateways' packets cost one BLAKE2s and nothing else
        try:
            if not self.responder.mac1_ok(payload):
                return Outcome.BAD_MAC1
        except HandshakeError as e:
            return Outcome(e.reason)
        # a copy of an earlier initiation (see SEEN_BODIES), or one whose static key is
        # known (OPENS): no X25519, and no budget for known junk
        prior = self._opens.get(payload[OFF_EPHEMERAL:OFF_TIMESTAMP])
        mac1 = payload[OFF_MAC1:OFF_MAC2]
        if not self._seen.seen(payload[OFF_EPHEMERAL:OFF_MAC1]):
            self._dupes.add(mac1, now)
        elif self._dupes.contains(mac1, now):
            # the same datagram, seen on every interface it crosses (bridge port and bridge)
            return Outcome.DUPLICATE
        else:
            self.counters["repeated_bodies"] += 1
            # logged (at a bounded rate) with the key if its static was opened lately
            key = prior[0] if isinstance(prior, tuple) else None
            inst = self.installed.get(key) if key is not None else None
            self._reject(Outcome.REPLAY, knock, key, inst.name if inst else None)
            return Outcome.REPLAY
        opened: Opened | None = None
        worker = -1
        if prior is not None:
            self.counters["reused_ephemerals"] += 1
            if isinstance(prior, Outcome):
                return prior
            key, ck, h, worker = prior
            if self._negative.contains(key, now):
                return Outcome.NEGATIVE_CACHED
            opened = Opened(key, payload, ck, h)
        if self._under_load(knock, now):
            # like WireGuard under load: at most per_source_rate initiations per address (a
            # /64 for IPv6), checked first so that one flooding address costs a dict look-up,
            # not a cookie reply each; and no DH for a sender that has not shown (mac2) it
            # receives at its address: it gets a cookie reply
            if not self._per_source.allow(_source_key(knock), now):
                return Outcome.RATE_LIMITED
            if self.cookies is not None and not self.cookies.mac2_ok(payload, knock.source, now):
                self._reply = self.cookies.reply(payload, knock.source, now)
                return Outcome.COOKIE
        if not self._global.allow(now):
            # the budget is spent: a sign of load, like a full handshake queue in WireGuard
            self.note_load(now, "admission_budget")
            return Outcome.RATE_LIMITED
        if opened is not None:
            return self._opened(knock, ticket, opened, None, now, lookups, out, worker)
        if self.config.workers > 1:
            # the X25519 work goes to the verify pool; on_verified() goes on from here
            out.append(Verify(knock, ticket))
            return None
        try:
            opened = self.responder.open_static(payload, mac1_checked=True)
        except HandshakeError as e:
            self._reject(Outcome(e.reason), knock)
            return Outcome(e.reason)
        return self._opened(knock, ticket, opened, None, now, lookups, out)

    def on_verified(self, results: Iterable[tuple[Verify, object]], now: float) -> list[Effect]:
        """Results of Verify effects from the verify pool: an Opened (the claimed key), an
        (Opened, Verified) pair, a HandshakeError, or an Outcome (the pool could not do it:
        OVERLOADED, WORKER_LOST; a fail-open verdict)."""
        out: list[Effect] = []
        lookups: list[PublicKey] = []
        for job, result in results:
            try:
                outcome = self._verify_result(job, result, now, lookups, out)
            except Exception as e:  # a bug must cost one knock, never the gateway
                self._error("knock_failed", e)
                outcome = Outcome.ERROR
            if outcome is not None:
                self._verdict(out, job.ticket, outcome, job.knock)
        if lookups:
            out.append(self._store_call(Lookup(tuple(lookups), Purpose.ADMIT), now))
        return out

    def _verify_result(self, job: Verify, result: object, now: float,
                       lookups: list[PublicKey], out: list[Effect]) -> Outcome | None:  # fmt: skip
        knock = job.knock
        if isinstance(job.waiter, _Knock):  # a pending knock's authentication
            self._authenticated(job.waiter, result, now, out)
            return None
        if isinstance(result, Outcome):
            if self._fail_log.allow(now):
                self.log.warning("fail_open", stage="verify", reason=result.value,
                                 source=str(knock.source))  # fmt: skip
            return result
        if isinstance(result, HandshakeError):
            key = job.opened.public_key if job.opened is not None else None
            inst = self.installed.get(key) if key is not None else None
            self._reject(Outcome(result.reason), knock, key,
                         inst.name if inst is not None else None)  # fmt: skip
            return Outcome(result.reason)
        verified: Verified | None = None
        if isinstance(result, tuple):
            opened, verified = result
        else:
            assert isinstance(result, Opened)
            opened = result
        return self._opened(knock, job.ticket, opened, verified, now, lookups, out, job.worker)

    def _opened(self, knock: Knock, ticket: object, opened: Opened, verified: Verified | None,
                now: float, lookups: list[PublicKey], out: list[Effect], worker: int = -1
                ) -> Outcome | None:  # fmt: skip
        """A knock whose static key is decrypted (`verified`: and authenticated, by a verify
        worker whose static-DH cache had the key)."""
        key = opened.public_key  # claimed; proven only by authenticate()
        self._opens.put(knock.payload[OFF_EPHEMERAL:OFF_TIMESTAMP],
                        (key, opened.chaining_key, opened.hash, worker))  # fmt: skip
        inst = self.installed.get(key)
        if inst is not None:
            # the fast path: judged from memory, no store or device call
            if verified is None:
                if worker >= 0 and not self.responder.cached(key.raw):
                    # the worker that opened it does the static DH (and caches it there)
                    out.append(Verify(knock, ticket, opened, worker))
                    return None
                try:
                    verified = self.responder.authenticate(opened)
                except HandshakeError as e:
                    self._reject(Outcome(e.reason), knock, key, inst.name)
                    return Outcome(e.reason)
            if self._future(verified, knock.source, inst.name):
                return Outcome.FUTURE
            if inst.seen is not None and verified.timestamp.raw <= inst.seen:
                # the device would refuse it too, after its own X25519
                self._reject(Outcome.REPLAY, knock, key, inst.name)
                return Outcome.REPLAY
            self._note_handshake(key, inst, verified)
            return Outcome.ALREADY_INSTALLED
        # unknown keys are dropped before the second X25519: a flood of made-up keys costs
        # one DH each, and a negatively cached key costs no store query
        if self._negative.contains(key, now):
            return Outcome.NEGATIVE_CACHED
        p = self._pending.get(key)
        if p is None and self.store_stalled(now):
            return Outcome.STORE_UNAVAILABLE
        if self._pending_knocks >= self.config.max_pending:
            return Outcome.OVERLOADED
        k = _Knock(knock, ticket, opened, verified, worker)
        if p is None:
            p = self._pending[key] = _Pending(key, _Stage.LOOKUP, [k])
            lookups.append(key)
        elif p.stage is _Stage.LOOKUP:
            p.knocks.append(k)
        elif k.verified is None and worker >= 0:
            # known (authentication, admission or install under way): the worker that
            # opened it authenticates it
            p.knocks.append(k)
            self._authenticate_on_worker(p, k, out)
        else:
            # the peer is known (admission or install under way): authenticate now
            assert p.peer is not None
            if k.verified is None:
                try:
                    k.verified = self.responder.authenticate(opened)
                except HandshakeError as e:
                    self._reject(Outcome(e.reason), knock, key, p.peer.name)
                    return Outcome(e.reason)
            if self._future(k.verified, knock.source, p.peer.name):
                return Outcome.FUTURE
            p.knocks.append(k)
        self._pending_knocks += 1
        self._budgets.append((knock.received_at + self.config.knock_budget, k, p))
        return None

    # -- results --------------------------------------------------------------------------

    def _done(
        self, effect: Effect, result: object, error: Exception | None, now: float,
        out: list[Effect],
    ) -> None:  # fmt: skip
        if isinstance(effect, Lookup):
            if effect is self._recheck_inflight:
                self._recheck_inflight = None
                self._next_recheck(out)  # (looked up while this one is worked through)
            if error is not None:
                self._error(f"{effect.purpose}_failed", error)
                if effect.purpose is Purpose.RECONCILE:  # (a sweep adopts what it left)
                    self._next_reconcile(out)
                if effect.purpose is Purpose.ADMIT:
                    for key in effect.keys:
                        p = self._pending.get(key)
                        if p is not None:
                            self._finish(out, p, Outcome.INSTALL_FAILED)
                return
            assert isinstance(result, dict)
            if effect.purpose is Purpose.ADMIT:
                for key in effect.keys:
                    self._looked_up(key, result.get(key), now, out)
            elif effect.purpose in (Purpose.RECONCILE, Purpose.ADOPT):
                assert effect.handshakes is not None
                self._adopt(effect, result, out)
                if effect.purpose is Purpose.RECONCILE:
                    if now >= self._next_beat:
                        # a reconcile of 100 000 peers may outlast the presence TTL: beat
                        # between its chunks, or others may take our claims (and we re-check
                        # them all once ready)
                        self._next_beat = now + self.config.heartbeat_interval
                        out.append(self._heartbeat())
                    self._next_reconcile(out)
            else:
                self._recheck(effect.keys, result, out)
        elif isinstance(effect, Admit):
            self._admitted(effect, result, error, now, out)
        elif isinstance(effect, Install):
            self._installed(effect, error, now, out)
        elif isinstance(effect, ReadHandshakes):
            self._sweep_read(effect, result, error, now, out)
        elif isinstance(effect, ReadChanges):
            self._polling = False
            self._next_poll = now + self.config.change_poll_interval
            self._changes(effect, result, error, out)
        elif isinstance(effect, RecordHandshakes):
            self._writing_marks = False
            if error is not None:
                self._error("record_handshakes_failed", error)
                self._unwritten.update(hs.public_key for hs in effect.handshakes)
        elif isinstance(effect, Heartbeat):
            self._beat(error, now, out)
        elif isinstance(effect, RecordTraffic):
            if error is not None:
                self._error("record_traffic_failed", error, peers=len(effect.rows))
                self._retry_traffic(effect.rows)
        elif isinstance(effect, Remove) and effect.final:
            if error is not None:
                self._error("remove_failed", error)
            if isinstance(result, dict):
                self._account_final(effect.final, result, out)
        elif isinstance(effect, ReadIdentity):
            self._checking = False
            if error is None:
                self._device_identity(result)
        elif isinstance(effect, Claim) and error is not None:
            self._error("claim_failed", error)
            self._beat_failed = True  # the next heartbeat claims everything we hold again
        elif error is not None:
            self._error(f"{effect.what}_failed", error)

    def _looked_up(self, key: PublicKey, peer: Peer | None, now: float, out: list[Effect]
                   ) -> None:  # fmt: skip
        p = self._pending.get(key)
        if p is None or p.stage is not _Stage.LOOKUP:
            return
        refused = "unknown" if peer is None else peer.refusal(self.wall())
        if refused is not None:
            reason = Outcome(refused)  # unknown, revoked, disabled, expired
            self._negative.add(key, now)
            self._finish(out, p, reason, name=peer.name if peer else None)
            return
        assert peer is not None
        p.peer = peer
        if self.config.workers > 1:
            # the static DH of knocks the workers opened is theirs too: the loop's core does
            # no X25519 for a herd (knocks opened in this process are authenticated here)
            todo = [k for k in p.knocks if k.verified is None and k.worker >= 0]
            if todo:
                p.stage = _Stage.AUTH
                for k in todo:
                    self._authenticate_on_worker(p, k, out)
                return
        self._choose(p, now, out)

    def _authenticate_on_worker(self, p: _Pending, k: _Knock, out: list[Effect]) -> None:
        if p.stage is _Stage.AUTH:
            p.auth_left += 1
        out.append(Verify(k.knock, k.ticket, k.opened, k.worker, waiter=k))

    def _authenticated(self, k: _Knock, result: object, now: float, out: list[Effect]) -> None:
        """A verify worker's answer for a knock of a known key (pending: authentication,
        admission or install under way)."""
        p = self._pending.get(k.opened.public_key)
        if p is None or not any(x is k for x in p.knocks):
            self._late_authenticated(k, result, out)
            return
        assert p.peer is not None
        waiting = p.stage is _Stage.AUTH
        if waiting:
            p.auth_left -= 1
        if isinstance(result, tuple):
            k.verified = result[1]
            if not waiting and self._future(k.verified, k.knock.source, p.peer.name):
                self._drop_knock(out, p, k, Outcome.FUTURE, p.peer.name)
        elif isinstance(result, HandshakeError):
            self._drop_knock(out, p, k, Outcome(result.reason), p.peer.name)
        else:  # lost, overloaded: fail-open for this knock, the others go on
            self._drop_knock(out, p, k, result if isinstance(result, Outcome) else Outcome.ERROR,
                             p.peer.name)  # fmt: skip
        if waiting and p.auth_left <= 0:
            self._choose(p, now, out)

    def _late_authenticated(self, k: _Knock, result: object, out: list[Effect]) -> None:
        """The answer for a knock whose key's admission ended before it came: if the knock
        had no verdict then (its key was installed meanwhile), it gets one now."""
        if k.ticket is None:
            return
        key = k.opened.public_key
        inst = self.installed.get(key)
        if isinstance(result, tuple) and inst is not None:
            v = result[1]
            if self._future(v, k.knock.source, inst.name):
                outcome = Outcome.FUTURE
            else:
                self._note_handshake(key, inst, v)
                outcome = Outcome.ALREADY_INSTALLED
        elif isinstance(result, HandshakeError):
            outcome = Outcome(result.reason)
            self._reject(outcome, k.knock, key, inst.name if inst else None)
        elif isinstance(result, Outcome):
            outcome = result
        else:
            outcome = Outcome.TIMEOUT  # (not reached: an admission ends with verdicts)
        self._verdict(out, k.ticket, outcome, k.knock)
        k.ticket = None

    def _choose(self, p: _Pending, now: float, out: list[Effect]) -> None:
        """The known key's knocks authenticated (here if not yet): admit the newest fresh one."""
        peer, key = p.peer, p.key
        assert peer is not None
        best: _Knock | None = None
        for k in list(p.knocks):
            try:
                if k.verified is None:  # (a verify worker may have done it)
                    k.verified = self.responder.authenticate(k.opened)
            except HandshakeError as e:
                self._drop_knock(out, p, k, Outcome(e.reason), peer.name)
                continue
            ts = k.verified.timestamp.raw
            if self._future(k.verified, k.knock.source, peer.name):
                self._drop_knock(out, p, k, Outcome.FUTURE, peer.name)
                continue
            if peer.handshake_hwm is not None and ts <= peer.handshake_hwm:
                self._drop_knock(out, p, k, Outcome.REPLAY, peer.name)
                continue
            if best is None or (best.verified is not None and ts > best.verified.timestamp.raw):
                best = k
        if best is None:
            self._forget(p)
            return
        if self._too_old(p, best, now, out):
            return
        assert best.verified is not None
        p.stage, p.admitting = _Stage.ADMIT, best
        hs = Handshake(key, best.verified.timestamp.raw, self.wall())
        out.append(self._store_call(Admit(hs, self.gateway_id), now))

    def _admitted(self, effect: Admit, result: object, error: Exception | None, now: float,
                  out: list[Effect]) -> None:  # fmt: skip
        key = effect.handshake.public_key
        p = self._pending.get(key)
        if p is None or p.stage is not _Stage.ADMIT or p.peer is None:
            return
        if error is not None:
            self._error("install_failed", error, peer=p.peer.name)
            self._finish(out, p, Outcome.INSTALL_FAILED, name=p.peer.name)
            return
        assert isinstance(result, Admitted)
        if not result.fresh:
            # another gateway accepted this or a newer timestamp meanwhile
            self._finish(out, p, Outcome.REPLAY, name=p.peer.name)
            return
        assert p.admitting is not None
        if self._too_old(p, p.admitting, now, out):
            return
        p.stage = _Stage.INSTALL
        out.append(
            Install(
                p.peer,
                p.admitting.knock.source,
                effect.handshake.timestamp,
                result.previous_holder,
            )
        )

    def _installed(self, effect: Install, error: Exception | None, now: float,
                   out: list[Effect]) -> None:  # fmt: skip
        peer = effect.peer
        p = self._pending.get(peer.public_key)
        if error is not None:
            self._error("install_failed", error, peer=peer.name)
            if p is not None:
                self._finish(out, p, Outcome.INSTALL_FAILED, name=peer.name)
            return
        inst = self.installed[peer.public_key] = Installed(
            peer.name,
            self.wall(),
            fingerprint(peer),
            seen=effect.timestamp,
            admitted=effect.timestamp,
        )
        self._expire_at(peer.public_key, inst, peer.expires_at)
        self._claim_prefixes(peer.public_key, peer)
        self.counters["installs"] += 1
        took = None
        if p is not None and p.admitting is not None:
            took = round((now - p.admitting.knock.received_at) * 1000, 2)
        self.log.info(
            "install",
            peer=peer.name,
            key=peer.public_key.short(),
            endpoint=str(effect.endpoint),
            took_ms=took,
            **({"from_gateway": effect.previous_holder} if effect.previous_holder else {}),
            _peer=peer,  # for listeners (hooks): not logged
        )
        if p is None:
            return
        for k in p.knocks:
            if k.verified is None and k is not p.admitting:
                continue  # its worker has not answered yet: judged when it does
            outcome = Outcome.INSTALLED if k is p.admitting else Outcome.ALREADY_INSTALLED
            if k.verified is not None and k is not p.admitting:
                self._note_handshake(peer.public_key, self.installed[peer.public_key], k.verified)
            if k.ticket is not None:
                self._verdict(out, k.ticket, outcome, k.knock, peer.public_key)
                k.ticket = None
            elif outcome is Outcome.INSTALLED:
                # the verdict went out before the install finished (fail-open); the loop may
                # still complete the handshake (replay, invert; hold re-injects)
                out.append(Verdict(None, Outcome.INSTALLED, k.knock, peer.public_key,
                                   had=k.failed_open))  # fmt: skip
        self._forget(p)

    # -- the sweep ------------------------------------------------------------------------
    #
    # Every sweep_interval the device is read (ReadHandshakes) a chunk of SWEEP_CHUNK peers at
    # a time, as its answer is parsed; each chunk is worked through in steps of about
    # SWEEP_STEP units of work (a peer looked at: 1, a peer evicted or forgotten: EVICT_COST;
    # a step takes a few ms and the loop handles packets between steps) while the next chunk
    # is read, so a sweep holds at most two chunks of the device's answer, never all of it.
    # Per chunk: account the traffic of installed peers (one RecordTraffic, of the peers with
    # news), evict idle peers, look up peers that appeared on the device without us. After
    # the last: forget peers the device lost (installed before the sweep and in none of its
    # chunks: removed behind our back, device restarted), if the read had every device peer.
    #
    # Knocks, installs and evictions happen between steps and between chunks: a peer
    # installed after the sweep started is neither lost nor idle (and its counters in the
    # read may be a former install's: not accounted), one evicted meanwhile is no stranger.
    # An idle peer's counters in the read are its last: it had no handshake for longer than a
    # session lives, so nothing moved after the read. A peer the device lost takes its bytes
    # since the previous sweep with it (nothing is left to read).

    def _sweep_read(self, effect: ReadHandshakes, result: object, error: Exception | None,
                    now: float, out: list[Effect]) -> None:  # fmt: skip
        """A chunk of the sweep's read came (or the read failed)."""
        self._sweep_reading = False
        # the next sweep: sweep_interval after this one's read, or at once if the device was
        # created anew while it was read (_device_identity)
        after = now + self.config.sweep_interval if self._next_sweep > -math.inf else -math.inf
        if error is not None:
            self._error("sweep_failed", error)
            self._sweep_dump = None
            self._sweep_read_over = True  # what was read is worked through; nobody is lost
            self._next_sweep = after
        else:
            assert isinstance(result, StatsChunk)
            self._sweep_peers += len(result.stats)
            if effect.dump is None:  # the first chunk: handshakes after this sweep are news
                self._sweep_since, self._accounted_at = self._accounted_at, self._sweep_started
            self._sweep_chunks.append(result)
            if result.last:
                self._sweep_dump = None
                self._sweep_read_over = True
                self._sweep_complete = result.complete
                self._next_sweep = after
            else:
                self._sweep_dump = result.dump
        self._sweep_next(out)

    def _sweep_next(self, out: list[Effect]) -> None:
        """Work through the next chunk if none is being worked on (or end the sweep after
        the last), and read the one after it meanwhile: one chunk read ahead, no more."""
        if self._sweep_work is None:
            if self._sweep_chunks:
                chunk = self._sweep_chunks.popleft()
                self._sweep_work = self._chunk_steps(chunk.stats, chunk.last)
            elif self._sweep_read_over:
                self._sweep_ending = True
                self._sweep_work = self._sweep_end()
        if self._sweep_dump is not None and not self._sweep_reading and not self._sweep_chunks:
            self._sweep_reading = True
            out.append(ReadHandshakes(self._sweep_dump, SWEEP_CHUNK))

    def _chunk_steps(self, stats: dict[PublicKey, PeerStats], last_chunk: bool
                     ) -> Iterator[list[Effect]]:  # fmt: skip
        """One chunk of the sweep's read, in steps."""
        started, gen = self._sweep_started, self._sweep_gen
        cutoff = started - self.config.idle_timeout
        since = self._sweep_since
        installed, pending, removed = self.installed, self._pending, self._removed_during_sweep
        # the previous chunk's held-back idle peer goes with this chunk's first removals
        idle, self._sweep_held = self._unheld(self._sweep_held), []
        strangers: dict[PublicKey, float] = {}
        rows: list[Traffic] = []
        work = 0
        left = len(stats)
        key: PublicKey | None = None
        for key, st in stats.items():  # the chunk is the sweep's own: nobody changes it
            work += 1
            left -= 1
            inst = installed.get(key)
            last = st[0]
            if inst is None:
                if key not in pending and key not in removed:
                    strangers[key] = last
            else:
                inst.swept = gen
                if inst.installed_at < started and (row := _account(key, inst, st, since)):
                    rows.append(row)
                if last <= cutoff and inst.installed_at <= cutoff:
                    idle.append(key)
                    del installed[key]
                    self.counters["evicted_idle"] += 1
                    self.log.info(
                        "evict", reason="idle", peer=inst.name, key=key.short(), _key=key,
                        idle_s=round(started - max(last, inst.installed_at)),
                    )  # fmt: skip
                    work += EVICT_COST
            if work >= SWEEP_STEP and left:  # (the last peer's removal may wait: below)
                work = 0
                yield self._evict_idle(idle)
                idle = []
        if idle and idle[-1] is key and not last_chunk:
            # The kernel goes on with its dump after the last peer it sent (this chunk's
            # last): removed before the next chunk is read, it would end the dump there.
            self._sweep_held = [idle.pop()]
        last_step = self._evict_idle(idle)
        if rows or self._traffic_retry:
            last_step.append(self._record_traffic(rows))
        if strangers:
            last_step.append(Lookup(tuple(strangers), Purpose.ADOPT, strangers))
        yield last_step

    def _sweep_end(self) -> Iterator[list[Effect]]:
        """After the sweep's last chunk: forget the peers the device lost, in steps."""
        first = self._evict_idle(self._unheld(self._sweep_held))
        self._sweep_held = []
        if not self._sweep_complete:
            # the read failed, or the device changed while it was read (netlink: peers may be
            # missing from it): nobody is taken for lost this time
            self.counters["sweeps_incomplete"] += 1
            self._log_sweep()
            yield first
            return
        started, gen = self._sweep_started, self._sweep_gen
        installed = self.installed
        work = 0
        for key in list(installed):
            work += 1
            inst = installed.get(key)
            if inst is not None and inst.swept != gen and inst.installed_at < started:
                del installed[key]
                self.log.info("lost", peer=inst.name, key=key.short())
                self.counters["lost"] += 1
                work += EVICT_COST
            if work >= SWEEP_STEP:
                work = 0
                yield first
                first = []
        self._log_sweep()
        yield first

    def _log_sweep(self) -> None:
        self.counters["sweeps"] += 1
        self.log.info(
            "sweep", peers=self._sweep_peers, complete=self._sweep_complete,
            took_ms=round((self.wall() - self._sweep_started) * 1000),
        )  # fmt: skip

    def _unheld(self, held: list[PublicKey]) -> list[PublicKey]:
        """Held-back idle peers still to remove: not those installed or on their way in
        again meanwhile (their install may be queued before this removal)."""
        return [k for k in held if k not in self.installed and k not in self._pending]

    def _evict_idle(self, keys: list[PublicKey]) -> list[Effect]:
        if not keys:
            return []
        return [Remove(tuple(keys)), Release(tuple(keys), self.gateway_id)]

    def _changes(self, effect: ReadChanges, result: object, error: Exception | None,
                 out: list[Effect]) -> None:  # fmt: skip
        if isinstance(error, ChangeFeedExpired):
            # we fell behind the feed (or the store was replaced): recheck everything we hold
            self.log.warning("change_feed_reset", error=str(error))
            self.cursor = 0
            self._negative.clear()
            out.append(ReadChanges(None))
            self._recheck_all(out)
            return
        if error is not None:
            self._error("poll_changes_failed", error)
            return
        assert isinstance(result, Changes)
        self.cursor = result.cursor
        if effect.cursor is None:  # start-up: we follow the feed from here
            return
        recheck = []
        for key in result.keys:
            self._negative.discard(key)
            if key in self.installed:
                recheck.append(key)
        if recheck:
            out.extend(
                Lookup(tuple(recheck[i : i + RECONCILE_CHUNK]), Purpose.RECHECK)
                for i in range(0, len(recheck), RECONCILE_CHUNK)
            )

    def _recheck_all(self, out: list[Effect]) -> None:
        """Look every installed peer up again (see _recheck), RECONCILE_CHUNK at a time and
        one look-up after the other: after a pause or a feed reset with 100 000 installed,
        look-ups issued at once come back faster than the loop works through them and wait
        in its queue, Peer objects and all (~20 MB). A re-check of everything replaces one
        still queued."""
        keys = list(self.installed)
        self._recheck_todo = deque(
            tuple(keys[i : i + RECONCILE_CHUNK]) for i in range(0, len(keys), RECONCILE_CHUNK)
        )
        self._next_recheck(out)

    def _next_recheck(self, out: list[Effect]) -> None:
        if self._recheck_inflight is None and self._recheck_todo:
            self._recheck_inflight = Lookup(self._recheck_todo.popleft(), Purpose.RECHECK)
            out.append(self._recheck_inflight)

    def _recheck(self, keys: Sequence[PublicKey], peers: dict[PublicKey, Peer],
                 out: list[Effect]) -> None:  # fmt: skip
        """Apply store changes to installed peers: revoked/removed/handed off → evict; new
        allowed IPs or PSK → update the device."""
        gone: list[tuple[PublicKey, str, str]] = []
        claim: list[PublicKey] = []
        update: list[tuple[PublicKey, tuple[IPNetwork, ...], PresharedKey | None]] = []
        wall = self.wall()
        for key in keys:
            inst = self.installed.get(key)
            if inst is None:
                continue
            peer = peers.get(key)
            refused = "removed" if peer is None else peer.refusal(wall)
            if refused is not None:
                gone.append((key, inst.name, refused))
                continue
            assert peer is not None
            if peer.holder is not None and peer.holder != self.gateway_id:
                mark = peer.handshake_hwm
                seen = inst.seen
                if mark is not None and seen is not None and mark <= seen and mark != inst.admitted:
                    # the other gateway admitted a timestamp we had already seen (and did not
                    # admit ourselves): a copy of our client's initiation. The client is here;
                    # take the peer back. (The other gateway, seeing its own admitted mark,
                    # lets go.)
                    self.log.warning(
                        "handoff_refused", reason="replay", peer=peer.name, key=key.short(),
                        to_gateway=peer.holder,
                    )  # fmt: skip
                    self.counters["handoff_refused"] += 1
                    claim.append(key)
                    continue
                gone.append((key, inst.name, "handoff"))  # the client moved to that gateway
                continue
            if peer.holder is None:
                claim.append(key)  # our claim expired (a pause): say again that we hold it
            self._expire_at(key, inst, peer.expires_at)
            if fingerprint(peer) != inst.fingerprint:
                update.append((key, peer.allowed_ips, peer.preshared_key))
                inst.fingerprint = fingerprint(peer)
                self.log.info("update", peer=peer.name, key=key.short())
        if update:
            out.append(Update(tuple(update)))
        if claim:
            out.append(Claim(tuple(claim), self.gateway_id))
        self._evict(gone, out, release=False)

    def _adopt(self, lookup: Lookup, peers: dict[PublicKey, Peer], out: list[Effect]) -> None:
        """Track device peers the store allows (claim the unclaimed, push the store's config
        to them); remove the others, and those another gateway holds."""
        assert lookup.handshakes is not None
        reason = "reconcile" if lookup.purpose is Purpose.RECONCILE else "not_allowed"
        bad: list[tuple[PublicKey, str, str]] = []
        claim: list[PublicKey] = []
        update: list[tuple[PublicKey, tuple[IPNetwork, ...], PresharedKey | None]] = []
        wall = self.wall()
        for key, last in lookup.handshakes.items():
            if key in self.installed or key in self._pending:
                continue
            peer = peers.get(key)
            refused = None if peer is None else peer.refusal(wall)
            if peer is None or refused is not None:
                bad.append((key, peer.name if peer else "-", refused or reason))
                continue
            if peer.holder is not None and peer.holder != self.gateway_id:
                bad.append((key, peer.name, "handoff"))
                continue
            if peer.holder is None:
                claim.append(key)
            update.append((key, peer.allowed_ips, peer.preshared_key))
            # (swept: a stranger a sweep read is in that sweep's read)
            inst = self.installed[key] = Installed(
                peer.name, last or wall, fingerprint(peer), seen=peer.handshake_hwm, rx=-1,
                swept=self._sweep_gen,
            )  # fmt: skip
            self._expire_at(key, inst, peer.expires_at)
            self._claim_prefixes(key, peer)
        if update:
            out.append(Update(tuple(update)))
        if claim:
            out.append(Claim(tuple(claim), self.gateway_id))
        if lookup.purpose is not Purpose.RECONCILE:
            self._remove(bad, out)
            return
        # at start, removals wait for the whole device to be looked up: a store that knows
        # none of the device's peers is more likely the wrong store than a list of strangers
        r = self._reconciling
        r[0] -= 1
        r[1] += len(update)
        r[2] += len(peers)
        self._reconcile_bad.extend(bad)
        if r[0] > 0:
            return
        bad, self._reconcile_bad = self._reconcile_bad, []
        if bad and r[2] == 0 and not self.config.adopt_empty_store:
            self.refused_start = (
                f"the store knows none of the {len(bad)} peers on the device, so starting would "
                "remove them all; is it the right store? To start anyway (and remove them), "
                "pass --adopt-empty-store"
            )
            return
        self._remove(bad, out)
        self.log.info("reconcile", kept=r[1], removed=len(bad))

    def _remove(self, bad: list[tuple[PublicKey, str, str]], out: list[Effect]) -> None:
        for key, name, why in bad:
            self.log.info("evict", reason=why, peer=name, key=key.short(), _key=key)
        if bad:
            out.append(Remove(tuple(k for k, _, _ in bad)))

    # -- helpers --------------------------------------------------------------------------

    def _evict(self, gone: list[tuple[PublicKey, str, str]], out: list[Effect],
               release: bool) -> None:  # fmt: skip
        if not gone:
            return
        keys = tuple(k for k, _, _ in gone)
        final: dict[PublicKey, tuple[int, int]] | None = None
        if len(self.installed) <= FINAL_READ_MAX:
            final = {}
            for key in keys:
                inst = self.installed.get(key)
                if inst is not None and inst.rx >= 0:
                    final[key] = (inst.rx, inst.tx)
        out.append(Remove(keys, final or None))
        if release:
            out.append(Release(keys, self.gateway_id))
        for key, name, reason in gone:
            self.installed.pop(key, None)
            self._removed_during_sweep.add(key)
            self.log.info("evict", reason=reason, peer=name, key=key.short(), _key=key)
            self.counters["evicted_handoff" if reason == "handoff" else "evicted_store"] += 1

    def _account_final(self, final: dict[PublicKey, tuple[int, int]],
                       stats: dict[PublicKey, PeerStats], out: list[Effect]) -> None:  # fmt: skip
        """The counters of peers read just before their removal (see Remove.final)."""
        rows = []
        for key, st in stats.items():
            rx, tx = final[key]
            row = _account(key, Installed("", 0.0, 0, rx=rx, tx=tx), st, self._accounted_at)
            if row is not None:
                rows.append(row)
        if rows:
            out.append(self._record_traffic(rows))

    def _record_traffic(self, rows: list[Traffic]) -> RecordTraffic:
        """One write of `rows`, with those of a write that failed before."""
        if self._traffic_retry:
            rows = self._traffic_retry + rows
            self._traffic_retry = []
        return RecordTraffic(tuple(rows))

    def _retry_traffic(self, rows: Sequence[Traffic]) -> None:
        room = TRAFFIC_RETRY_MAX - len(self._traffic_retry)
        self._traffic_retry.extend(rows[:room])
        if len(rows) > room:
            self.counters["traffic_rows_dropped"] += len(rows) - room

    def _heartbeat(self) -> Heartbeat:
        """Our heartbeat, with what `wgjit status` shows of us: peers installed now and knocks
        dropped since start, by reason."""
        counts = self.counters
        rejects = {o.value: counts[o] for o in Outcome if not o.accepts and counts.get(o)}
        return Heartbeat(self.gateway_id, len(self.installed), rejects)

    def _store_call(self, effect: Effect, now: float) -> Effect:
        self._store_calls[id(effect)] = now
        return effect

    def _too_old(self, p: _Pending, k: _Knock, now: float, out: list[Effect]) -> bool:
        """A result for a knock older than max_install_age installs nothing."""
        age = now - k.knock.received_at
        if age <= self.config.max_install_age:
            return False
        self.log.warning("stale", stage=p.stage.value, key=p.key.short(), age_ms=round(age * 1000))
        self._finish(out, p, Outcome.TIMEOUT, count=False)
        self.counters["stale"] += 1
        return True

    def _fail_open(self, out: list[Effect], p: _Pending, k: _Knock, outcome: Outcome,
                   now: float) -> None:  # fmt: skip
        """Give a still-pending knock its (fail-open) verdict; the work goes on."""
        if self._fail_log.allow(now):
            self.log.warning(
                "fail_open",
                stage=p.stage.value,
                key=p.key.short(),
                source=str(k.knock.source),
                age_ms=round((now - k.knock.received_at) * 1000),
            )
        self._verdict(out, k.ticket, outcome, k.knock)
        k.failed_open, k.ticket = k.ticket, None

    def _drop_knock(self, out: list[Effect], p: _Pending, k: _Knock, outcome: Outcome,
                    name: str | None) -> None:  # fmt: skip
        p.knocks.remove(k)
        self._pending_knocks -= 1
        self._reject(outcome, k.knock, p.key, name)
        if k.ticket is not None:
            self._verdict(out, k.ticket, outcome, k.knock)
            k.ticket = None  # its budget has nothing left to time out
        else:
            self.counters[outcome] += 1

    def _finish(self, out: list[Effect], p: _Pending, outcome: Outcome,
                name: str | None = None, count: bool = True) -> None:  # fmt: skip
        """Every knock of `p` gets `outcome` (those still without a verdict); `p` is done."""
        if outcome is not Outcome.TIMEOUT:
            self._reject(outcome, p.knocks[0].knock if p.knocks else None, p.key, name)
        for k in p.knocks:
            if k.ticket is not None:
                self._verdict(out, k.ticket, outcome, k.knock)
                k.ticket = None
            elif count:
                self.counters[outcome] += 1
        self._forget(p)

    def _forget(self, p: _Pending) -> None:
        if self._pending.pop(p.key, None) is not None:
            self._pending_knocks -= len(p.knocks)

    def _verdict(self, out: list[Effect], ticket: object, outcome: Outcome, knock: Knock,
                 key: PublicKey | None = None) -> None:  # fmt: skip
        self.counters[outcome] += 1
        if outcome is Outcome.BAD_STATIC:  # its repeats with other timestamps: no X25519
            self._opens.put(knock.payload[OFF_EPHEMERAL:OFF_TIMESTAMP], outcome)
        if outcome in _QUIET and self.log.debug_enabled:  # every rekey passes here
            self.log.debug("knock", outcome=outcome.value, source=str(knock.source))
        out.append(Verdict(ticket, outcome, knock, key))

    def _note_handshake(self, key: PublicKey, inst: Installed, v: Verified) -> None:
        ts = v.timestamp.raw
        if inst.seen is None or ts > inst.seen:
            inst.seen = ts
            self._unwritten.add(key)

    def _under_load(self, knock: Knock, now: float) -> bool:
        """Load lasts UNDER_LOAD_FOR after its last sign (as in WireGuard): a knock that
        waited in the kernel's queue longer than load_delay, i.e. the loop cannot judge
        knocks as fast as they come, while it does costly work (see note_late); or a spent
        admission budget (see _knock). Knocks waiting for the store or the device are no
        sign: a failover herd waits there in order, and cookies would cost each client 5 s."""
        c = self.config
        if c.testing_always_under_load:
            self.note_load(now, "testing")
        elif now - knock.received_at > c.load_delay:
            self.note_late(now, "queue_delay")
        return now < self._load_until

    def _roll_tally(self, now: float) -> None:
        """Once per LOAD_WINDOW: the count of knocks at cost (costly or spared) then, and
        the one before."""
        if now - self._tally[1] < LOAD_WINDOW:
            return
        tally = (sum(self.counters[o] for o in _AT_COST), now)
        # after a quiet spell the count starts afresh: a flood then is a flood at once
        fresh = now - self._tally[1] >= 2 * LOAD_WINDOW
        self._tally_before = tally if fresh else self._tally
        self._tally = tally

    def note_late(self, now: float, sign: str) -> None:
        """Knocks wait too long: in the kernel's queue (the loop is behind), or judged and
        waiting for the device (hold mode's releases). A sign of load only if knocks are
        being judged at a cost (an X25519 and a look-up: new peers installed, keys refused)
        lately, which is what cookie replies spare: a flood of made-up keys, or a failover
        herd, which cookies spread over its clients' retries (held all in order instead,
        a 10 000 herd outgrew the install pipeline: docs/benchmarks.md). Not when the loop
        is late with cheap junk only (replays, bad mac1: dropped before any X25519 anyway),
        where cookies would spare nothing and cost each real client its 5 s retry. Knocks
        that load turned away before their X25519 (cookie replies, rate limits) count too:
        a flood of made-up keys stays load while its knocks get cookies, and one that goes
        on with copies only (dropped before any of that) stops being load."""
        self._roll_tally(now)
        work = sum(self.counters[o] for o in _AT_COST) - self._tally_before[0]
        if work >= LOAD_WORK_MIN:
            self.note_load(now, sign)
            return
        if now >= self._late_until:
            self.counters["running_late"] += 1
            self.log.info("running_late", sign=sign, judged_at_cost=work,
                          pending=self._pending_knocks)  # fmt: skip
        self._late_until = now + UNDER_LOAD_FOR

    def note_load(self, now: float, sign: str) -> None:
        """A sign of load (also from outside the policy: hold mode's releases waiting long for
        the device): load for UNDER_LOAD_FOR from now."""
        if now >= self._load_until:
            self.counters["under_load"] += 1
            self.log.info("under_load", sign=sign, pending=self._pending_knocks)
        self._load_until = now + UNDER_LOAD_FOR

    def _future(self, v: Verified, source: Endpoint, name: str) -> bool:
        """A timestamp too far ahead of our clock: refused, and logged as suspicious (a
        client clock far off, or someone with the static key but not the PSK trying to
        push the peer's mark out of reach)."""
        ahead = v.timestamp.to_unix() - self.wall()
        if ahead <= self.config.max_clock_skew:
            return False
        self.log.warning(
            "suspicious_timestamp", peer=name, key=v.public_key.short(), source=str(source),
            ahead_s=round(ahead),
        )  # fmt: skip
        return True

    def _write_marks(self) -> list[Effect]:
        """The marks of installed peers' handshakes since the last write, in one batch."""
        if not self._unwritten or self._writing_marks:
            return []
        wall = self.wall()
        marks = []
        for key in self._unwritten:
            inst = self.installed.get(key)
            if inst is not None and inst.seen is not None:
                marks.append(Handshake(key, inst.seen, wall))
        self._unwritten.clear()
        if not marks:
            return []
        self._writing_marks = True
        return [RecordHandshakes(tuple(marks))]

    def _claim_prefixes(self, key: PublicKey, peer: Peer) -> None:
        """Log when an install takes an allowed IP that another installed peer holds: the
        device's cryptokey routing moves it, and the other peer silently loses its traffic
        (possible only with peers added with --allow-overlap). `key` is the object `installed`
        is keyed by (the store's equal copy would cost another ~100 bytes per peer)."""
        for net in peer.allowed_ips:
            h = hash((net.version, int(net.network_address), net.prefixlen)) & HASH_BITS
            holder = self._prefixes.get(h)
            if holder is not None and holder != key and holder in self.installed:
                self.log.warning(
                    "prefix_conflict", prefix=str(net), peer=peer.name, key=key.short(),
                    taken_from=self.installed[holder].name,
                )  # fmt: skip
                self.counters["prefix_conflicts"] += 1
            self._prefixes[h] = key

    def _expire_at(self, key: PublicKey, inst: Installed, expires_at: float | None) -> None:
        if expires_at != inst.expires_at:
            inst.expires_at = expires_at
            if expires_at is not None:
                heapq.heappush(self._expiries, (expires_at, key))

    def _expire(self, out: list[Effect]) -> None:
        """Evict installed peers whose expiry passed (it is no store change: nothing in the
        change feed says so when the time comes)."""
        wall = self.wall()
        gone = []
        while self._expiries and self._expiries[0][0] <= wall:
            when, key = heapq.heappop(self._expiries)
            inst = self.installed.get(key)
            if inst is not None and inst.expires_at == when:
                gone.append((key, inst.name, "expired"))
        self._evict(gone, out, release=True)

    def _device_identity(self, identity: object) -> None:
        """A device created anew (wireguard-go restarted, interface re-added) has none of
        our peers: sweep now, so they are forgotten (and installed again at their next knock)
        instead of being answered from memory as installed until the next sweep."""
        before, self._identity = self._identity, identity
        if before is not _UNKNOWN and identity != before:
            self.log.warning("device_changed", installed=len(self.installed))
            self._next_sweep = -math.inf

    def _beat(self, error: Exception | None, now: float, out: list[Effect]) -> None:
        """After a pause (the store was unreachable, the heartbeat late or lost) our claims
        may have expired: look up everything we hold and claim it again (see _recheck)."""
        if error is not None:
            self._error("heartbeat_failed", error)
            self._beat_failed = True
            if self._beats_failing_since is None:
                self._beats_failing_since = now
            return
        if self._beats_failing_since is not None:
            # the line an operator looks for after the heartbeat_failed ones
            self.log.info("store_back", down_s=round(now - self._beats_failing_since, 1))
            self._beats_failing_since = None
        paused = self._beat_failed or now - self._last_beat > PRESENCE_TTL_S / 2
        self._beat_failed = False
        self._last_beat = now
        if paused and self.installed:
            self.log.info("reassert_claims", installed=len(self.installed))
            self._recheck_all(out)

    def _reject(
        self,
        reason: Outcome,
        knock: Knock | None,
        key: PublicKey | None = None,
        name: str | None = None,
    ) -> None:
        if reason in _QUIET or reason.accepts:
            return
        if self._reject_log.allow(self.wall()):
            self.log.info(
                "reject",
                reason=reason.value,
                peer=name,
                key=key.short() if key else None,
                source=str(knock.source) if knock else None,
            )

    def _error(self, event: str, error: Exception, **fields: object) -> None:
        self.counters["errors"] += 1
        if self._error_log.allow(self.wall()):
            self.log.error(event, error=f"{error}" or type(error).__name__, **fields)
