"""The device's answers seen leaving: handshake responses and cookie replies from the listen port.

`AnswerCapture` is an AF_PACKET socket on every interface of the calling thread's network
namespace with `bpf.answers_filter`: it reads copies of the type-2 responses and type-3 cookie
replies this host sends from UDP port `port` (the WireGuard device's answers to initiations),
in non-blocking batches. `parse_answer` (sans-IO, total) turns one into an `Answer`. Hold
mode's release window (wgjit.gateway.pace) matches them to the initiations it released.

A frame that crosses several interfaces on its way out (a bridge, then the bridge's port) is
read once per interface: the reader tells copies apart (an answer matches one release once).
Cookie replies the gateway itself sends (from the same port, through a raw socket) are seen
too; they answer initiations it never released, so they match nothing.
"""

from __future__ import annotations

import errno
import struct
from typing import NamedTuple

from wgjit.capture.afpacket import CaptureError, filtered_socket
from wgjit.capture.bpf import (
    ANSWER_KEEP,
    COOKIE_REPLY_SIZE,
    IPPROTO_UDP,
    IPV6_HEADER_SIZE,
    RESPONSE_SIZE,
    UDP_HEADER_SIZE,
    answers_filter,
)
from wgjit.closing import Closing

RESPONSE = 2
COOKIE_REPLY = 3
DEFAULT_RCVBUF = 1 << 20
_UDP = struct.Struct("!HHH")  # source port, destination port, length
_FRAG = struct.Struct("!H")  # IPv4 flags and fragment offset
_BUFSIZE = 60 + UDP_HEADER_SIZE + ANSWER_KEEP  # the most the filter keeps (IPv4, options)


class Answer(NamedTuple):
    """One answer the device sent: its type (RESPONSE or COOKIE_REPLY) and the receiver
    index, which is the sender index of the initiation it answers."""

    kind: int
    receiver: int


def parse_answer(data: bytes, port: int | None = None) -> Answer | None:
    """The Answer in `data` (from the IP header, at least ANSWER_KEEP bytes of the message),
    or None if it is not a handshake response or cookie reply (from `port`, if given)."""
    if not data:
        return None
    version = data[0] >> 4
    if version == 4:
        if len(data) < 20 or data[9] != IPPROTO_UDP or _FRAG.unpack_from(data, 6)[0] & 0x3FFF:
            return None  # not UDP, or a fragment
        udp = (data[0] & 0x0F) * 4
        if udp < 20:
            return None
    elif version == 6:
        if len(data) < IPV6_HEADER_SIZE or data[6] != IPPROTO_UDP:
            return None
        udp = IPV6_HEADER_SIZE
    else:
        return None
    msg = udp + UDP_HEADER_SIZE
    if len(data) < msg + ANSWER_KEEP:
        return None
    sport, _dport, length = _UDP.unpack_from(data, udp)
    if port is not None and sport != port:
        return None
    head = data[msg : msg + 4]
    if head == b"\x02\x00\x00\x00" and length == UDP_HEADER_SIZE + RESPONSE_SIZE:
        return Answer(RESPONSE, int.from_bytes(data[msg + 8 : msg + 12], "little"))
    if head == b"\x03\x00\x00\x00" and length == UDP_HEADER_SIZE + COOKIE_REPLY_SIZE:
        return Answer(COOKIE_REPLY, int.from_bytes(data[msg + 4 : msg + 8], "little"))
    return None


class AnswerCapture(Closing):
    """Copies of the answers this host sends from UDP `port`, on all interfaces.

    Non-blocking: wait for `fileno()` to be readable, then call `recv_batch()`. Needs root or
    CAP_NET_RAW; raises CaptureError (one line saying why) if the socket cannot be opened.
    """

    def __init__(self, port: int, *, rcvbuf: int = DEFAULT_RCVBUF) -> None:
        self.port = port
        self.errors = 0
        program = answers_filter(port)  # ValueError for a bad port, before any socket
        self._sock = filtered_socket(program, "answer watch", "watching the device's answers",
                                     rcvbuf=rcvbuf)  # fmt: skip

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv_batch(self, max_n: int = 256) -> list[Answer]:
        """Up to `max_n` answers already queued; [] if none. Never blocks."""
        out: list[Answer] = []
        recv, port = self._sock.recv, self.port
        for _ in range(max_n):
            try:
                data = recv(_BUFSIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno in (errno.ENETDOWN, errno.ENOBUFS, errno.ENXIO):
                    self.errors += 1
                    break
                raise CaptureError(
                    e.errno or errno.EIO, f"reading the answer watch socket: {e}"
                ) from None
            a = parse_answer(data, port)
            if a is not None:
                out.append(a)
        return out

    def close(self) -> None:
        self._sock.close()
