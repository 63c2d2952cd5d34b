"""What the policy asks the outside world to do, and the one place that does it.

Effects are plain values returned by `wgjit.gateway.core.Policy`. Each names where it runs:
`STORE`, `DEVICE` (changes to the device, in order), `SWEEP` (reading all of the device, a
chunk at a time, on a thread of its own so installs never wait behind a big device's dump) or
`LOOP` (verdicts, which the completion mode gives on the loop's thread). `perform()` maps a
store or device effect to its call. The loop runs `perform()` on worker threads
(`wgjit.gateway.run`); tests and start-up run it inline (`run_inline`). Effects compare by
identity: the policy matches each result to the effect it issued.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from wgjit.addr import Endpoint, IPNetwork
from wgjit.capture.packet import Knock
from wgjit.device import Device, DeviceError, PeerConfig, PeerStats, StatsDump
from wgjit.gateway.outcome import Outcome
from wgjit.handshake import Opened
from wgjit.keys import PresharedKey, PublicKey
from wgjit.store import Handshake, Peer, Store, Traffic

STORE = "store"
DEVICE = "device"
SWEEP = "sweep"
LOOP = "loop"
POOL = "pool"


class Purpose(enum.StrEnum):
    """Why peers are looked up (the result goes to a different decision)."""

    ADMIT = "lookup"  # knocks of keys not installed
    RECONCILE = "reconcile"  # the device's peers at start
    ADOPT = "adopt"  # peers that appeared on the device behind our back
    RECHECK = "recheck"  # installed peers the change feed mentioned


@dataclass(frozen=True, slots=True, eq=False)
class Lookup:
    where: ClassVar[str] = STORE
    what: ClassVar[str] = "lookup"
    keys: tuple[PublicKey, ...]
    purpose: Purpose
    # RECONCILE/ADOPT: each device peer's last handshake (unix s), to track it from there
    handshakes: dict[PublicKey, float] | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    fresh: bool  # the timestamp was newer than the stored mark, which now holds it
    previous_holder: str | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Admit:
    """Advance the peer's anti-replay mark (atomically; refused if not newer) and claim it."""

    where: ClassVar[str] = STORE
    what: ClassVar[str] = "admit"
    handshake: Handshake
    gateway_id: str


@dataclass(frozen=True, slots=True, eq=False)
class Install:
    where: ClassVar[str] = DEVICE
    what: ClassVar[str] = "install"
    peer: Peer
    endpoint: Endpoint
    timestamp: bytes  # the admitted handshake's, now the peer's mark
    previous_holder: str | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Update:
    """Give installed peers the store's config (allowed IPs, PSK), in one batch."""

    where: ClassVar[str] = DEVICE
    what: ClassVar[str] = "update"
    peers: tuple[tuple[PublicKey, tuple[IPNetwork, ...], PresharedKey | None], ...]


@dataclass(frozen=True, slots=True, eq=False)
class Invert:
    """Make the device initiate to the peer's endpoint (role inversion)."""

    where: ClassVar[str] = DEVICE
    what: ClassVar[str] = "invert"
    key: PublicKey


@dataclass(frozen=True, slots=True, eq=False)
class Remove:
    """Remove peers from the device. With `final` (each key's counters as last accounted,
    rx and tx), read the device's counters first, just before the removal: the result is
    those of the keys still there (a dict key -> PeerStats), so the policy can account their
    last bytes; if that read fails the peers are removed all the same (result None)."""

    where: ClassVar[str] = DEVICE
    what: ClassVar[str] = "remove"
    keys: tuple[PublicKey, ...]
    final: dict[PublicKey, tuple[int, int]] | None = None


@dataclass(frozen=True, slots=True, eq=False)
class ReadHandshakes:
    """The next chunk of a sweep's read of the device (Device.stats_dump): about `peers`
    device peers' last handshake, byte counters and endpoint, what the sweep needs for idle
    eviction and traffic accounting. `dump` None starts the read; else it goes on with the
    dump of the previous chunk's result (a StatsChunk)."""

    where: ClassVar[str] = SWEEP
    what: ClassVar[str] = "sweep"
    dump: StatsDump | None = None
    peers: int = 4096


@dataclass(frozen=True, slots=True)
class StatsChunk:
    """What a ReadHandshakes read: a chunk of the dump, and the dump to read on from."""

    stats: dict[PublicKey, PeerStats]
    dump: StatsDump
    last: bool  # the dump ended with this chunk
    complete: bool  # (with `last`) every device peer was in the dump (see StatsDump)


@dataclass(frozen=True, slots=True, eq=False)
class ReadIdentity:
    """Whether the device is still the one we installed peers on (Device.identity)."""

    where: ClassVar[str] = SWEEP
    what: ClassVar[str] = "device_check"


@dataclass(frozen=True, slots=True, eq=False)
class Release:
    where: ClassVar[str] = STORE
    what: ClassVar[str] = "release"
    keys: tuple[PublicKey, ...]
    gateway_id: str


@dataclass(frozen=True, slots=True, eq=False)
class Claim:
    where: ClassVar[str] = STORE
    what: ClassVar[str] = "claim"
    keys: tuple[PublicKey, ...]
    gateway_id: str


@dataclass(frozen=True, slots=True, eq=False)
class RecordHandshakes:
    where: ClassVar[str] = STORE
    what: ClassVar[str] = "record_handshakes"
    handshakes: tuple[Handshake, ...]


@dataclass(frozen=True, slots=True, eq=False)
class RecordTraffic:
    """Add what the device counted to the stored per-peer status, one batch per chunk of a
    sweep's read or per eviction (Store.record_traffic)."""

    where: ClassVar[str] = STORE
    what: ClassVar[str] = "record_traffic"
    rows: tuple[Traffic, ...]


@dataclass(frozen=True, slots=True, eq=False)
class ReadChanges:
    """The change feed after `cursor`; None: start following it (its current position)."""

    where: ClassVar[str] = STORE
    what: ClassVar[str] = "poll_changes"
    cursor: int | None


@dataclass(frozen=True, slots=True)
class Changes:
    keys: list[PublicKey]
    cursor: int
    # the store's wake-up fd as of now (it may change with reconnects), or None: poll
    wakeup_fd: int | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Heartbeat:
    where: ClassVar[str] = STORE
    what: ClassVar[str] = "heartbeat"
    gateway_id: str
    installed: int | None = None  # peers on the device now
    rejects: dict[str, int] | None = None  # knocks dropped since start, by reason


@dataclass(frozen=True, slots=True, eq=False)
class Verify:
    """A knock's X25519 work, for the verify pool (--workers > 1): open its static key, or,
    with `opened`, authenticate the claimed key (on `worker`, the one that opened it). The
    result comes back through Policy.on_verified."""

    where: ClassVar[str] = POOL
    what: ClassVar[str] = "verify"
    knock: Knock
    ticket: object
    opened: Opened | None = None
    worker: int = -1
    waiter: object = None  # the policy's own note, back with the result


@dataclass(slots=True, eq=False)  # not frozen, as Knock: one per knock
class Verdict:
    """The knock's outcome, for the completion mode: hold gives the kernel its verdict
    (`ticket` is the held packet; None when it already had one), replay and invert act on
    an install. An install of a knock that had its (fail-open) verdict before comes with
    `had`, the ticket that verdict went with (hold: the packet, maybe still paced)."""

    where: ClassVar[str] = LOOP
    what: ClassVar[str] = "verdict"
    ticket: object
    outcome: Outcome
    knock: Knock
    key: PublicKey | None = None  # for installs
    reply: bytes | None = None  # a cookie reply to send to the knock's source
    had: object = None


Effect = (
    Lookup | Admit | Install | Update | Invert | Remove | ReadHandshakes | ReadIdentity | Release
    | Claim
    | RecordHandshakes | RecordTraffic | ReadChanges | Heartbeat | Verdict | Verify
)  # fmt: skip


def perform(effect: Effect, store: Store, device: Device) -> object:
    """Carry out one store or device effect; returns what the policy's on_done() expects.
    Raises what the store or device raises (StoreError, DeviceError, ...)."""
    match effect:
        case Lookup(keys=keys):
            return store.lookup_many(keys)
        case Admit():
            return admit_all([effect], store)[0]
        case Install():
            install_all([effect], device)
            return None
        case Update(peers=peers):
            device.set_peers(
                [
                    PeerConfig(key, allowed_ips=ips, preshared_key=psk, update_only=True)
                    for key, ips, psk in peers
                ]
            )
            return None
        case Invert(key=key):
            # A keepalive switched on for a peer without a session makes the device send one,
            # which needs a handshake: it initiates to the endpoint. Off right after, in a
            # second transaction (1 then 0 in one would send nothing).
            device.set_peer(PeerConfig(key, persistent_keepalive=1, update_only=True))
            device.set_peer(PeerConfig(key, persistent_keepalive=0, update_only=True))
            return None
        case Remove(keys=keys, final=final):
            last: dict[PublicKey, PeerStats] | None = None
            if final is not None:
                try:
                    stats = device.stats()
                    last = {k: stats[k] for k in final if k in stats}
                except DeviceError:
                    last = None  # the removal matters more than the counters
            device.remove_peers(keys)
            return last
        case ReadHandshakes(dump=dump, peers=peers):
            if dump is None:
                dump = device.stats_dump()
            stats = dump.take(peers)
            return StatsChunk(stats, dump, dump.done, dump.complete)
        case ReadIdentity():
            return device.identity()
        case Release(keys=keys, gateway_id=gid):
            store.release(keys, gid)
            return None
        case Claim(keys=keys, gateway_id=gid):
            store.claim_many(keys, gid)
            return None
        case RecordHandshakes(handshakes=hss):
            store.record_handshakes(hss)
            return None
        case ReadChanges(cursor=cursor):
            changed: list[PublicKey] = []
            if cursor is None:
                position = store.change_cursor()
            else:
                changed, position = store.changes_since(cursor)
            return Changes(changed, position, store.wakeup_fd())
        case RecordTraffic(rows=rows):
            store.record_traffic(rows)
            return None
        case Heartbeat(gateway_id=gid, installed=installed, rejects=rejects):
            store.heartbeat(gid, installed=installed, rejects=rejects)
            return None
    raise TypeError(f"{type(effect).__name__} is not a store or device effect")


def admit_all(admits: Sequence[Admit], store: Store) -> list[Admitted]:
    """Several admissions in one store transaction (a herd knocking at once); the results in
    the order of `admits`, which are all for one gateway and for distinct keys."""
    if not admits:
        return []
    fresh = store.admit_many([a.handshake for a in admits], admits[0].gateway_id)
    return [
        Admitted(True, fresh[k]) if (k := a.handshake.public_key) in fresh else Admitted(False)
        for a in admits
    ]


def install_all(installs: Sequence[Install], device: Device) -> None:
    """Several installs in as few device operations as possible (a herd knocking at once)."""
    device.set_peers(
        [
            PeerConfig(
                i.peer.public_key,
                endpoint=i.endpoint,
                allowed_ips=i.peer.allowed_ips,
                preshared_key=i.peer.preshared_key,
            )
            for i in installs
        ]
    )


def run_inline(
    effects: Sequence[Effect],
    on_done: Callable[[Effect, object, Exception | None], Sequence[Effect]],
    store: Store,
    device: Device,
    on_verdict: Callable[[Verdict], None] | None = None,
) -> None:
    """Carry out `effects` and everything their results lead to, one at a time, on this
    thread (start-up, tests). Verdicts go to `on_verdict`. Depth first: what a result leads
    to runs before the next effect (a chunk of reconcile is done before the next is read)."""
    todo = list(reversed(effects))
    while todo:
        effect = todo.pop()
        if isinstance(effect, Verdict):
            if on_verdict is not None:
                on_verdict(effect)
            continue
        try:
            result, error = perform(effect, store, device), None
        except Exception as e:
            result, error = None, e
        todo.extend(reversed(on_done(effect, result, error)))
