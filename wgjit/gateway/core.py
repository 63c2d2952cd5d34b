"""The gateway's policy: what to do with each captured initiation, when to evict, what to sync.

`Gateway` receives knocks (already captured) and clock readings, and drives a Device and a Store
through their small interfaces. It owns no socket and no timer: `wgjit.gateway.run` feeds it.
Order on the hot path, cheapest first: own-interface and duplicate drops, global rate limit,
mac1, per-source rate limit, static-key decryption (1 DH), negative cache and store lookup for
keys not installed, authentication (static DH, cached per peer, + timestamp), anti-replay
(atomic in the store), install, handshake completion.
"""

from __future__ import annotations

import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from wgjit.addr import Endpoint, IPNetwork
from wgjit.capture.packet import Knock
from wgjit.device import Device, DeviceError, DeviceState, PeerConfig
from wgjit.events import EventLog
from wgjit.gateway.limits import KeyedRateLimiter, TokenBucket, TTLSet
from wgjit.handshake import HandshakeError, Responder, Verified
from wgjit.keys import PresharedKey, PublicKey
from wgjit.store import ChangeFeedExpired, Handshake, Peer, Store, StoreError

# WireGuard's REJECT_AFTER_TIME (messages.h): a session older than this is dead, so evicting a
# peer idle for longer can never cut a live session.
REJECT_AFTER_TIME = 180.0
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_SWEEP_INTERVAL = 15.0
MIN_SWEEP_INTERVAL = 1.0


# outcomes that are normal or too frequent for a line each at info level
_QUIET = frozenset({"duplicate", "rate_limited", "negative_cached", "already_installed"})

# How the handshake is completed after an install (GatewayConfig.completion):
#   hold   - the initiation waits in an NFQUEUE; the loop releases it once installed
#   replay - the loop re-injects the captured initiation once installed
#   invert - the device initiates back to the captured endpoint (complete_due)
#   none   - nothing: the client's 5 s retry does it (testing/benchmarks only)
COMPLETIONS = ("hold", "replay", "invert", "none")

# Outcomes whose held initiation is let through to the device (hold mode); everything else
# (unknown, negatively cached, revoked, forged, replayed, malformed, duplicate, failed install)
# is dropped. Let through without a judgement: own_interface (it came through the tunnel: not a
# knock for us) and rate_limited (our limits protect the gateway's CPU; the device checks every
# initiation itself and has its own limiter, so passing one on admits nobody, while dropping it
# would let a noisy neighbour behind the same address block installed peers' handshakes).
ACCEPT_OUTCOMES = frozenset({"installed", "already_installed", "own_interface", "rate_limited"})


def release(outcome: str) -> bool:
    """Whether a held initiation with this outcome goes on to the device (hold mode)."""
    return outcome in ACCEPT_OUTCOMES


class ConfigError(ValueError):
    """A gateway setting is out of range; the message names the option and the fix."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    sweep_interval: float = DEFAULT_SWEEP_INTERVAL
    change_poll_interval: float = 0.5  # revocations must reach the device within ~2 s
    negative_cache_ttl: float = 30.0
    # the same datagram crossing several interfaces (bridge port, bridge) arrives within
    # microseconds; a short window also lets a replay be seen (and logged) as a replay
    duplicate_ttl: float = 2.0
    per_source_rate: float = 20.0  # like the kernel's handshake limiter: 20/s per source IP
    per_source_burst: float = 20.0
    global_rate: float = 5000.0
    global_burst: float = 1000.0
    # how long after a knock the gateway initiates back (see Gateway.complete_due)
    invert_delay: float = 0.005
    completion: str = "invert"  # one of COMPLETIONS
    # presence in a shared store: who we are (default: the host name), how often we say so
    gateway_id: str = ""
    heartbeat_interval: float = 5.0
    testing_short_timers: bool = False
    adopt_empty_store: bool = False  # reconcile may empty the device when the store is empty

    def validate(self) -> list[str]:
        """Raise ConfigError for unsafe values; return warnings to log."""
        warnings: list[str] = []
        if self.idle_timeout <= 0 or self.sweep_interval <= 0:
            raise ConfigError("--idle-timeout and --sweep-interval must be positive")
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
        if self.per_source_rate <= 0 or self.global_rate <= 0:
            raise ConfigError("rate limits must be positive")
        if self.completion not in COMPLETIONS:
            raise ConfigError(f"--mode must be one of {', '.join(COMPLETIONS)}")
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
    # what the device was given, so a store change is pushed only if it changes something
    allowed_ips: tuple[IPNetwork, ...]
    preshared_key: PresharedKey | None
    hwm: bytes | None = None  # newest timestamp known to the store
    pending: Handshake | None = None  # newer timestamp seen, not yet written


@dataclass
class Gateway:
    device: Device
    store: Store
    config: GatewayConfig
    log: EventLog
    responder: Responder
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    ignore_ifindex: int = -1
    installed: dict[PublicKey, Installed] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)
    cursor: int = 0

    def __post_init__(self) -> None:
        c = self.config
        self._dupes: TTLSet[bytes] = TTLSet(c.duplicate_ttl, 65536)
        self._negative: TTLSet[PublicKey] = TTLSet(c.negative_cache_ttl, 65536)
        self._global = TokenBucket(c.global_rate, c.global_burst)
        self._per_source: KeyedRateLimiter[object] = KeyedRateLimiter(
            c.per_source_rate, c.per_source_burst
        )
        self._completions: deque[tuple[float, PublicKey]] = deque()
        self._reject_log = TokenBucket(20.0, 50.0)  # bound log volume under attack
        self.gateway_id = c.gateway_id or socket.gethostname()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Reconcile the device with the store, then start following the change feed."""
        self.store.heartbeat(self.gateway_id)
        self.cursor = self.store.change_cursor()
        state = self.device.read()
        removed = self._adopt(state, self.wall(), reason="reconcile")
        self.log.info(
            "reconcile", kept=len(self.installed), removed=removed, interface=self.device.name
        )

    def shutdown(self) -> None:
        self._flush_handshakes()

    def heartbeat(self) -> None:
        """Tell the store we are alive (our claims on peers stay valid)."""
        self.store.heartbeat(self.gateway_id)

    # -- hot path -------------------------------------------------------------------------

    def handle(self, knock: Knock) -> str:
        """Process one captured initiation; returns the outcome (also counted)."""
        try:
            outcome = self._handle(knock)
        except (DeviceError, StoreError) as e:
            outcome = "install_failed"
            self.log.error("install_failed", source=str(knock.source), error=str(e))
        self.counters[outcome] += 1
        if outcome in _QUIET:
            self.log.debug("knock", outcome=outcome, source=str(knock.source))
        return outcome

    def _handle(self, knock: Knock) -> str:
        now = knock.received_at
        if knock.ifindex == self.ignore_ifindex:
            return "own_interface"
        # the same datagram is seen on every interface it crosses (bridge port and bridge)
        if self._dupes.seen(knock.payload[116:132], now):
            return "duplicate"
        if not self._global.allow(now):
            return "rate_limited"
        try:
            self.responder.check_mac1(knock.payload)
        except HandshakeError as e:
            self.log.debug("reject", reason=e.reason, source=str(knock.source))
            return e.reason
        if not self._per_source.allow(knock.source.host, now):
            return "rate_limited"
        try:
            opened = self.responder.open_static(knock.payload)
        except HandshakeError as e:
            self._reject(e.reason, knock.source)
            return e.reason
        key = opened.public_key  # claimed; proven only by authenticate()
        inst = self.installed.get(key)
        peer = None
        if inst is None:
            # unknown keys are dropped before the second X25519: a flood of made-up keys
            # costs one DH each, and a negatively cached key costs no store query
            if self._negative.contains(key, now):
                return "negative_cached"
            peer = self.store.lookup(key)
            if peer is None or peer.revoked:
                reason = "unknown" if peer is None else "revoked"
                self._negative.add(key, now)
                self._reject(reason, knock.source, key, peer.name if peer else None)
                return reason
        try:
            v = self.responder.authenticate(opened)
        except HandshakeError as e:
            self._reject(e.reason, knock.source, key, inst.name if inst else None)
            return e.reason
        if inst is not None:
            self._note_handshake(inst, v)
            return "already_installed"
        assert peer is not None
        if peer.handshake_hwm is not None and v.timestamp.raw <= peer.handshake_hwm:
            self._reject("replay", knock.source, v.public_key, peer.name)
            return "replay"
        if not self.store.advance_handshake(Handshake(v.public_key, v.timestamp.raw, self.wall())):
            self._reject("replay", knock.source, v.public_key, peer.name)
            return "replay"
        # presence: a gateway holding this peer now learns (change feed) to drop it
        previous = self.store.claim(v.public_key, self.gateway_id)
        self._install(peer, knock.source, now)
        self.installed[v.public_key] = Installed(
            peer.name, self.wall(), peer.allowed_ips, peer.preshared_key, hwm=v.timestamp.raw
        )
        self.log.info(
            "install",
            peer=peer.name,
            key=v.public_key.short(),
            endpoint=str(knock.source),
            took_ms=round((self.clock() - now) * 1000, 2),
            **({"from_gateway": previous} if previous else {}),
        )
        return "installed"

    def _install(self, peer: Peer, endpoint: Endpoint, received_at: float) -> None:
        self.device.set_peer(
            PeerConfig(
                peer.public_key,
                endpoint=endpoint,
                allowed_ips=peer.allowed_ips,
                preshared_key=peer.preshared_key,
            )
        )
        if self.config.completion == "invert":
            self._completions.append((received_at + self.config.invert_delay, peer.public_key))

    def next_completion(self) -> float | None:
        """When complete_due() next has work (monotonic), or None."""
        return self._completions[0][0] if self._completions else None

    def complete_due(self, now: float) -> None:
        """Role inversion for installs whose initiation the device has had time to see.

        The device may still have the client's first initiation queued when the peer lands;
        it then answers it itself. If the gateway's own initiation reached the client before
        that answer, each side would overwrite the other's handshake state and both would
        fail until the client's 5 s retry. Waiting `invert_delay` after the knock lets the
        device finish with the client's initiation first; an inversion after a completed
        handshake is harmless (one spare handshake).

        A persistent keepalive switched on for a peer with no session makes the device send
        a keepalive, which needs a handshake: the device initiates to the captured endpoint.
        Switching it off right after leaves no keepalive behind; the initiation is already
        on its way (a single transaction setting 1 then 0 would send nothing).
        """
        while self._completions and self._completions[0][0] <= now:
            _, key = self._completions.popleft()
            if key not in self.installed:
                continue
            self.device.set_peer(PeerConfig(key, persistent_keepalive=1, update_only=True))
            self.device.set_peer(PeerConfig(key, persistent_keepalive=0, update_only=True))

    def _note_handshake(self, inst: Installed, v: Verified) -> None:
        ts = v.timestamp.raw
        newest = inst.pending.timestamp if inst.pending else inst.hwm
        if newest is None or ts > newest:
            inst.pending = Handshake(v.public_key, ts, self.wall())

    def _reject(
        self,
        reason: str,
        source: Endpoint,
        key: PublicKey | None = None,
        name: str | None = None,
    ) -> None:
        if self._reject_log.allow(self.clock()):
            self.log.info(
                "reject",
                reason=reason,
                peer=name,
                key=key.short() if key else None,
                source=str(source),
            )

    # -- periodic work --------------------------------------------------------------------

    def sweep(self) -> None:
        """Evict idle peers, adopt or remove peers that appeared behind our back, and write
        the handshake marks seen since the last sweep."""
        wall = self.wall()
        self._flush_handshakes()
        state = self.device.read()
        for key in [k for k in self.installed if k not in state.peers]:
            del self.installed[key]  # removed by someone else
        self._adopt(state, wall, reason="not_allowed")
        idle: list[tuple[PublicKey, float]] = []
        for key, ps in state.peers.items():
            inst = self.installed.get(key)
            if inst is None:
                continue
            last = max(ps.last_handshake or 0.0, inst.installed_at)
            if wall - last >= self.config.idle_timeout:
                idle.append((key, wall - last))
        if idle:
            self.device.remove_peers(k for k, _ in idle)
            self.store.release((k for k, _ in idle), self.gateway_id)
            for key, idle_for in idle:
                inst = self.installed.pop(key)
                self.log.info(
                    "evict", reason="idle", peer=inst.name, key=key.short(), idle_s=round(idle_for)
                )
        self.counters["evicted_idle"] += len(idle)

    def poll_changes(self) -> None:
        """Apply store changes (revocations, removals, new peers) since the last poll."""
        try:
            keys, self.cursor = self.store.changes_since(self.cursor)
        except ChangeFeedExpired as e:
            # we fell behind the feed (or the store was replaced): recheck everything we hold
            self.log.warning("change_feed_reset", error=str(e))
            self.cursor = self.store.change_cursor()
            self._negative.clear()
            keys = list(self.installed)
        gone: list[tuple[PublicKey, str, str]] = []
        for key in keys:
            self._negative.discard(key)
            inst = self.installed.get(key)
            if inst is None:
                continue
            peer = self.store.lookup(key)
            if peer is None or peer.revoked:
                gone.append((key, inst.name, "removed" if peer is None else "revoked"))
            elif peer.holder is not None and peer.holder != self.gateway_id:
                # another gateway installed it: the client moved there
                gone.append((key, inst.name, "handoff"))
            elif (
                set(peer.allowed_ips) != set(inst.allowed_ips)
                or peer.preshared_key != inst.preshared_key
            ):
                self.device.set_peer(
                    PeerConfig(
                        key,
                        allowed_ips=peer.allowed_ips,
                        preshared_key=peer.preshared_key,
                        update_only=True,
                    )
                )
                inst.allowed_ips, inst.preshared_key = peer.allowed_ips, peer.preshared_key
                self.log.info("update", peer=peer.name, key=key.short())
        if gone:
            self.device.remove_peers(k for k, _, _ in gone)
            for key, name, reason in gone:
                del self.installed[key]
                self.log.info("evict", reason=reason, peer=name, key=key.short())
                self.counters["evicted_handoff" if reason == "handoff" else "evicted_store"] += 1

    # -- helpers --------------------------------------------------------------------------

    def _adopt(self, state: DeviceState, wall: float, reason: str) -> int:
        """Track device peers the store allows (and claim them); remove the others, and those
        another gateway holds. Returns how many removed."""
        bad: list[tuple[PublicKey, str, str]] = []
        for key, ps in state.peers.items():
            if key in self.installed:
                continue
            peer = self.store.lookup(key)
            if peer is None or peer.revoked:
                bad.append((key, peer.name if peer else "-", reason))
                continue
            if peer.holder is not None and peer.holder != self.gateway_id:
                bad.append((key, peer.name, "handoff"))
                continue
            if peer.holder is None:
                self.store.claim(key, self.gateway_id)
            self.installed[key] = Installed(
                peer.name,
                ps.last_handshake or wall,
                ps.allowed_ips,
                peer.preshared_key,
                hwm=peer.handshake_hwm,
            )
        if bad:
            self.device.remove_peers(k for k, _, _ in bad)
            for key, name, why in bad:
                self.log.info("evict", reason=why, peer=name, key=key.short())
        return len(bad)

    def _flush_handshakes(self) -> None:
        pending = [i for i in self.installed.values() if i.pending]
        if not pending:
            return
        self.store.record_handshakes(i.pending for i in pending if i.pending)
        for i in pending:
            assert i.pending is not None
            i.hwm, i.pending = i.pending.timestamp, None
