"""A hold-and-release capture source: an nfnetlink_queue client on a raw netlink socket.

The kernel (an iptables `NFQUEUE` rule, see `wgjit.capture.iptables`) hands each queued
handshake initiation to this socket and holds the packet until it gets a verdict. `NfQueue`
turns queued packets into `Held` (a `Knock` plus the kernel's packet id) and sends ACCEPT or
DROP verdicts, several per `sendmsg` when a batch is flushed. Message building and parsing are
sans-IO functions (`config_message`, `verdict_message`, `parse_messages`); only `NfQueue` does
I/O. It never decides a verdict: the gateway's policy does, the loop calls `verdict()`.

Protocol (linux/netfilter/nfnetlink_queue.h): messages of subsystem NFNL_SUBSYS_QUEUE (3) with
an nfgenmsg header whose res_id is the queue number (big-endian); attribute payloads are
big-endian. Queue setup: CMD_BIND, then copy mode PACKET, then flags FAIL_OPEN.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

from wgjit.capture.packet import Knock, parse_knock
from wgjit.closing import Closing

NETLINK_NETFILTER = 12
NETLINK_NO_ENOBUFS = 5
SOL_NETLINK = 270
SO_RCVBUFFORCE = 33
SO_TIMESTAMP = 29  # asm-generic/socket.h (SO_TIMESTAMP_OLD)

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NFNETLINK_V0 = 0
NFNL_SUBSYS_QUEUE = 3

NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3  # one verdict for every packet of the queue up to an id

NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_PACKET = 2
# when the queue is full, let packets through instead of dropping them (the device still
# authenticates every initiation itself; see NfQueue)
NFQA_CFG_F_FAIL_OPEN = 0x0001

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_TIMESTAMP = 4
NFQA_IFINDEX_INDEV = 5
NFQA_PAYLOAD = 10

NF_DROP = 0
NF_ACCEPT = 1

# an initiation is at most 60 (IPv4 with options) + 8 + 148 bytes; copy a little more
COPY_RANGE = 256
# A failover herd of 10 000 peers knocking within a second must fit: the kernel holds up to
# DEFAULT_MAXLEN (beyond that FAIL_OPEN lets packets through unjudged), and the socket buffer
# must hold as many queued-packet messages (~400 bytes each with COPY_RANGE), or the kernel
# drops what it cannot deliver.
DEFAULT_MAXLEN = 16384
DEFAULT_RCVBUF = 16 << 20
# how long a packet may stay queued without a verdict before expire() releases it
DEFAULT_HOLD_TIMEOUT = 1.0
# a kernel timestamp further in the past than this (or in the future) is not trusted: the
# wall clock was stepped; the packet is then taken as queued when it was read
MAX_STAMP_AGE = 10.0

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid (host order)
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (queue number, big-endian)
_NLMSG_START = struct.Struct("=IH")  # a netlink message's length and type
_PACKET_ATTRS = _NLMSGHDR.size + _NFGENMSG.size  # where a lone message's attributes start
_NLATTR = struct.Struct("=HH")  # length, type
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
_PACKET_HDR = struct.Struct("!IHB")  # packet_id, hw_protocol, hook
_VERDICT_HDR = struct.Struct("!II")  # verdict, packet_id
_U32 = struct.Struct("!I")
_TIMESTAMP = struct.Struct("!QQ")  # struct nfqnl_msg_packet_timestamp: sec, usec (wall clock)


class QueueError(OSError):
    """The queue could not be bound or read; `errno` is set, the message says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


# -- sans-IO: building ---------------------------------------------------------------------


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, value: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(value), kind) + value
    return raw + bytes(_align(len(raw)) - len(raw))


def _message(msg_type: int, flags: int, seq: int, queue: int, attrs: bytes, family: int) -> bytes:
    body = _NFGENMSG.pack(family, NFNETLINK_V0, queue) + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg_type
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def config_message(queue: int, seq: int, attrs: bytes) -> bytes:
    """A NFQNL_MSG_CONFIG request for `queue` carrying `attrs`, asking for an ack."""
    return _message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, queue, attrs, 0)


def cmd_attr(command: int) -> bytes:
    """NFQA_CFG_CMD: struct nfqnl_msg_config_cmd {u8 command; u8 pad; be16 pf} (pf unused)."""
    return _attr(NFQA_CFG_CMD, struct.pack("!BxH", command, 0))


def params_attr(copy_range: int, copy_mode: int = NFQNL_COPY_PACKET) -> bytes:
    """NFQA_CFG_PARAMS: struct nfqnl_msg_config_params {be32 copy_range; u8 copy_mode}."""
    return _attr(NFQA_CFG_PARAMS, struct.pack("!IB", copy_range, copy_mode))


def maxlen_attr(maxlen: int) -> bytes:
    return _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))


def flags_attr(flags: int, mask: int) -> bytes:
    return _attr(NFQA_CFG_FLAGS, struct.pack("!I", flags)) + _attr(
        NFQA_CFG_MASK, struct.pack("!I", mask)
    )


def verdict_message(queue: int, packet_id: int, accept: bool, seq: int = 0, *,
                    batch: bool = False) -> bytes:  # fmt: skip
    """A NFQNL_MSG_VERDICT for one packet (no ack requested: verdicts are fire and forget);
    `batch`: a NFQNL_MSG_VERDICT_BATCH, the verdict for every packet queued up to packet_id."""
    hdr = _VERDICT_HDR.pack(NF_ACCEPT if accept else NF_DROP, packet_id)
    kind = NFQNL_MSG_VERDICT_BATCH if batch else NFQNL_MSG_VERDICT
    return _message(kind, NLM_F_REQUEST, seq, queue, _attr(NFQA_VERDICT_HDR, hdr), 0)


@functools.cache
def _verdict_head(queue: int, accept: bool) -> bytes:
    """verdict_message(queue, id, accept) up to the id, its last 4 bytes: what a verdict in a
    flush copies instead of building anew (a flood's drops may need one each)."""
    return verdict_message(queue, 0, accept)[:-4]


# -- sans-IO: parsing ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueuedPacket:
    """One NFQNL_MSG_PACKET: the kernel's id for the verdict, the in-interface, the IP packet."""

    queue: int
    packet_id: int
    ifindex: int
    payload: bytes
    # when the kernel received it (unix seconds), if the kernel stamped it (see NfQueue)
    timestamp: float | None = None


@dataclass(frozen=True, slots=True)
class NetlinkError:
    """An NLMSG_ERROR: `code` 0 is an ack, otherwise a negative errno for request `seq`."""

    seq: int
    code: int


_PACKET_KIND = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET


def _packet_attrs(data: bytes, at: int, end: int) -> tuple[int, int, float | None, bytes]:
    """A NFQNL_MSG_PACKET's attributes, walked in place from `at` to `end` (this runs for
    every packet of a flood): (packet id or -1 if none, in-interface, timestamp, payload)."""
    packet_id, ifindex, ts, payload = -1, 0, None, b""
    while at + 4 <= end:
        alen, akind = _NLATTR.unpack_from(data, at)
        if alen < 4 or at + alen > end:
            break
        akind &= _NLA_TYPE_MASK
        if akind == NFQA_PAYLOAD:
            payload = data[at + 4 : at + alen]
        elif akind == NFQA_PACKET_HDR and alen >= 4 + _PACKET_HDR.size:
            packet_id = _PACKET_HDR.unpack_from(data, at + 4)[0]
        elif akind == NFQA_IFINDEX_INDEV and alen == 8:
            ifindex = _U32.unpack_from(data, at + 4)[0]
        elif akind == NFQA_TIMESTAMP and alen == 4 + _TIMESTAMP.size:
            sec, usec = _TIMESTAMP.unpack_from(data, at + 4)
            ts = sec + usec / 1e6
        at += (alen + 3) & ~3
    return packet_id, ifindex, ts, payload


def parse_messages(data: bytes) -> Iterator[QueuedPacket | NetlinkError]:
    """The queued packets and errors/acks in one datagram read from the socket.

    Total: anything malformed ends the walk (what came before is still yielded); messages of
    other types are skipped."""
    pos = 0
    n = len(data)
    while pos + _NLMSGHDR.size <= n:
        length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size or pos + length > n:
            return
        body = pos + _NLMSGHDR.size
        end = pos + length
        if kind == NLMSG_ERROR and end - body >= 4:
            (code,) = struct.unpack_from("=i", data, body)
            yield NetlinkError(seq, code)
        elif kind == _PACKET_KIND and end - body >= _NFGENMSG.size:
            packet_id, ifindex, ts, payload = _packet_attrs(data, body + _NFGENMSG.size, end)
            if packet_id >= 0:
                yield QueuedPacket(_NFGENMSG.unpack_from(data, body)[2], packet_id, ifindex,
                                   payload, ts)  # fmt: skip
        pos += _align(length)


# -- the socket ----------------------------------------------------------------------------


@dataclass(slots=True, unsafe_hash=True)  # not frozen, as Knock: one per packet
class Held:
    """A knock the kernel is holding until `NfQueue.verdict(held, ...)`."""

    knock: Knock
    packet_id: int


class NfQueue(Closing):
    """Initiations queued to nfnetlink queue `queue_num` (in this network namespace).

    Non-blocking: wait for `fileno()`, call `recv_batch()`, give every `Held` a `verdict()`,
    then `flush()` to send the verdicts (one `sendmsg`). Packets that do not parse as a
    handshake initiation to `port` are dropped here and counted as `malformed`.

    No packet stays held for ever: `expire(now)` releases (ACCEPT) any packet queued more
    than `hold_timeout` seconds ago (by the kernel's timestamp, else by when it was read) and
    still without a verdict, and `close()` releases all of them (closing the socket would make
    the kernel drop them). Release, not drop: a late ACCEPT
    cannot admit anyone (the device authenticates every initiation and ignores keys it does
    not have), whereas a DROP would make a legitimate client wait for its 5 s retry; it is also
    what `--queue-bypass` does while no gateway listens. The queue is bound with FAIL_OPEN for
    the same reason: if it ever fills up, packets pass instead of being dropped.
    Needs CAP_NET_ADMIN.
    """

    def __init__(
        self,
        queue_num: int,
        port: int,
        *,
        maxlen: int = DEFAULT_MAXLEN,
        rcvbuf: int = DEFAULT_RCVBUF,
        hold_timeout: float = DEFAULT_HOLD_TIMEOUT,
    ) -> None:
        if not 0 <= queue_num <= 0xFFFF:
            raise ValueError(f"queue number {queue_num} is not in 0..65535")
        self.queue_num = queue_num
        self.port = port
        self.hold_timeout = hold_timeout
        self.malformed = 0
        self.expired = 0
        self.accepted = 0
        self.dropped = 0
        self.overruns = 0  # times the socket buffer overflowed (the kernel then fails open)
        self._held: dict[int, float] = {}  # packet id -> monotonic time read
        self._out: list[tuple[int, bool]] = []  # verdicts for the next flush: (id, accept)
        self.batched = 0  # flushes sent as one batch verdict
        self._seq = 0
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except PermissionError:
            raise QueueError(errno.EPERM, "NFQUEUE needs root or CAP_NET_ADMIN") from None
        except OSError as e:
            raise QueueError(
                e.errno or errno.EIO, f"cannot open a netfilter netlink socket: {e.strerror}"
            ) from None
        try:
            self._setup(maxlen, rcvbuf)
        except BaseException:
            self._sock.close()
            raise

    def _setup(self, maxlen: int, rcvbuf: int) -> None:
        sock = self._sock
        sock.bind((0, 0))
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._request(cmd_attr(NFQNL_CFG_CMD_BIND), "bind the queue")
        self._request(params_attr(COPY_RANGE) + maxlen_attr(maxlen), "set the copy mode")
        self._request(
            flags_attr(NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_FAIL_OPEN), "set the fail-open flag"
        )
        # Ask the kernel to stamp received packets (net_enable_timestamp): queued packets then
        # carry NFQA_TIMESTAMP, and the hold timeout counts from when the kernel queued a
        # packet, not from when this process got round to reading it.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        sock.setblocking(False)

    def _request(self, attrs: bytes, what: str) -> None:
        """Send one config request and wait (blocking, 2 s) for its ack."""
        self._seq += 1
        seq = self._seq
        self._sock.settimeout(2.0)
        self._sock.send(config_message(self.queue_num, seq, attrs))
        while True:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise QueueError(errno.ETIMEDOUT, f"no answer from the kernel to {what}") from None
            for m in parse_messages(data):
                if isinstance(m, NetlinkError) and m.seq == seq:
                    if m.code == 0:
                        return
                    code = -m.code
                    hint = ""
                    if code == errno.EBUSY:
                        hint = f" (queue {self.queue_num} is bound by another process)"
                    elif code in (errno.ENOENT, errno.EOPNOTSUPP, errno.EPROTONOSUPPORT):
                        hint = " (is the nfnetlink_queue module available?)"
                    raise QueueError(
                        code, f"cannot {what} {self.queue_num}: {os.strerror(code)}{hint}"
                    )

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv_batch(self, max_n: int = 64) -> list[Held]:
        """Up to `max_n` queued initiations already waiting; [] if none. Never blocks."""
        out: list[Held] = []
        reads = 0
        while reads < max_n:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise QueueError(e.errno or errno.EIO, f"reading the queue: {e}") from None
            reads += 1
            now = time.monotonic()
            wall = time.time()
            n = len(data)
            if n >= _PACKET_ATTRS and _NLMSG_START.unpack_from(data) == (n, _PACKET_KIND):
                # the usual datagram: one queued packet, parsed without parse_messages' objects
                packet_id, ifindex, ts, payload = _packet_attrs(data, _PACKET_ATTRS, n)
                if packet_id >= 0:
                    self._take(packet_id, ifindex, ts, payload, now, wall, out)
                continue
            for m in parse_messages(data):
                if isinstance(m, QueuedPacket):
                    self._take(m.packet_id, m.ifindex, m.timestamp, m.payload, now, wall, out)
        if self._out:
            self.flush()
        return out

    def _take(self, packet_id: int, ifindex: int, stamp: float | None, payload: bytes,
              now: float, wall: float, out: list[Held]) -> None:  # fmt: skip
        queued = now
        if stamp is not None and 0.0 <= wall - stamp <= MAX_STAMP_AGE:
            queued = now - (wall - stamp)
        knock = parse_knock(payload, ifindex=ifindex, received_at=queued, port=self.port)
        if knock is None:
            self.malformed += 1
            self._verdict(packet_id, False)
            return
        self._held[packet_id] = queued
        out.append(Held(knock, packet_id))

    def verdict(self, held: Held, accept: bool) -> None:
        """Queue the verdict for `held`; sent by the next `flush()`. Once per packet."""
        if self._held.pop(held.packet_id, None) is not None:
            self._verdict(held.packet_id, accept)

    def holds(self, held: Held) -> bool:
        """Whether `held` still waits for its verdict (not released by expire())."""
        return held.packet_id in self._held

    def _verdict(self, packet_id: int, accept: bool) -> None:
        if accept:
            self.accepted += 1
        else:
            self.dropped += 1
        self._out.append((packet_id, accept))

    def flush(self) -> None:
        """Send the pending verdicts, all in one datagram. When they are all the same and no
        packet queued before the newest of them still waits (a flood's drops, typically),
        that is one batch verdict instead of one message per packet: the kernel's netlink
        work for a flood's verdicts was a third of the loop's time."""
        out = self._out
        if not out:
            return
        q = self.queue_num
        accept = out[0][1]
        newest = max(pid for pid, _ in out)
        oldest_held = next(iter(self._held), None)
        if (
            len(out) > 1
            and all(a is accept for _, a in out)
            and newest - min(pid for pid, _ in out) < 1 << 30  # ids did not wrap around
            and (oldest_held is None or 0 < oldest_held - newest < 1 << 30)
        ):
            data = verdict_message(q, newest, accept, batch=True)
            self.batched += 1
        else:
            data = b"".join(_verdict_head(q, a) + pid.to_bytes(4, "big") for pid, a in out)
        out.clear()
        while True:
            try:
                self._sock.send(data)
                return
            except InterruptedError:
                continue
            except BlockingIOError:
                # the kernel processes verdicts synchronously in send(); this is not expected
                time.sleep(0.001)

    def next_deadline(self) -> float | None:
        """When `expire()` next has work (monotonic), or None. Packets are held in the order
        the kernel queued them, so the oldest is the first."""
        for t in self._held.values():
            return t + self.hold_timeout
        return None

    def expire(self, now: float) -> int:
        """Release packets held longer than `hold_timeout`; returns how many."""
        late = []
        for pid, t in self._held.items():
            if now - t < self.hold_timeout:
                break
            late.append(pid)
        for pid in late:
            del self._held[pid]
            self._verdict(pid, True)
        self.expired += len(late)
        self.flush()
        return len(late)

    def stats(self) -> dict[str, int]:
        return {
            "queue_accepted": self.accepted,
            "queue_dropped": self.dropped,
            "queue_malformed": self.malformed,
            "queue_expired": self.expired,
            "queue_overruns": self.overruns,
            "queue_batched": self.batched,
        }

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        for pid in list(self._held):
            self._verdict(pid, True)
        self._held.clear()
        with contextlib.suppress(OSError):
            self.flush()
        self._sock.close()
