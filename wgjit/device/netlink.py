"""Netlink backend: kernel WireGuard through its generic netlink family (`wireguard`).

Builds and parses WG_CMD_GET_DEVICE / WG_CMD_SET_DEVICE messages itself on a plain
AF_NETLINK socket (the layout is include/uapi/linux/wireguard.h): one peer per message for
set_peer, as many peers per message as fit for set_peers and batched removals. It never sets
WGDEVICE_F_REPLACE_PEERS, never creates or deletes interfaces, and knows nothing of policy.
The encoders and the dump parsers (DumpParser for read(), HandshakeParser for handshakes(),
StatsParser for stats()) are sans-IO so they can be tested without a kernel; dump messages
are parsed as they arrive.
"""

from __future__ import annotations

import errno as errno_mod
import ipaddress
import itertools
import operator
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, TypeVar

from wgjit.addr import Endpoint, IPNetwork
from wgjit.closing import Closing
from wgjit.device import (
    DeviceError,
    DeviceNotFound,
    DeviceState,
    PeerConfig,
    PeerState,
    PeerStats,
    StatsDump,
)
from wgjit.keys import KEY_LEN, PrivateKey, PublicKey

# -- netlink and generic netlink (include/uapi/linux/netlink.h, genetlink.h) ------------------

NETLINK_GENERIC = 16
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2

# -- WireGuard (include/uapi/linux/wireguard.h) ----------------------------------------------

WG_GENL_NAME = "wireguard"
WG_GENL_VERSION = 1
WG_CMD_GET_DEVICE = 0
WG_CMD_SET_DEVICE = 1
WGDEVICE_A_IFINDEX = 1
WGDEVICE_A_IFNAME = 2
WGDEVICE_A_PRIVATE_KEY = 3
WGDEVICE_A_PUBLIC_KEY = 4
WGDEVICE_A_FLAGS = 5
WGDEVICE_A_LISTEN_PORT = 6
WGDEVICE_A_FWMARK = 7
WGDEVICE_A_PEERS = 8
WGPEER_A_PUBLIC_KEY = 1
WGPEER_A_PRESHARED_KEY = 2
WGPEER_A_FLAGS = 3
WGPEER_A_ENDPOINT = 4
WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL = 5
WGPEER_A_LAST_HANDSHAKE_TIME = 6
WGPEER_A_RX_BYTES = 7
WGPEER_A_TX_BYTES = 8
WGPEER_A_ALLOWEDIPS = 9
WGPEER_F_REMOVE_ME = 0x1
WGPEER_F_REPLACE_ALLOWEDIPS = 0x2
WGPEER_F_UPDATE_ONLY = 0x4
WGALLOWEDIP_A_FAMILY = 1
WGALLOWEDIP_A_IPADDR = 2
WGALLOWEDIP_A_CIDR_MASK = 3
IFNAMSIZ = 16

# The kernel reads one WGDEVICE_A_PEERS nest per message, and an attribute's length is 16 bits:
# at most 65 535 bytes of peers per message. A removal costs 48 bytes: 1 365 peers per message.
MAX_PEERS_NEST = 0xFFFF
DEFAULT_TIMEOUT = 30.0  # seconds per receive; a 100 000-peer dump under qemu TCG takes seconds
_RECV_SIZE = 1 << 20
_DUMP_RETRIES = 5  # the device changed during a dump (NLM_F_DUMP_INTR): read it again

_NLMSG = struct.Struct("=IHHII")
_GENL = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_TIMESPEC = struct.Struct("=qq")
_FAMILY = struct.Struct("=H")
_PORT = struct.Struct("!H")
_V4_TAIL = struct.Struct("!H4B")  # a sockaddr_in after its family: port, address bytes
# A peer's first attributes as the kernel's get_peer() puts them (wireguard/netlink.c): key,
# preshared key, handshake time, keepalive, tx, rx, protocol version; then the endpoint (if
# any) and the allowed IPs. StatsParser reads them with one unpack when the headers match
# (_KERNEL_HEADERS), and attribute by attribute otherwise.
_KERNEL_LAYOUT = struct.Struct("=HH32sHH32xHHqqHHH2xHHQHHQHHI")
_KERNEL_HEADER_AT = operator.itemgetter(0, 1, 3, 4, 5, 6, 9, 10, 12, 13, 15, 16, 18, 19)
_KERNEL_HEADERS = (
    36, 1, 36, 2, 20, 6, 6, 5, 12, 8, 12, 7, 8, 10
)  # fmt: skip


# -- errors -----------------------------------------------------------------------------------


class NetlinkError(DeviceError):
    """The kernel refused an operation; `errno` is the positive errno it returned."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class WireGuardModuleMissing(NetlinkError, DeviceNotFound):
    """The kernel has no `wireguard` generic netlink family: the module is not loaded."""


class InterfaceMissing(NetlinkError, DeviceNotFound):
    """No interface of that name in this network namespace."""


class NotWireGuard(NetlinkError, DeviceNotFound):
    """The interface exists but is not a kernel WireGuard interface."""


class PermissionDenied(NetlinkError):
    """The caller lacks CAP_NET_ADMIN (in the interface's network namespace)."""


class _KernelErrno(Exception):
    def __init__(self, errno: int) -> None:
        super().__init__(errno)
        self.errno = errno


def describe_error(ifname: str, op: str, errno: int) -> NetlinkError:
    """The exception (with its one-line message naming the fix) for a kernel errno."""
    if errno == errno_mod.ENOENT:
        return WireGuardModuleMissing(
            "kernel WireGuard is not available (no 'wireguard' generic netlink family): "
            "load the module with `modprobe wireguard`",
            errno,
        )
    if errno == errno_mod.ENODEV:
        return InterfaceMissing(
            f"interface {ifname!r} does not exist in this network namespace; create it with "
            f"`ip link add {ifname} type wireguard`",
            errno,
        )
    if errno == errno_mod.EOPNOTSUPP:
        return NotWireGuard(
            f"interface {ifname!r} is not a kernel WireGuard interface (see `ip -d link show "
            f"{ifname}`); for wireguard-go use --backend uapi",
            errno,
        )
    if errno in (errno_mod.EPERM, errno_mod.EACCES):
        return PermissionDenied(
            f"{ifname}: {op}: permission denied: kernel WireGuard needs CAP_NET_ADMIN; run as root",
            errno,
        )
    return NetlinkError(f"{ifname}: {op} failed: {os.strerror(errno)} (errno {errno})", errno)


# -- encoding (sans-IO) -----------------------------------------------------------------------


def _attr(kind: int, payload: bytes) -> bytes:
    n = _NLA.size + len(payload)
    return _NLA.pack(n, kind) + payload + b"\0" * (-n & 3)


def _nest(kind: int, parts: Iterable[bytes]) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(parts))


def _ifname_attr(ifname: str) -> bytes:
    raw = ifname.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"\0" in raw or b"/" in raw:
        raise InterfaceMissing(f"invalid interface name {ifname!r}", errno_mod.ENODEV)
    return _attr(WGDEVICE_A_IFNAME, raw + b"\0")


def encode_endpoint(ep: Endpoint) -> bytes:
    """struct sockaddr_in (16 bytes) or sockaddr_in6 (28 bytes), as the kernel expects."""
    port = _PORT.pack(ep.port)
    if ep.host.version == 4:
        return _FAMILY.pack(socket.AF_INET) + port + ep.host.packed + bytes(8)
    # flowinfo and scope id zero
    return _FAMILY.pack(socket.AF_INET6) + port + bytes(4) + ep.host.packed + bytes(4)


def decode_endpoint(raw: bytes) -> Endpoint | None:
    if len(raw) < 4:
        return None
    (family,) = _FAMILY.unpack_from(raw)
    (port,) = _PORT.unpack_from(raw, 2)
    if family == socket.AF_INET and len(raw) >= 8:
        return Endpoint(ipaddress.IPv4Address(raw[4:8]), port)
    if family == socket.AF_INET6 and len(raw) >= 24:
        return Endpoint(ipaddress.IPv6Address(raw[8:24]), port)
    return None


def _allowed_ip(net: IPNetwork) -> bytes:
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return _nest(
        0,
        (
            _attr(WGALLOWEDIP_A_FAMILY, _U16.pack(family)),
            _attr(WGALLOWEDIP_A_IPADDR, net.network_address.packed),
            _attr(WGALLOWEDIP_A_CIDR_MASK, bytes((net.prefixlen,))),
        ),
    )


def encode_peer(config: PeerConfig) -> bytes:
    """One peer nest for WG_CMD_SET_DEVICE: only the fields `config` sets."""
    flags = WGPEER_F_UPDATE_ONLY if config.update_only else 0
    parts = [_attr(WGPEER_A_PUBLIC_KEY, config.public_key.raw)]
    if config.preshared_key is not None:
        parts.append(_attr(WGPEER_A_PRESHARED_KEY, config.preshared_key.raw))
    if config.endpoint is not None:
        parts.append(_attr(WGPEER_A_ENDPOINT, encode_endpoint(config.endpoint)))
    if config.persistent_keepalive is not None:
        if not 0 <= config.persistent_keepalive <= 0xFFFF:
            raise DeviceError(
                f"persistent keepalive {config.persistent_keepalive} is out of range 0-65535"
            )
        parts.append(_attr(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
                           _U16.pack(config.persistent_keepalive)))  # fmt: skip
    if config.allowed_ips is not None:
        flags |= WGPEER_F_REPLACE_ALLOWEDIPS
        parts.append(_nest(WGPEER_A_ALLOWEDIPS, (_allowed_ip(n) for n in config.allowed_ips)))
    parts.append(_attr(WGPEER_A_FLAGS, _U32.pack(flags)))
    return _nest(0, parts)


def encode_removal(key: PublicKey) -> bytes:
    return _nest(
        0,
        (
            _attr(WGPEER_A_PUBLIC_KEY, key.raw),
            _attr(WGPEER_A_FLAGS, _U32.pack(WGPEER_F_REMOVE_ME)),
        ),
    )


def set_device_messages(
    ifname: str, peers: Iterable[bytes], header: bytes = b""
) -> Iterator[bytes]:
    """WG_CMD_SET_DEVICE attribute blocks, each with as many encoded peers as fit one
    WGDEVICE_A_PEERS nest. `header` (device attributes, e.g. the private key) goes first."""
    name = _ifname_attr(ifname)
    budget = MAX_PEERS_NEST - _NLA.size
    batch: list[bytes] = []
    size = 0
    for peer in peers:
        if len(peer) > budget:
            raise DeviceError(f"{ifname}: one peer's settings exceed a netlink attribute (64 KiB)")
        if batch and size + len(peer) > budget:
            yield name + header + _nest(WGDEVICE_A_PEERS, batch)
            header, batch, size = b"", [], 0
        batch.append(peer)
        size += len(peer)
    if batch:
        yield name + header + _nest(WGDEVICE_A_PEERS, batch)
    elif header:
        yield name + header


# -- decoding (sans-IO) -----------------------------------------------------------------------


def iter_attrs(buf: bytes | memoryview) -> Iterator[tuple[int, memoryview]]:
    """(type without flags, payload) for each attribute; stops at a truncated one."""
    view = memoryview(buf)
    off, end = 0, len(view)
    while off + 4 <= end:
        length, kind = _NLA.unpack_from(view, off)
        if length < 4 or off + length > end:
            return
        yield kind & NLA_TYPE_MASK, view[off + 4 : off + length]
        off += (length + 3) & ~3


class _PeerBuilder:
    __slots__ = ("allowed", "endpoint", "hs", "keepalive", "key", "rx", "tx")

    def __init__(self, key: PublicKey) -> None:
        self.key = key
        self.endpoint: Endpoint | None = None
        self.allowed: list[IPNetwork] = []
        self.hs: float | None = None
        self.rx = 0
        self.tx = 0
        self.keepalive = 0

    def build(self) -> PeerState:
        return PeerState(
            self.key, self.endpoint, tuple(self.allowed), self.hs, self.rx, self.tx, self.keepalive
        )


def _decode_allowed_ip(nest: memoryview) -> IPNetwork | None:
    family = cidr = None
    addr = b""
    for kind, val in iter_attrs(nest):
        if kind == WGALLOWEDIP_A_FAMILY and len(val) >= 2:
            (family,) = _U16.unpack_from(val)
        elif kind == WGALLOWEDIP_A_IPADDR:
            addr = bytes(val)
        elif kind == WGALLOWEDIP_A_CIDR_MASK and len(val) >= 1:
            cidr = val[0]
    try:
        if family == socket.AF_INET and len(addr) == 4 and cidr is not None:
            return ipaddress.IPv4Network((addr, cidr))
        if family == socket.AF_INET6 and len(addr) == 16 and cidr is not None:
            return ipaddress.IPv6Network((addr, cidr))
    except ValueError:
        return None
    return None


class DumpParser:
    """Merges the messages of one WG_CMD_GET_DEVICE dump into a DeviceState.

    The kernel spreads peers over several messages and may split one peer's allowed IPs: the
    continuation repeats only the public key and carries the rest of the list."""

    def __init__(self, ifname: str, peers: bool = True) -> None:
        self.ifname = ifname
        self.private_key: PrivateKey | None = None
        self.listen_port = 0
        self.with_peers = peers
        self._peers: dict[PublicKey, _PeerBuilder] = {}

    def feed(self, attrs: bytes | memoryview) -> None:
        """One message's attributes (after the generic netlink header)."""
        for kind, val in iter_attrs(attrs):
            if kind == WGDEVICE_A_PRIVATE_KEY and len(val) == KEY_LEN:
                raw = bytes(val)
                self.private_key = PrivateKey(raw) if any(raw) else None
            elif kind == WGDEVICE_A_LISTEN_PORT and len(val) >= 2:
                (self.listen_port,) = _U16.unpack_from(val)
            elif kind == WGDEVICE_A_PEERS and self.with_peers:
                for _, peer in iter_attrs(val):
                    self._feed_peer(peer)

    def _feed_peer(self, nest: memoryview) -> None:
        b: _PeerBuilder | None = None
        rest: list[tuple[int, memoryview]] = []
        for kind, val in iter_attrs(nest):
            if kind == WGPEER_A_PUBLIC_KEY and len(val) == KEY_LEN:
                key = PublicKey(bytes(val))
                b = self._peers.get(key)
                if b is None:
                    b = self._peers[key] = _PeerBuilder(key)
            else:
                rest.append((kind, val))
        if b is None:
            raise DeviceError(f"{self.ifname}: get: kernel sent a peer without a public key")
        for kind, val in rest:
            if kind == WGPEER_A_ENDPOINT:
                b.endpoint = decode_endpoint(bytes(val))
            elif kind == WGPEER_A_LAST_HANDSHAKE_TIME and len(val) >= 16:
                sec, nsec = _TIMESPEC.unpack_from(val)
                b.hs = None if sec == 0 and nsec == 0 else sec + nsec / 1e9
            elif kind == WGPEER_A_RX_BYTES and len(val) >= 8:
                (b.rx,) = _U64.unpack_from(val)
            elif kind == WGPEER_A_TX_BYTES and len(val) >= 8:
                (b.tx,) = _U64.unpack_from(val)
            elif kind == WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL and len(val) >= 2:
                (b.keepalive,) = _U16.unpack_from(val)
            elif kind == WGPEER_A_ALLOWEDIPS:
                for _, ip in iter_attrs(val):
                    net = _decode_allowed_ip(ip)
                    if net is not None:
                        b.allowed.append(net)

    def result(self) -> DeviceState:
        peers = {k: b.build() for k, b in self._peers.items()}
        return DeviceState(self.ifname, self.private_key, self.listen_port, peers)


class _PeersParser:
    """Feeds the WGDEVICE_A_PEERS nest of each dump message to `_feed_peers`."""

    def feed(self, attrs: bytes | memoryview) -> None:
        """One message's attributes (after the generic netlink header)."""
        off, end = 0, len(attrs)
        while off + 4 <= end:
            length, kind = _NLA.unpack_from(attrs, off)
            if length < 4 or off + length > end:
                return
            if kind & NLA_TYPE_MASK == WGDEVICE_A_PEERS:
                self._feed_peers(attrs, off + 4, off + length)
            off += (length + 3) & ~3

    def _feed_peers(self, buf: bytes | memoryview, off: int, end: int) -> None:
        raise NotImplementedError


class HandshakeParser(_PeersParser):
    """Each peer's key and last handshake (unix seconds, 0.0 if never) from the messages of
    one WG_CMD_GET_DEVICE dump; everything else is stepped over, never decoded.

    A peer continued in a later message (its allowed IPs did not fit) repeats only its key
    there: the continuation keeps the time already seen."""

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self.handshakes: dict[PublicKey, float] = {}

    def _feed_peers(self, buf: bytes | memoryview, off: int, end: int) -> None:
        unpack = _NLA.unpack_from
        handshakes = self.handshakes
        while off + 4 <= end:
            length, _ = unpack(buf, off)
            if length < 4 or off + length > end:
                return
            raw: bytes | None = None
            when: float | None = None
            p, peer_end = off + 4, off + length
            while p + 4 <= peer_end:
                alen, akind = unpack(buf, p)
                if alen < 4 or p + alen > peer_end:
                    break
                akind &= NLA_TYPE_MASK
                if akind == WGPEER_A_PUBLIC_KEY and alen == 4 + KEY_LEN:
                    raw = bytes(buf[p + 4 : p + 4 + KEY_LEN])
                elif akind == WGPEER_A_LAST_HANDSHAKE_TIME and alen >= 4 + _TIMESPEC.size:
                    sec, nsec = _TIMESPEC.unpack_from(buf, p + 4)
                    when = sec + nsec / 1e9
                if raw is not None and when is not None:
                    break  # the kernel sends both first; the rest (allowed IPs) is not needed
                p += (alen + 3) & ~3
            if raw is None:
                raise DeviceError(
                    f"{self.ifname}: handshakes: kernel sent a peer without a public key"
                )
            key = PublicKey(raw)
            if when is not None:
                handshakes[key] = when
            elif key not in handshakes:
                handshakes[key] = 0.0
            off += (length + 3) & ~3

    def result(self) -> dict[PublicKey, float]:
        return self.handshakes


def endpoint_text(raw: bytes | memoryview, off: int = 0, end: int | None = None) -> str | None:
    """The WGPEER_A_ENDPOINT sockaddr in raw[off:end] as "host:port" or "[v6]:port" (as
    wireguard-go's UAPI prints it), without making address objects; None for one that is
    not IPv4 or IPv6."""
    size = (len(raw) if end is None else end) - off
    if size < 4:
        return None
    (family,) = _FAMILY.unpack_from(raw, off)
    if family == socket.AF_INET and size >= 8:
        port, a, b, c, d = _V4_TAIL.unpack_from(raw, off + 2)
        return f"{a}.{b}.{c}.{d}:{port}"
    if family == socket.AF_INET6 and size >= 24:
        (port,) = _PORT.unpack_from(raw, off + 2)
        return f"[{socket.inet_ntop(socket.AF_INET6, bytes(raw[off + 8 : off + 24]))}]:{port}"
    return None


class StatsParser(_PeersParser):
    """Each peer's PeerStats (last handshake, rx and tx bytes, endpoint) from the messages of
    one WG_CMD_GET_DEVICE dump, like HandshakeParser: a peer's attributes are read up to its
    allowed IPs (the kernel puts them last), which are stepped over. A continuation (the
    peer's key and more allowed IPs) keeps what was already seen, also when what was seen
    has been taken (take()) in the meantime."""

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self.stats: dict[PublicKey, PeerStats] = {}
        self.laid_out = 0  # peers read with one unpack (the kernel's layout)
        self._last: PublicKey | None = None  # the last peer fed: the next message may go on

    def take(self) -> dict[PublicKey, PeerStats]:
        """The peers parsed since the last take() (all so far, the first time), for a reader
        that hands the dump on in chunks; the parser goes on with an empty result."""
        stats, self.stats = self.stats, {}
        return stats

    def _feed_peers(self, buf: bytes | memoryview, off: int, end: int) -> None:
        unpack = _NLA.unpack_from
        stats = self.stats
        laid_out = 0
        last = self._last
        while off + 4 <= end:
            length, _ = unpack(buf, off)
            if length < 4 or off + length > end:
                break
            raw: bytes | None = None
            when: float | None = None
            rx = tx = -1
            ep: str | None = None
            p, peer_end = off + 4, off + length
            if p + _KERNEL_LAYOUT.size <= peer_end:
                f = _KERNEL_LAYOUT.unpack_from(buf, p)
                if _KERNEL_HEADER_AT(f) == _KERNEL_HEADERS:  # the kernel's layout: one unpack
                    raw, when, tx, rx = f[2], f[7] + f[8] / 1e9, f[14], f[17]
                    p += _KERNEL_LAYOUT.size
                    laid_out += 1
            while p + 4 <= peer_end:
                alen, akind = unpack(buf, p)
                if alen < 4 or p + alen > peer_end:
                    break
                akind &= NLA_TYPE_MASK
                if akind == WGPEER_A_PUBLIC_KEY and alen == 4 + KEY_LEN:
                    raw = bytes(buf[p + 4 : p + 4 + KEY_LEN])
                elif akind == WGPEER_A_LAST_HANDSHAKE_TIME and alen >= 4 + _TIMESPEC.size:
                    sec, nsec = _TIMESPEC.unpack_from(buf, p + 4)
                    when = sec + nsec / 1e9
                elif akind == WGPEER_A_RX_BYTES and alen >= 4 + _U64.size:
                    (rx,) = _U64.unpack_from(buf, p + 4)
                elif akind == WGPEER_A_TX_BYTES and alen >= 4 + _U64.size:
                    (tx,) = _U64.unpack_from(buf, p + 4)
                elif akind == WGPEER_A_ENDPOINT:
                    ep = endpoint_text(buf, p + 4, p + alen)
                elif akind == WGPEER_A_ALLOWEDIPS and raw is not None:
                    break  # the last attribute the kernel sends: not needed
                p += (alen + 3) & ~3
            if raw is None:
                raise DeviceError(f"{self.ifname}: stats: kernel sent a peer without a public key")
            key = PublicKey(raw)
            if when is not None:  # a peer's first message (a continuation has no time)
                stats[key] = (when, max(rx, 0), max(tx, 0), ep)
            elif key not in stats and key != last:
                stats[key] = (0.0, 0, 0, None)
            last = key
            off += (length + 3) & ~3
        self.laid_out += laid_out
        self._last = last

    def result(self) -> dict[PublicKey, PeerStats]:
        return self.stats


class _DumpFeed(Protocol):
    def feed(self, attrs: bytes | memoryview) -> None: ...


_P = TypeVar("_P", bound=_DumpFeed)


# -- the socket -------------------------------------------------------------------------------


class _GenericNetlink:
    """One generic netlink socket that sends requests and collects their replies in order."""

    def __init__(self, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        try:
            self.sock.settimeout(timeout)
            self.sock.bind((0, 0))
            self._buf = bytearray(_RECV_SIZE)
            self._seq = itertools.count(1)
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def request(
        self,
        family: int,
        cmd: int,
        attrs: bytes,
        *,
        dump: bool = False,
        version: int = 1,
        on_reply: Callable[[memoryview], None] | None = None,
    ) -> tuple[list[bytes], bool]:
        """Send one request; return the replies' attribute blocks and whether a dump was
        interrupted by a concurrent change. Raises _KernelErrno for an error reply.

        With `on_reply`, each reply's attributes go to it as they arrive instead (a view of
        the receive buffer, valid during the call only) and the returned list is empty."""
        seq = self.send(family, cmd, attrs, dump=dump, version=version)
        replies: list[bytes] = []
        interrupted = False
        for payload, mflags in self.replies(seq):
            if mflags & NLM_F_DUMP_INTR:
                interrupted = True
            if on_reply is not None:
                on_reply(payload)
            else:
                replies.append(bytes(payload))
        return replies, interrupted

    def send(
        self, family: int, cmd: int, attrs: bytes, *, dump: bool = False, version: int = 1
    ) -> int:
        """Send one request; its sequence number, for replies()."""
        seq = next(self._seq)
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        body = _GENL.pack(cmd, version, 0) + attrs
        self.sock.sendall(_NLMSG.pack(_NLMSG.size + len(body), family, flags, seq, 0) + body)
        return seq

    def replies(self, seq: int) -> Iterator[tuple[memoryview, int]]:
        """The replies to request `seq` as they are received: each one's attributes (a view
        of the receive buffer, valid until the next is taken) and netlink flags; ends with
        the ACK or the dump's end. Raises _KernelErrno for an error reply."""
        view = memoryview(self._buf)
        while True:
            n = self.sock.recv_into(self._buf)
            off = 0
            while off + _NLMSG.size <= n:
                length, kind, mflags, mseq, _ = _NLMSG.unpack_from(view, off)
                if length < _NLMSG.size or off + length > n:
                    break
                payload = view[off + _NLMSG.size : off + length]
                off += (length + 3) & ~3
                if mseq != seq:
                    continue  # a late reply to an earlier, abandoned request
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code:
                        raise _KernelErrno(-code)
                    return  # the ACK ends a non-dump request
                if kind == NLMSG_DONE:
                    if len(payload) >= 4:
                        (code,) = struct.unpack_from("=i", payload)
                        if code < 0:
                            raise _KernelErrno(-code)
                    return
                yield payload[_GENL.size :], mflags

    def resolve_family(self, name: str) -> int:
        attrs = _attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0")
        replies, _ = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, attrs)
        for reply in replies:
            for kind, val in iter_attrs(reply):
                if kind == CTRL_ATTR_FAMILY_ID and len(val) >= 2:
                    family: int = _U16.unpack_from(val)[0]
                    return family
        raise _KernelErrno(errno_mod.ENOENT)


class NetlinkDevice(Closing):
    """One kernel WireGuard interface (by name, in the caller's network namespace).

    Thread-safe; calls are serialized. Every call addresses the interface by name, so the
    object keeps working when the interface is deleted and created again; a broken socket or
    a reloaded module is handled by reopening on the next call."""

    def __init__(self, ifname: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        _ifname_attr(ifname)
        self.name = ifname
        self._timeout = timeout
        self._lock = threading.Lock()
        self._nl: _GenericNetlink | None = None
        self._family: int | None = None
        # a no-op WG_CMD_SET_DEVICE fails exactly like the real operations would (module,
        # interface, kind, privilege) without reading a possibly huge device
        self._set("open", [_ifname_attr(ifname)])

    # -- the Device protocol ------------------------------------------------------------------

    def identity(self) -> object:
        # an interface deleted and added again gets a new index
        try:
            return socket.if_nametoindex(self.name)
        except OSError:
            return None

    def read(self, peers: bool = True) -> DeviceState:
        return self._dump("get", lambda name: DumpParser(name, peers)).result()

    def handshakes(self) -> dict[PublicKey, float]:
        return self._dump("handshakes", HandshakeParser).result()

    def stats(self) -> dict[PublicKey, PeerStats]:
        return self._dump("stats", StatsParser).result()

    def stats_dump(self) -> StatsDump:
        return _StatsStream(self)

    def set_peer(self, config: PeerConfig) -> None:
        op = f"set_peer {config.public_key.short()}"
        self._set(op, list(set_device_messages(self.name, self._encode(op, [config]))))

    def set_peers(self, configs: Sequence[PeerConfig]) -> None:
        if not configs:
            return
        op = f"set_peers ({len(configs)} peers)"
        # every peer encoded (and checked) before the first message goes out
        self._set(op, list(set_device_messages(self.name, self._encode(op, configs))))

    def remove_peers(self, keys: Iterable[PublicKey]) -> None:
        wanted = list(dict.fromkeys(keys))
        if wanted:
            blocks = set_device_messages(self.name, (encode_removal(k) for k in wanted))
            self._set(f"remove_peers ({len(wanted)} keys)", blocks)

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- extras (not part of the protocol) ----------------------------------------------------

    def configure(
        self, private_key: PrivateKey | None = None, listen_port: int | None = None
    ) -> None:
        """Set the device's own key and/or UDP port (peers untouched)."""
        header = b""
        if private_key is not None:
            header += _attr(WGDEVICE_A_PRIVATE_KEY, private_key.raw)
        if listen_port is not None:
            header += _attr(WGDEVICE_A_LISTEN_PORT, _U16.pack(listen_port))
        if header:
            self._set("configure", set_device_messages(self.name, [], header))

    def __repr__(self) -> str:
        return f"NetlinkDevice({self.name!r})"

    # -- wire ---------------------------------------------------------------------------------

    def _dump(self, op: str, make_parser: Callable[[str], _P]) -> _P:
        """Run one dump through a fresh parser, again while the kernel says the device
        changed in the middle of it."""
        name = _ifname_attr(self.name)
        for _ in range(_DUMP_RETRIES):
            parser = make_parser(self.name)
            _, interrupted = self._request(
                op, WG_CMD_GET_DEVICE, name, dump=True, on_reply=parser.feed
            )
            if not interrupted:
                return parser
        raise NetlinkError(
            f"{self.name}: {op}: the device kept changing during {_DUMP_RETRIES} dumps",
            errno_mod.EAGAIN,
        )

    def _encode(self, op: str, configs: Iterable[PeerConfig]) -> list[bytes]:
        try:
            return [encode_peer(c) for c in configs]
        except DeviceError as e:
            raise DeviceError(f"{self.name}: {op}: {e}") from None

    def _set(self, op: str, blocks: Iterable[bytes]) -> None:
        for block in blocks:
            self._request(op, WG_CMD_SET_DEVICE, block)

    def _request(
        self,
        op: str,
        cmd: int,
        attrs: bytes,
        *,
        dump: bool = False,
        on_reply: Callable[[memoryview], None] | None = None,
    ) -> tuple[list[bytes], bool]:
        with self._lock, self._failures(op, self._drop):
            if self._nl is None:
                self._nl = _GenericNetlink(self._timeout)
            if self._family is None:
                self._family = self._nl.resolve_family(WG_GENL_NAME)
            result = self._nl.request(
                self._family, cmd, attrs, dump=dump, version=WG_GENL_VERSION, on_reply=on_reply
            )
        return result

    @contextmanager
    def _failures(self, op: str, drop: Callable[[], None]) -> Iterator[None]:
        """Kernel and socket errors of `op` as DeviceErrors that name the interface; `drop`
        closes the socket where it must not be used again."""
        try:
            yield
        except _KernelErrno as e:
            if e.errno == errno_mod.ENOENT:
                self._family = None  # module unloaded (or reloaded with a new family id)
            raise describe_error(self.name, op, e.errno) from None
        except TimeoutError:
            drop()
            raise NetlinkError(
                f"{self.name}: {op} failed: no answer from the kernel within {self._timeout:g} s",
                errno_mod.ETIMEDOUT,
            ) from None
        except OSError as e:
            drop()
            if e.errno in (errno_mod.EPERM, errno_mod.EACCES):
                raise describe_error(self.name, op, e.errno) from None
            raise NetlinkError(
                f"{self.name}: {op} failed: netlink socket error: {e.strerror or e}",
                e.errno or errno_mod.EIO,
            ) from None
        except BaseException:
            # a parser error or an interrupt mid-dump: the kernel would refuse the next dump
            # on this socket (EBUSY) while this one is unfinished, so start a fresh socket
            drop()
            raise

    def _drop(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None


class _StatsStream:
    """NetlinkDevice.stats_dump(): one WG_CMD_GET_DEVICE dump on a socket of its own (the
    device's handle stays free for installs), its messages parsed by a StatsParser as they
    are received and handed out a chunk at a time. The kernel takes the device's locks only
    while it fills each message, so a pause between chunks holds nothing. A dump the device
    changed during (NLM_F_DUMP_INTR) is not read again, as stats() does: what was handed out
    is handed out; it ends with `complete` False."""

    def __init__(self, device: NetlinkDevice) -> None:
        self.done = False
        self.complete = True
        self._device = device
        self._parser = StatsParser(device.name)
        self._nl: _GenericNetlink | None = None
        with device._failures("stats", self.close):
            self._nl = nl = _GenericNetlink(device._timeout)
            family = device._family
            if family is None:
                family = device._family = nl.resolve_family(WG_GENL_NAME)
            seq = nl.send(family, WG_CMD_GET_DEVICE, _ifname_attr(device.name), dump=True,
                          version=WG_GENL_VERSION)  # fmt: skip
        self._replies: Iterator[tuple[memoryview, int]] = nl.replies(seq)

    def take(self, peers: int) -> dict[PublicKey, PeerStats]:
        parser = self._parser
        if self.done:
            return parser.take()
        with self._device._failures("stats", self.close):
            while len(parser.stats) < peers:
                reply = next(self._replies, None)
                if reply is None:
                    self.close()
                    break
                attrs, flags = reply
                if flags & NLM_F_DUMP_INTR:
                    self.complete = False
                parser.feed(attrs)
        return parser.take()

    def close(self) -> None:
        self.done = True
        if self._nl is not None:
            self._nl.close()  # an unfinished dump ends with its socket
            self._nl = None
