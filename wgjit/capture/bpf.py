"""Classic BPF for the capture socket: a tiny assembler and the handshake-initiation filter.

Pure computation (sans-IO): builds and packs instructions; attaching them is afpacket.py's job.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

# Instruction classes
BPF_LD = 0x00
BPF_LDX = 0x01
BPF_ST = 0x02
BPF_STX = 0x03
BPF_ALU = 0x04
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_MISC = 0x07

# Load sizes
BPF_W = 0x00
BPF_H = 0x08
BPF_B = 0x10

# Load modes
BPF_IMM = 0x00
BPF_ABS = 0x20
BPF_IND = 0x40
BPF_MEM = 0x60
BPF_LEN = 0x80
BPF_MSH = 0xA0

# ALU operations
BPF_ADD = 0x00
BPF_SUB = 0x10
BPF_MUL = 0x20
BPF_DIV = 0x30
BPF_OR = 0x40
BPF_AND = 0x50
BPF_LSH = 0x60
BPF_RSH = 0x70
BPF_NEG = 0x80

# Jump conditions
BPF_JA = 0x00
BPF_JEQ = 0x10
BPF_JGT = 0x20
BPF_JGE = 0x30
BPF_JSET = 0x40

# Operand source (ALU, JMP) and return value source (RET)
BPF_K = 0x00
BPF_X = 0x08
BPF_A = 0x10

# BPF_MISC operations
BPF_TAX = 0x00
BPF_TXA = 0x80

# Ancillary data: `ld [SKF_AD_OFF + n]` reads skb metadata instead of packet bytes.
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0  # skb->protocol in host byte order (ETH_P_*)
SKF_AD_PKTTYPE = 4  # skb->pkt_type (PACKET_HOST, ..., PACKET_OUTGOING)

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
PACKET_HOST = 0  # addressed to this host (not broadcast, not another host's, not outgoing)
IPPROTO_UDP = 17

INITIATION_SIZE = 148
UDP_HEADER_SIZE = 8
INITIATION_UDP_LENGTH = UDP_HEADER_SIZE + INITIATION_SIZE
INITIATION_WORD = 0x01000000  # type 1 and three reserved zero bytes, read big-endian
IPV6_HEADER_SIZE = 40

_SOCK_FILTER = struct.Struct("@HBBI")  # struct sock_filter: code, jt, jf, k (native order)
BPF_MAXINSNS = 4096


class Insn(NamedTuple):
    """One classic BPF instruction (`struct sock_filter`); `k` is kept as an unsigned 32-bit."""

    code: int
    jt: int
    jf: int
    k: int


def _u32(k: int) -> int:
    if not -(2**31) <= k < 2**32:
        raise ValueError(f"BPF constant {k} does not fit 32 bits")
    return k & 0xFFFFFFFF


def stmt(code: int, k: int = 0) -> Insn:
    """A non-jump instruction (BPF_STMT)."""
    return Insn(code, 0, 0, _u32(k))


def pack(program: list[Insn]) -> bytes:
    """The instructions as the `struct sock_filter` array that `struct sock_fprog` points at."""
    if not 0 < len(program) <= BPF_MAXINSNS:
        raise ValueError(f"a BPF program has 1-{BPF_MAXINSNS} instructions, not {len(program)}")
    out = bytearray()
    for i, insn in enumerate(program):
        if not (0 <= insn.code <= 0xFFFF and 0 <= insn.jt <= 0xFF and 0 <= insn.jf <= 0xFF):
            raise ValueError(f"instruction {i} out of range: {insn}")
        out += _SOCK_FILTER.pack(insn.code, insn.jt, insn.jf, _u32(insn.k))
    return bytes(out)


# --- a two-pass assembler with named labels, so jump offsets are never counted by hand ---


@dataclass(frozen=True, slots=True)
class Label:
    name: str


@dataclass(frozen=True, slots=True)
class Jump:
    """A conditional jump; a target of None falls through to the next instruction."""

    code: int
    k: int
    jt: str | None
    jf: str | None


def jump(cond: int, k: int, jt: str | None, jf: str | None = None) -> Jump:
    return Jump(BPF_JMP | cond | BPF_K, _u32(k), jt, jf)


def assemble(source: list[Insn | Jump | Label]) -> list[Insn]:
    """Resolve labels into forward jump offsets (0-255, relative to the next instruction)."""
    where: dict[str, int] = {}
    n = 0
    for item in source:
        if isinstance(item, Label):
            if item.name in where:
                raise ValueError(f"label {item.name!r} defined twice")
            where[item.name] = n
        else:
            n += 1

    def offset(at: int, target: str | None) -> int:
        if target is None:
            return 0
        if target not in where:
            raise ValueError(f"jump to undefined label {target!r}")
        off = where[target] - at - 1
        if not 0 <= off <= 0xFF:
            raise ValueError(f"jump to {target!r} from {at} is not 0-255 forward ({off})")
        return off

    out: list[Insn] = []
    for item in source:
        if isinstance(item, Label):
            continue
        if isinstance(item, Jump):
            at = len(out)
            out.append(Insn(item.code, offset(at, item.jt), offset(at, item.jf), item.k))
        else:
            out.append(item)
    return out


def initiation_filter(port: int) -> list[Insn]:
    """Accept only incoming WireGuard handshake initiations to UDP `port`.

    For a cooked (SOCK_DGRAM) AF_PACKET socket: offset 0 is the network header. Accepted:
    packets addressed to this host (PACKET_HOST: not outgoing, not broadcast, not another
    host's frames seen on a bridge port or in promiscuous mode), carrying IPv4 (unfragmented,
    any IHL) or IPv6 with UDP *directly* after the fixed header (extension headers are not
    followed, so an initiation behind e.g. a hop-by-hop or fragment header is not captured),
    destination port `port`, UDP length 8+148, first payload word 01 00 00 00, and all 148
    bytes present (a load past the end of the packet rejects it). Keeps exactly the bytes from
    the network header to the end of the 148-byte message (IP header + UDP header + payload).
    """
    ld_w, ld_h, ld_b, ind_w, ind_h = _LOADS
    v4: _Source = [  # X = the UDP header's offset
        stmt(ind_h, 2),
        jump(BPF_JEQ, port, None, _REJECT),
        stmt(ind_h, 4),
        jump(BPF_JEQ, INITIATION_UDP_LENGTH, None, _REJECT),
        stmt(ind_w, UDP_HEADER_SIZE),
        jump(BPF_JEQ, INITIATION_WORD, None, _REJECT),
        stmt(BPF_LD | BPF_B | BPF_IND, INITIATION_UDP_LENGTH - 1),  # truncated? (rejects)
        stmt(BPF_MISC | BPF_TXA),
        stmt(BPF_ALU | BPF_ADD | BPF_K, INITIATION_UDP_LENGTH),
        stmt(BPF_RET | BPF_A),
    ]
    v6: _Source = [
        stmt(ld_h, IPV6_HEADER_SIZE + 2),
        jump(BPF_JEQ, port, None, _REJECT),
        stmt(ld_h, IPV6_HEADER_SIZE + 4),
        jump(BPF_JEQ, INITIATION_UDP_LENGTH, None, _REJECT),
        stmt(ld_w, IPV6_HEADER_SIZE + UDP_HEADER_SIZE),
        jump(BPF_JEQ, INITIATION_WORD, None, _REJECT),
        stmt(ld_b, IPV6_HEADER_SIZE + INITIATION_UDP_LENGTH - 1),
        stmt(BPF_RET | BPF_K, IPV6_HEADER_SIZE + INITIATION_UDP_LENGTH),
    ]
    return _udp_filter(port, PACKET_HOST, v4, v6)


# BPF_ABS loads of a word, half-word and byte; BPF_IND loads (offset + X) of a word, half-word
_LOADS = (
    BPF_LD | BPF_W | BPF_ABS,
    BPF_LD | BPF_H | BPF_ABS,
    BPF_LD | BPF_B | BPF_ABS,
    BPF_LD | BPF_W | BPF_IND,
    BPF_LD | BPF_H | BPF_IND,
)
_REJECT = "reject"
_Source = list[Insn | Jump | Label]  # a program before assemble()


def _udp_filter(port: int, pkttype: int, v4: _Source, v6: _Source) -> list[Insn]:
    """What both filters share: packets of `pkttype` carrying IPv4 (unfragmented, any IHL)
    or IPv6 with UDP directly after the fixed header; then `v4` (with X = the UDP header's
    offset) or `v6` judges the datagram, each ending in a return or a jump to _REJECT."""
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1-65535, not {port}")
    ld_w, ld_h, ld_b, _, _ = _LOADS
    return assemble([
        stmt(ld_w, SKF_AD_OFF + SKF_AD_PKTTYPE),
        jump(BPF_JEQ, pkttype, None, _REJECT),
        stmt(ld_w, SKF_AD_OFF + SKF_AD_PROTOCOL),
        jump(BPF_JEQ, ETH_P_IP, "ipv4"),
        jump(BPF_JEQ, ETH_P_IPV6, "ipv6", _REJECT),
        Label("ipv4"),
        stmt(ld_b, 0),  # version and IHL: 0x45..0x4f
        jump(BPF_JGE, 0x45, None, _REJECT),
        jump(BPF_JGT, 0x4F, _REJECT),
        stmt(ld_b, 9),
        jump(BPF_JEQ, IPPROTO_UDP, None, _REJECT),
        stmt(ld_h, 6),  # flags and fragment offset: MF set or offset nonzero -> fragment
        jump(BPF_JSET, 0x3FFF, _REJECT),
        stmt(BPF_LDX | BPF_B | BPF_MSH, 0),  # X = 4 * IHL: the UDP header's offset
        *v4,
        Label("ipv6"),
        stmt(ld_b, 0),
        stmt(BPF_ALU | BPF_AND | BPF_K, 0xF0),
        jump(BPF_JEQ, 0x60, None, _REJECT),
        stmt(ld_b, 6),  # next header: UDP right after the fixed header, nothing else
        jump(BPF_JEQ, IPPROTO_UDP, None, _REJECT),
        *v6,
        Label(_REJECT),
        stmt(BPF_RET | BPF_K, 0),
    ])


PACKET_OUTGOING = 4  # sent by this host
RESPONSE_SIZE = 92  # handshake response (type 2)
COOKIE_REPLY_SIZE = 64  # cookie reply (type 3)
RESPONSE_WORD = 0x02000000
COOKIE_REPLY_WORD = 0x03000000
# what answers_filter keeps of the WireGuard message: type, sender/receiver indices, and a cookie
# reply's nonce (enough to match an answer to its initiation and to tell copies apart)
ANSWER_KEEP = 32


def answers_filter(port: int) -> list[Insn]:
    """Accept only the device's outgoing handshake answers from UDP source port `port`.

    For a cooked (SOCK_DGRAM) AF_PACKET socket bound to all interfaces: packets this host
    sends (PACKET_OUTGOING), IPv4 (unfragmented, any IHL) or IPv6 with UDP directly after the
    fixed header, source port `port`, and either a handshake response (UDP length 8+92, first
    word 02 00 00 00) or a cookie reply (8+64, 03 00 00 00). Keeps the bytes from the network
    header to ANSWER_KEEP bytes into the message. A frame that crosses several interfaces (a
    bridge, then its port) is seen once on each: the reader tells copies apart.
    """
    ld_w, ld_h, ld_b, ind_w, ind_h = _LOADS
    v4: _Source = [  # X = the UDP header's offset
        stmt(ind_h, 0),
        jump(BPF_JEQ, port, None, _REJECT),
        stmt(ind_h, 4),
        jump(BPF_JEQ, UDP_HEADER_SIZE + RESPONSE_SIZE, "v4_response"),
        jump(BPF_JEQ, UDP_HEADER_SIZE + COOKIE_REPLY_SIZE, None, _REJECT),
        stmt(ind_w, UDP_HEADER_SIZE),
        jump(BPF_JEQ, COOKIE_REPLY_WORD, "v4_keep", _REJECT),
        Label("v4_response"),
        stmt(ind_w, UDP_HEADER_SIZE),
        jump(BPF_JEQ, RESPONSE_WORD, None, _REJECT),
        Label("v4_keep"),
        stmt(BPF_LD | BPF_B | BPF_IND, UDP_HEADER_SIZE + ANSWER_KEEP - 1),  # truncated?
        stmt(BPF_MISC | BPF_TXA),
        stmt(BPF_ALU | BPF_ADD | BPF_K, UDP_HEADER_SIZE + ANSWER_KEEP),
        stmt(BPF_RET | BPF_A),
    ]
    v6: _Source = [
        stmt(ld_h, IPV6_HEADER_SIZE),
        jump(BPF_JEQ, port, None, _REJECT),
        stmt(ld_h, IPV6_HEADER_SIZE + 4),
        jump(BPF_JEQ, UDP_HEADER_SIZE + RESPONSE_SIZE, "v6_response"),
        jump(BPF_JEQ, UDP_HEADER_SIZE + COOKIE_REPLY_SIZE, None, _REJECT),
        stmt(ld_w, IPV6_HEADER_SIZE + UDP_HEADER_SIZE),
        jump(BPF_JEQ, COOKIE_REPLY_WORD, "v6_keep", _REJECT),
        Label("v6_response"),
        stmt(ld_w, IPV6_HEADER_SIZE + UDP_HEADER_SIZE),
        jump(BPF_JEQ, RESPONSE_WORD, None, _REJECT),
        Label("v6_keep"),
        stmt(ld_b, IPV6_HEADER_SIZE + UDP_HEADER_SIZE + ANSWER_KEEP - 1),
        stmt(BPF_RET | BPF_K, IPV6_HEADER_SIZE + UDP_HEADER_SIZE + ANSWER_KEEP),
    ]
    return _udp_filter(port, PACKET_OUTGOING, v4, v6)
