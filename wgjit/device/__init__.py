"""The device room: one small interface to a WireGuard device, one backend per implementation.

Backends: `uapi` (wireguard-go and other userspace implementations, via the UAPI unix socket)
and `netlink` (kernel WireGuard, via generic netlink). Backends change one peer or a batch of
peers (additions, updates or removals) and never replace the whole peer list. Nothing here knows
about stores or policy.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from wgjit.addr import Endpoint, IPNetwork
from wgjit.errors import WgjitError
from wgjit.keys import PresharedKey, PrivateKey, PublicKey


class DeviceError(WgjitError):
    """A device operation failed; the message names the interface and the operation."""


class DeviceNotFound(DeviceError):
    """The interface does not exist or is not a WireGuard device this backend can reach."""


# One peer as a sweep sees it (Device.stats): (last handshake in unix seconds, 0.0 if never;
# bytes received; bytes sent; endpoint as "host:port" / "[v6]:port", None if none). A plain
# tuple: a sweep of 100 000 peers holds one each, so no per-peer object beyond it.
PeerStats = tuple[float, int, int, str | None]


class StatsDump(Protocol):
    """One read of every peer's PeerStats (Device.stats_dump), taken a chunk at a time as the
    device's answer is parsed: whoever reads it holds one chunk's tuples, never the whole
    device's. Not thread-safe: one thread takes from it at a time."""

    done: bool  # the last peers were taken (the dump is closed)
    # with `done`: every peer of the device was in the dump. False when the device changed
    # while it was read (netlink's NLM_F_DUMP_INTR) and peers may be missing from it.
    complete: bool

    def take(self, peers: int) -> dict[PublicKey, PeerStats]:
        """The next peers: `peers` or a few more (what the last message or read held), fewer
        only when the dump ends with them (`done` is then True; {} once done). Raises
        DeviceError (which names the interface); the dump is then closed."""
        ...

    def close(self) -> None:
        """Stop reading (and let the device go) before the end; harmless after it."""
        ...


class SnapshotDump:
    """A StatsDump of peers already read whole (a device that cannot stream its answer)."""

    def __init__(self, stats: dict[PublicKey, PeerStats]) -> None:
        self._items: Iterator[tuple[PublicKey, PeerStats]] | None = iter(stats.items())
        self._left = len(stats)
        self.done = not stats
        self.complete = True

    def take(self, peers: int) -> dict[PublicKey, PeerStats]:
        if self._items is None:
            return {}
        chunk = dict(itertools.islice(self._items, max(peers, 1)))
        self._left -= len(chunk)
        if self._left <= 0:
            self.close()
        return chunk

    def close(self) -> None:
        self._items = None
        self.done = True


@dataclass(frozen=True, slots=True)
class PeerState:
    public_key: PublicKey
    endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    last_handshake: float | None = None  # unix seconds; None if never
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int = 0


@dataclass(frozen=True, slots=True)
class DeviceState:
    name: str
    private_key: PrivateKey | None
    listen_port: int
    peers: dict[PublicKey, PeerState] = field(default_factory=dict)

    @property
    def public_key(self) -> PublicKey | None:
        return self.private_key.public_key() if self.private_key else None


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One peer change, explicit like wgctrl-go's PeerConfig.

    Fields left as None are not touched. `allowed_ips`, when given, replaces that peer's list.
    `update_only` makes the change a no-op if the peer is not on the device.
    """

    public_key: PublicKey
    endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] | None = None
    preshared_key: PresharedKey | None = None
    persistent_keepalive: int | None = None
    update_only: bool = False


class Device(Protocol):
    name: str

    def read(self, peers: bool = True) -> DeviceState:
        """The device's keys, port and all peers; with `peers=False` only its keys and port,
        at a fraction of the cost on a big device (its peers are stepped over)."""
        ...

    def handshakes(self) -> dict[PublicKey, float]:
        """Every peer's last handshake (unix seconds; 0.0 if never): all idle eviction needs.

        Reads the same dump as read() but keeps only the key and the handshake time of each
        peer, at a fraction of read()'s time and memory (nothing else is decoded)."""
        ...

    def stats(self) -> dict[PublicKey, PeerStats]:
        """Every peer's last handshake, byte counters and endpoint (see PeerStats): what a
        sweep needs (idle eviction and traffic accounting). Reads the same dump as
        handshakes(), decoding three more small fields per peer; allowed IPs and the rest
        are stepped over as there. The counters restart when a peer is added anew."""
        ...

    def stats_dump(self) -> StatsDump:
        """What stats() reads, in chunks as the answer is parsed (what a sweep reads): on a
        connection of its own, so the handle stays free for other calls meanwhile (but
        wireguard-go applies no change until its answer is read to the end: take the chunks
        without long pauses). Raises DeviceError if the read cannot start."""
        ...

    def set_peer(self, config: PeerConfig) -> None:
        """Add or update one peer; other peers are untouched."""
        ...

    def set_peers(self, configs: Sequence[PeerConfig]) -> None:
        """set_peer() for each config, in order, in as few device operations as possible
        (one UAPI transaction per 8 192 peers; as many peers per netlink message as fit).

        Not atomic: on DeviceError (which names the interface) any prefix of the batch may
        have been applied. Re-applying a config is harmless, so a caller may retry the whole
        batch or re-read the device. An empty batch does no I/O."""
        ...

    def remove_peers(self, keys: Iterable[PublicKey]) -> None:
        """Remove these peers in as few operations as possible; absent keys are ignored."""
        ...

    def identity(self) -> object:
        """Something cheap to read (no dump) that changes when the device is created anew:
        wireguard-go restarted, the interface deleted and added again. None if it is gone."""
        ...

    def close(self) -> None: ...


BACKENDS = ("auto", "uapi", "netlink")


def open_device(ifname: str, backend: str = "auto") -> Device:
    """Open `ifname` with the named backend.

    `auto` picks UAPI when a wireguard-go socket exists for the name, else kernel WireGuard
    over netlink; the error then says what the interface is missing."""
    from wgjit.device.netlink import (
        InterfaceMissing,
        NetlinkDevice,
        NotWireGuard,
        WireGuardModuleMissing,
    )
    from wgjit.device.uapi import UAPIDevice, uapi_socket_path

    if backend not in BACKENDS:
        raise DeviceError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "uapi" or (backend == "auto" and uapi_socket_path(ifname).exists()):
        return UAPIDevice(ifname)
    try:
        return NetlinkDevice(ifname)
    except (InterfaceMissing, NotWireGuard, WireGuardModuleMissing) as e:
        if backend == "netlink":
            raise
        # auto: the user may have meant wireguard-go, so name both fixes
        sock = uapi_socket_path(ifname)
        kind = _other_kind(ifname)
        if kind is not None:
            msg = (
                f"interface {ifname!r} is {kind}, not a WireGuard interface; give the WireGuard"
                " interface (`wg show interfaces` lists them)"
            )
        elif isinstance(e, WireGuardModuleMissing):
            msg = (
                f"interface {ifname!r} has no wireguard-go socket at {sock} and kernel "
                "WireGuard is not available: load it with `modprobe wireguard` "
                f"or start `wireguard-go {ifname}`"
            )
        elif isinstance(e, InterfaceMissing):
            msg = (
                f"interface {ifname!r} does not exist in this network namespace; create it with "
                f"`ip link add {ifname} type wireguard` or start `wireguard-go {ifname}`"
            )
        else:
            msg = (
                f"interface {ifname!r} is not kernel WireGuard and has no wireguard-go socket "
                f"at {sock}; is wireguard-go running?"
            )
        raise type(e)(msg, e.errno) from None


# link types (ARPHRD_*, /sys/class/net/IFNAME/type) of interfaces that are certainly not
# WireGuard; kernel WireGuard and TUN (wireguard-go) are ARPHRD_NONE (65534)
_LINK_KINDS = {1: "an Ethernet interface", 772: "the loopback interface", 768: "an IP tunnel",
               769: "an IPv6 tunnel", 776: "an IPv6-in-IPv4 tunnel", 778: "a GRE tunnel",
               32: "an InfiniBand interface", 801: "a wireless interface"}  # fmt: skip


def _other_kind(ifname: str) -> str | None:
    """What `ifname` is if it exists in this namespace and is certainly not WireGuard."""
    import socket
    from pathlib import Path

    try:
        socket.if_nametoindex(ifname)
        link_type = int((Path("/sys/class/net") / ifname / "type").read_text())
    except (OSError, ValueError):
        return None
    if link_type == 65534:
        return None
    return _LINK_KINDS.get(link_type, f"a network interface of link type {link_type}")
