"""Parse a captured IPv4/IPv6 packet into a Knock: who sent a handshake initiation, to where.

Sans-IO and total: any bytes give a Knock or None, never an exception. Does not authenticate.
"""

from __future__ import annotations

import ipaddress
import struct

from wgjit.addr import Endpoint, IPAddress
from wgjit.capture.bpf import (
    INITIATION_UDP_LENGTH,
    IPPROTO_UDP,
    IPV6_HEADER_SIZE,
    UDP_HEADER_SIZE,
)

INITIATION_PREFIX = b"\x01\x00\x00\x00"


class Knock:
    """One captured handshake initiation (unauthenticated: anyone can send one).

    `source` is made when first asked for: a flood of garbage or of replays is judged on the
    payload alone, and making its address objects up front was ~2.5 us of the loop's ~14 us
    per bad-mac1 packet.
    A plain slotted class for that (and no frozen dataclass's per-field object.__setattr__);
    it compares and hashes by value all the same, and nothing changes one."""

    __slots__ = ("_source", "_source_raw", "destination", "ifindex", "payload", "received_at")

    def __init__(
        self,
        source: Endpoint | None,
        destination: Endpoint,
        payload: bytes,  # the 148-byte WireGuard message
        ifindex: int,  # interface it arrived on (0 if unknown)
        received_at: float,  # time.monotonic() when it was read
        source_raw: tuple[bytes, int] | None = None,  # (address bytes, port), if source is None
    ) -> None:
        if source is None and source_raw is None:
            raise ValueError("a knock needs its source")
        self._source = source
        self._source_raw = source_raw
        self.destination = destination
        self.payload = payload
        self.ifindex = ifindex
        self.received_at = received_at

    @property
    def source(self) -> Endpoint:
        s = self._source
        if s is None:
            raw, port = self._source_raw  # type: ignore[misc]
            s = self._source = Endpoint(_address(raw), port)
        return s

    @property
    def source_address(self) -> bytes:
        """The source address, packed (4 or 16 bytes), without making `source`."""
        if self._source_raw is not None:
            return self._source_raw[0]
        return self.source.host.packed

    def _key(self) -> tuple[object, ...]:
        return (self.source, self.destination, self.payload, self.ifindex, self.received_at)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Knock):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Knock(source={self.source!r}, destination={self.destination!r}, "
                f"payload={self.payload!r}, ifindex={self.ifindex!r}, "
                f"received_at={self.received_at!r})")  # fmt: skip


def parse_knock(
    data: bytes, *, ifindex: int = 0, received_at: float = 0.0, port: int | None = None
) -> Knock | None:
    """The Knock in `data` (starting at the IP header), or None if it is not exactly one.

    None unless `data` is an IPv4 or IPv6 packet (by its version nibble; IPv4 unfragmented, IPv6
    with UDP directly after the fixed header), with consistent lengths, carrying a UDP datagram
    with a 148-byte payload starting 01 00 00 00, ports nonzero, and (if `port` is given) sent
    to `port`. Trailing bytes after the datagram are ignored; checksums are not checked (a
    packet captured before checksum offload may carry a partial one).
    """
    if not data:
        return None
    version = data[0] >> 4
    if version == 4:
        parsed = _ipv4(data)
    elif version == 6:
        parsed = _ipv6(data)
    else:
        return None
    if parsed is None:
        return None
    src_raw, dst_raw, udp = parsed
    # _ipv4/_ipv6 guarantee len(data) >= udp + 8 + 148
    sport, dport, length = _UDP.unpack_from(data, udp)
    if length != INITIATION_UDP_LENGTH or sport == 0 or dport == 0:
        return None
    if port is not None and dport != port:
        return None
    payload = bytes(data[udp + UDP_HEADER_SIZE : udp + INITIATION_UDP_LENGTH])
    if not payload.startswith(INITIATION_PREFIX):
        return None
    destination = _destinations.get((dst_raw, dport))
    if destination is None:
        if len(_destinations) >= 256:  # the host's own addresses, so few; bounded anyway
            _destinations.clear()
        destination = _destinations[dst_raw, dport] = Endpoint(_address(dst_raw), dport)
    return Knock(None, destination, payload, ifindex, received_at, (src_raw, sport))


# (address bytes, port) -> Endpoint: every knock goes to one of a few, made once each
_destinations: dict[tuple[bytes, int], Endpoint] = {}


def _address(raw: bytes) -> IPAddress:
    return ipaddress.IPv4Address(raw) if len(raw) == 4 else ipaddress.IPv6Address(raw)


_Parsed = tuple[bytes, bytes, int]  # source, destination, offset of the UDP header
_IPV4 = struct.Struct("!BxHxxHxB2x4s4s")  # version+IHL, total length, flags+offset, protocol
_IPV6 = struct.Struct("!4xHB1x16s16s")  # payload length, next header
_UDP = struct.Struct("!HHH")  # source port, destination port, length


def _ipv4(data: bytes) -> _Parsed | None:
    if len(data) < _IPV4.size:
        return None
    vihl, total, frag, proto, src, dst = _IPV4.unpack_from(data)
    ihl = (vihl & 0x0F) * 4
    if ihl < _IPV4.size or frag & 0x3FFF or proto != IPPROTO_UDP:
        return None
    end = ihl + INITIATION_UDP_LENGTH
    # the datagram must fit both the IP total length and the bytes we have (the capture may
    # have cut trailing bytes beyond the datagram, so len(data) may be less than `total`)
    if total < end or len(data) < end:
        return None
    return src, dst, ihl


def _ipv6(data: bytes) -> _Parsed | None:
    if len(data) < IPV6_HEADER_SIZE + INITIATION_UDP_LENGTH:
        return None
    plen, next_header, src, dst = _IPV6.unpack_from(data)
    # payload length 0 would mean a jumbogram, which needs an extension header anyway
    if next_header != IPPROTO_UDP or plen < INITIATION_UDP_LENGTH:
        return None
    return src, dst, IPV6_HEADER_SIZE
