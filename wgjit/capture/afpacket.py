"""The capture socket: an AF_PACKET socket with the initiation filter, read in non-blocking batches.

Captures in the calling thread's network namespace; only reads copies of packets (never drops,
answers or re-sends them). Deciding what a knock means is the gateway's job.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
import time

from wgjit.capture.bpf import Insn, initiation_filter, pack
from wgjit.capture.packet import Knock, parse_knock
from wgjit.closing import Closing
from wgjit.errors import WgjitError

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23  # Linux >= 4.20; skip outgoing packets before the filter runs
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33  # like SO_RCVBUF but may exceed net.core.rmem_max (needs CAP_NET_ADMIN)
MSG_DONTWAIT = 0x40
DEFAULT_RCVBUF = 4 << 20
_BUFSIZE = 2048  # the filter keeps at most 60 + 8 + 148 bytes of a packet


class CaptureError(WgjitError, OSError):
    """The capture socket could not be opened or read; the message says why (`errno` is set)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


class _SockaddrLL(ctypes.Structure):
    _fields_ = (
        ("sll_family", ctypes.c_ushort),
        ("sll_protocol", ctypes.c_ushort),  # network byte order
        ("sll_ifindex", ctypes.c_int),
        ("sll_hatype", ctypes.c_ushort),
        ("sll_pkttype", ctypes.c_ubyte),
        ("sll_halen", ctypes.c_ubyte),
        ("sll_addr", ctypes.c_ubyte * 8),
    )


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


# Python's socket module cannot bind AF_PACKET to "all interfaces" (ifindex 0), and its
# recvfrom() turns the ifindex into a name with one ioctl per packet: call libc directly.
_libc = ctypes.CDLL(None, use_errno=True)
_bind = _libc.bind
_bind.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32)
_bind.restype = ctypes.c_int
_recvfrom = _libc.recvfrom
_recvfrom.argtypes = (
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
)
_recvfrom.restype = ctypes.c_ssize_t


def filtered_socket(program: list[Insn], what: str, doing: str, *, ifindex: int = 0,
                    rcvbuf: int, ignore_outgoing: bool = False) -> socket.socket:  # fmt: skip
    """A non-blocking AF_PACKET socket (cooked: from the network header) that receives only
    what `program` accepts, on interface `ifindex` (0: all). Errors are CaptureError, one
    line: `what` names the socket, `doing` what needs root or CAP_NET_RAW."""
    try:
        # Protocol 0: the socket receives nothing until bind() names a protocol, so no
        # packet can be queued before the filter is attached and nothing needs draining.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    except PermissionError:
        raise CaptureError(
            errno.EPERM, f"{doing} needs root or CAP_NET_RAW (AF_PACKET socket refused)"
        ) from None
    except OSError as e:
        raise CaptureError(
            e.errno or errno.EIO, f"cannot open an AF_PACKET socket: {e.strerror}"
        ) from None
    try:
        code = pack(program)
        insns = ctypes.create_string_buffer(code, len(code))
        fprog = _SockFprog(len(program), ctypes.addressof(insns))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))
        del insns  # the kernel has copied the program
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # capped by rmem_max
        if ignore_outgoing:
            with contextlib.suppress(OSError):  # old kernel: the filter rejects them anyway
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        sll = _SockaddrLL(
            sll_family=socket.AF_PACKET, sll_protocol=socket.htons(ETH_P_ALL), sll_ifindex=ifindex
        )
        if _bind(sock.fileno(), ctypes.addressof(sll), ctypes.sizeof(sll)) != 0:
            err = ctypes.get_errno()
            raise CaptureError(err, f"cannot bind the {what} socket: {os.strerror(err)}")
        sock.setblocking(False)
    except BaseException as e:
        sock.close()
        if isinstance(e, OSError) and not isinstance(e, CaptureError):
            raise CaptureError(
                e.errno or errno.EIO, f"cannot set up the {what} socket: {e.strerror}"
            ) from None
        raise
    return sock


class PacketCapture(Closing):
    """Handshake initiations to UDP `port`, as seen on one interface or all (`interface=None`).

    Non-blocking: wait for `fileno()` to be readable, then call `recv_batch()`. Needs root or
    CAP_NET_RAW (CAP_NET_ADMIN too for a receive buffer beyond net.core.rmem_max).
    """

    def __init__(
        self, port: int, *, interface: str | None = None, rcvbuf: int = DEFAULT_RCVBUF
    ) -> None:
        self.port = port
        self.interface = interface
        self.ifindex = 0
        self._packets = 0
        self._drops = 0
        self.errors = 0  # transient socket errors seen by recv_batch (e.g. ENETDOWN)
        program = initiation_filter(port)  # ValueError for a bad port, before any socket
        if interface is not None:
            try:
                self.ifindex = socket.if_nametoindex(interface)
            except OSError:
                raise CaptureError(
                    errno.ENODEV, f"no network interface named {interface!r} to capture on"
                ) from None
        self._sock = filtered_socket(program, "capture", "capturing", ifindex=self.ifindex,
                                     rcvbuf=rcvbuf, ignore_outgoing=True)  # fmt: skip
        self._buf = ctypes.create_string_buffer(_BUFSIZE)
        self._addr = _SockaddrLL()
        self._addrlen = ctypes.c_uint32()
        self._buf_p = ctypes.addressof(self._buf)
        self._addr_p = ctypes.addressof(self._addr)
        self._addrlen_p = ctypes.pointer(self._addrlen)

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv_batch(self, max_n: int = 64) -> list[Knock]:
        """Up to `max_n` knocks already queued; [] if none. Never blocks."""
        knocks: list[Knock] = []
        fd = self._sock.fileno()
        if fd < 0:
            raise CaptureError(errno.EBADF, "the capture socket is closed")
        buf_p, addr, addr_p = self._buf_p, self._addr, self._addr_p
        addrlen, addrlen_p = self._addrlen, self._addrlen_p
        reads = 0
        while reads < max_n:
            addrlen.value = ctypes.sizeof(addr)
            n = _recvfrom(fd, buf_p, _BUFSIZE, MSG_DONTWAIT, addr_p, addrlen_p)
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                    break
                if err in (errno.ENETDOWN, errno.ENOBUFS, errno.ENXIO):
                    self.errors += 1  # reported once via sk_err; the socket stays usable
                    break
                raise CaptureError(err, f"reading the capture socket: {os.strerror(err)}")
            reads += 1
            if addr.sll_pkttype != socket.PACKET_HOST:  # backstop; the filter drops these
                continue
            knock = parse_knock(
                ctypes.string_at(buf_p, n),
                ifindex=addr.sll_ifindex,
                received_at=time.monotonic(),
                port=self.port,
            )
            if knock is not None:
                knocks.append(knock)
        return knocks

    def stats(self) -> tuple[int, int]:
        """(packets, drops) since opening: packets that passed the filter (including the
        dropped ones), and those dropped because the receive buffer was full."""
        if self._sock.fileno() >= 0:
            # reading PACKET_STATISTICS resets the kernel's counters: accumulate here
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            packets, drops = struct.unpack("=II", raw)
            self._packets += packets
            self._drops += drops
        return self._packets, self._drops

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self.stats()  # keep the final counts readable after close
        self._sock.close()
