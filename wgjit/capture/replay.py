"""Re-inject a captured initiation so the local WireGuard device receives it from the client.

For hosts without NFQUEUE: the device dropped the client's first initiation because the peer
was not installed yet; once it is, `Reinjector.send(knock)` delivers the same datagram again,
with the client's source address and port, to the address it was sent to. `build_datagram()`
(sans-IO) makes the IPv4 or IPv6 packet with a valid UDP checksum: a captured packet may carry
a partial checksum (offload), and one re-sent as is would be silently dropped.

Sends only what it is given (never invents payloads): a knock again to its own destination, or
an answer (a cookie reply) back to the knock's sender.
Needs root or CAP_NET_RAW. Delivery to a local address goes through `lo`: reverse-path
filtering must not be strict there (`rp_filter` 0 or 2); a fresh network namespace has 0.
"""

from __future__ import annotations

import errno
import socket
import struct

from wgjit.addr import Endpoint
from wgjit.capture.packet import Knock

IPPROTO_UDP = 17
_TTL = 64


class ReplayError(OSError):
    """The raw sockets could not be opened; `errno` is set."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def internet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement checksum of `data`."""
    return ~_fold(_sum16(data)) & 0xFFFF


def udp_checksum(src: bytes, dst: bytes, udp: bytes) -> int:
    """The UDP checksum over the pseudo-header (IPv4 or IPv6, by address length) and `udp`
    (header with a zero checksum field, then payload). Never 0: that means 'none' in IPv4 and
    is invalid in IPv6, so 0xFFFF is sent instead (RFC 768)."""
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, IPPROTO_UDP, len(udp))
    else:
        pseudo = src + dst + struct.pack("!I3xB", len(udp), IPPROTO_UDP)
    c = ~_fold(_sum16(pseudo) + _sum16(udp)) & 0xFFFF
    return c or 0xFFFF


def build_datagram(source: Endpoint, destination: Endpoint, payload: bytes) -> bytes:
    """The full IP packet (IPv4 or IPv6, by the addresses) carrying `payload` over UDP."""
    if source.host.version != destination.host.version:
        raise ValueError("source and destination are of different IP versions")
    src, dst = source.host.packed, destination.host.packed
    udp_len = 8 + len(payload)
    udp = struct.pack("!HHHH", source.port, destination.port, udp_len, 0) + payload
    csum = udp_checksum(src, dst, udp)
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    if source.host.version == 4:
        # DF set, id 0 (allowed for atomic datagrams, RFC 6864)
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, _TTL,
                          IPPROTO_UDP, 0, src, dst)  # fmt: skip
        hdr = hdr[:10] + struct.pack("!H", internet_checksum(hdr)) + hdr[12:]
        return hdr + udp
    hdr = struct.pack("!IHBB16s16s", 6 << 28, udp_len, IPPROTO_UDP, _TTL, src, dst)
    return hdr + udp


class Reinjector:
    """Raw IPv4 and IPv6 sockets that send whole IP packets (header included)."""

    def __init__(self) -> None:
        self.sent = 0
        self.errors = 0
        try:
            # IPPROTO_RAW implies IP_HDRINCL (IPv4) and IPV6_HDRINCL (IPv6): the packet we
            # build, source address included, is sent as is
            self._v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            try:
                self._v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
            except BaseException:
                self._v4.close()
                raise
        except PermissionError:
            raise ReplayError(errno.EPERM, "re-injecting needs root or CAP_NET_RAW") from None
        except OSError as e:
            raise ReplayError(e.errno or errno.EIO, f"cannot open a raw socket: {e}") from None
        # sent from the packet loop: a full send buffer (a flood of cookie replies) must cost
        # the datagram (counted in `errors`), never a wait
        self._v4.setblocking(False)
        self._v6.setblocking(False)

    def send(self, knock: Knock) -> None:
        """Deliver `knock`'s datagram again to its destination, from its source."""
        self.send_datagram(knock.source, knock.destination, knock.payload, knock.ifindex)

    def answer(self, knock: Knock, payload: bytes) -> None:
        """Send `payload` to `knock`'s sender from the address and port it was sent to (a
        cookie reply, as if the device had sent it)."""
        self.send_datagram(knock.destination, knock.source, payload, knock.ifindex)

    def send_datagram(
        self, source: Endpoint, destination: Endpoint, payload: bytes, ifindex: int = 0
    ) -> None:
        packet = build_datagram(source, destination, payload)
        host = str(destination.host)
        try:
            if destination.host.version == 4:
                self._v4.sendto(packet, (host, 0))
            else:
                # a link-local destination needs its interface (the one the knock came on)
                scope = ifindex if destination.host.is_link_local else 0
                self._v6.sendto(packet, (host, 0, 0, scope))
        except OSError:
            self.errors += 1
            raise
        self.sent += 1

    def close(self) -> None:
        self._v4.close()
        self._v6.close()
