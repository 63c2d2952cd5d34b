"""Capture room without root: packet parsing, and the BPF filter run by a small interpreter.

The interpreter implements the classic-BPF opcodes the filter uses with kernel semantics (loads
past the end reject the packet; ancillary loads read the given pkttype/protocol), so offset
mistakes in the filter show up here instead of as silently missed knocks.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgjit.addr import Endpoint
from wgjit.capture import bpf
from wgjit.capture.answers import COOKIE_REPLY, RESPONSE, Answer, parse_answer
from wgjit.capture.bpf import Insn, answers_filter, assemble, initiation_filter, jump, pack, stmt
from wgjit.capture.packet import Knock, parse_knock

PORT = 51820
HOST, OUTGOING, OTHERHOST = 0, 4, 3
INIT = b"\x01\x00\x00\x00" + os.urandom(144)
V4_SRC, V4_DST = "198.18.97.2", "198.18.97.1"
V6_SRC, V6_DST = "fd00:97::2", "fd00:97::1"


# ---------------------------------------------------------------- packet builders


def udp(sport: int, dport: int, payload: bytes, length: int | None = None) -> bytes:
    n = 8 + len(payload) if length is None else length
    return struct.pack("!HHHH", sport, dport, n, 0xBEEF) + payload


def ipv4(
    payload: bytes = INIT,
    *,
    sport: int = 40000,
    dport: int = PORT,
    src: str = V4_SRC,
    dst: str = V4_DST,
    proto: int = 17,
    frag: int = 0x4000,  # DF set, as Linux sends
    options: bytes = b"",
    udp_length: int | None = None,
    total: int | None = None,
) -> bytes:
    assert len(options) % 4 == 0
    body = udp(sport, dport, payload, udp_length) if proto == 17 else payload
    ihl = 5 + len(options) // 4
    tot = ihl * 4 + len(body) if total is None else total
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        tot,
        0x1234,
        frag,
        64,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return hdr + options + body


def ipv6(
    payload: bytes = INIT,
    *,
    sport: int = 40000,
    dport: int = PORT,
    src: str = V6_SRC,
    dst: str = V6_DST,
    next_header: int = 17,
    udp_length: int | None = None,
    ext: bytes = b"",
) -> bytes:
    body = ext + (udp(sport, dport, payload, udp_length) if next_header in (17, 0) else payload)
    hdr = struct.pack("!IHBB", 0x60000000, len(body), next_header, 64)
    return hdr + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + body


# ---------------------------------------------------------------- classic BPF interpreter


def run_bpf(prog: list[Insn], pkt: bytes, *, pkttype: int, protocol: int) -> int:
    """Return value of `prog` on `pkt` (bytes to keep; 0 = reject), as the kernel computes it."""
    a = x = 0
    pc = 0
    size = {bpf.BPF_W: 4, bpf.BPF_H: 2, bpf.BPF_B: 1}

    def load(off: int, n: int) -> int | None:
        if off < 0 or off + n > len(pkt):
            return None
        return int.from_bytes(pkt[off : off + n], "big")

    while True:
        assert 0 <= pc < len(prog), "fell off the end of the program"
        code, jt, jf, k = prog[pc]
        pc += 1
        cls = code & 0x07
        if cls == bpf.BPF_LD:
            mode, n = code & 0xE0, size[code & 0x18]
            if mode == bpf.BPF_ABS:
                signed = k - (1 << 32) if k & 0x80000000 else k
                if signed < 0:
                    assert signed >= bpf.SKF_AD_OFF and code & 0x18 == bpf.BPF_W
                    anc = {bpf.SKF_AD_PROTOCOL: protocol, bpf.SKF_AD_PKTTYPE: pkttype}
                    a = anc[signed - bpf.SKF_AD_OFF]
                    continue
                v = load(signed, n)
            elif mode == bpf.BPF_IND:
                v = load(x + k, n)
            else:
                raise AssertionError(f"unsupported load mode {code:#x}")
            if v is None:
                return 0
            a = v
        elif cls == bpf.BPF_LDX:
            assert code == bpf.BPF_LDX | bpf.BPF_B | bpf.BPF_MSH, f"unsupported {code:#x}"
            v = load(k, 1)
            if v is None:
                return 0
            x = (v & 0x0F) * 4
        elif cls == bpf.BPF_ALU:
            assert code & 0x08 == bpf.BPF_K
            op = code & 0xF0
            if op == bpf.BPF_ADD:
                a = (a + k) & 0xFFFFFFFF
            elif op == bpf.BPF_AND:
                a &= k
            else:
                raise AssertionError(f"unsupported ALU op {code:#x}")
        elif cls == bpf.BPF_JMP:
            assert code & 0x08 == bpf.BPF_K
            op = code & 0xF0
            if op == bpf.BPF_JA:
                pc += k
                continue
            cond = {
                bpf.BPF_JEQ: a == k,
                bpf.BPF_JGT: a > k,
                bpf.BPF_JGE: a >= k,
                bpf.BPF_JSET: bool(a & k),
            }[op]
            pc += jt if cond else jf
        elif cls == bpf.BPF_RET:
            return a if code & 0x18 == bpf.BPF_A else k
        elif cls == bpf.BPF_MISC:
            if code & 0xF8 == bpf.BPF_TAX:
                x = a
            elif code & 0xF8 == bpf.BPF_TXA:
                a = x
            else:
                raise AssertionError(f"unsupported misc {code:#x}")
        else:
            raise AssertionError(f"unsupported class {code:#x}")


FILTER = initiation_filter(PORT)


def captured(pkt: bytes, *, pkttype: int = HOST, protocol: int | None = None) -> bytes | None:
    """What an AF_PACKET socket with the filter would deliver: the kept prefix, or None."""
    if protocol is None:
        protocol = bpf.ETH_P_IPV6 if pkt[0] >> 4 == 6 else bpf.ETH_P_IP
    keep = run_bpf(FILTER, pkt, pkttype=pkttype, protocol=protocol)
    return pkt[:keep] if keep else None


# ---------------------------------------------------------------- filter


@pytest.mark.parametrize(
    "pkt, keep",
    [
        (ipv4(), 20 + 156),
        (ipv4(options=b"\x01\x01\x01\x00" * 2), 28 + 156),
        (ipv4(options=b"\x01" * 40), 60 + 156),
        (ipv4(INIT + b"\x00" * 3, udp_length=156), 176),  # trailing bytes are not kept
        (ipv6(), 40 + 156),
    ],
    ids=["v4", "v4-options", "v4-max-ihl", "v4-trailing", "v6"],
)
def test_filter_accepts_initiations_and_keeps_exactly_the_packet(pkt: bytes, keep: int) -> None:
    got = captured(pkt)
    assert got is not None and len(got) == keep
    assert got == pkt[:keep]


@pytest.mark.parametrize(
    "pkt",
    [
        ipv4(dport=51821),
        ipv6(dport=51821),
        ipv4(dport=((PORT & 0xFF) << 8) | (PORT >> 8)),  # byte-swapped port
        ipv4(INIT[:147]),
        ipv6(INIT[:147]),
        ipv4(INIT + b"\x00"),
        ipv6(INIT + b"\x00"),
        ipv4(b"\x02" + INIT[1:]),
        ipv6(b"\x02" + INIT[1:]),
        ipv4(b"\x01\x00\x00\x01" + INIT[4:]),  # reserved bytes must be zero
        ipv4(b"\x02\x00\x00\x00" + bytes(88)),  # handshake response
        ipv4(frag=0x2000),  # MF: first fragment
        ipv4(frag=0x0010),  # offset != 0
        ipv4(frag=0x4001),  # DF and offset 8 bytes
        ipv4(udp(40000, PORT, INIT), proto=6),
        ipv6(udp(40000, PORT, INIT), next_header=6),
        ipv6(ext=b"\x11\x00" + bytes(6), next_header=0),  # hop-by-hop: not followed
        ipv4(udp_length=157),
        ipv6(udp_length=155),
        ipv4()[:100],  # truncated: loads past the end reject
        ipv6()[:190],
        b"\x45",
        b"",
    ],
    ids=[
        "v4-port", "v6-port", "v4-swapped-port", "v4-147", "v6-147", "v4-149", "v6-149",
        "v4-type2-148", "v6-type2-148", "v4-reserved", "v4-response", "v4-mf", "v4-offset",
        "v4-df-offset", "v4-tcp", "v6-tcp", "v6-ext-header", "v4-udplen", "v6-udplen",
        "v4-truncated", "v6-truncated", "one-byte", "empty",
    ],
)  # fmt: skip
def test_filter_rejects(pkt: bytes) -> None:
    protocol = bpf.ETH_P_IPV6 if pkt[:1] == b"\x60" else bpf.ETH_P_IP
    assert run_bpf(FILTER, pkt, pkttype=HOST, protocol=protocol) == 0


def test_filter_rejects_outgoing_and_other_protocols() -> None:
    assert captured(ipv4(), pkttype=OUTGOING) is None
    assert captured(ipv6(), pkttype=OUTGOING) is None
    assert captured(ipv4(), pkttype=1) is None  # broadcast: a knock is never broadcast
    # another host's frame, e.g. on a bridge port (the same datagram then arrives as HOST on
    # the bridge itself if it is for us) or in promiscuous mode
    assert captured(ipv4(), pkttype=OTHERHOST) is None
    assert captured(ipv4(), protocol=0x0806) is None  # ARP
    assert captured(ipv4(), protocol=bpf.ETH_P_IPV6) is None  # version nibble disagrees
    assert captured(ipv6(), protocol=bpf.ETH_P_IP) is None
    bad_ihl = bytes([0x44]) + ipv4()[1:]
    assert captured(bad_ihl) is None


def test_filter_port_is_a_parameter() -> None:
    prog = initiation_filter(443)
    assert run_bpf(prog, ipv4(dport=443), pkttype=HOST, protocol=bpf.ETH_P_IP) == 176
    assert run_bpf(prog, ipv4(), pkttype=HOST, protocol=bpf.ETH_P_IP) == 0
    for bad in (0, 65536, -1):
        with pytest.raises(ValueError):
            initiation_filter(bad)


# ---------------------------------------------------------------- assembler


def test_pack_layout() -> None:
    prog = [stmt(bpf.BPF_LD | bpf.BPF_W | bpf.BPF_ABS, -0x1000 + 4), Insn(0x15, 1, 2, 0x86DD)]
    raw = pack(prog)
    assert len(raw) == 16
    assert struct.unpack("@HBBI", raw[:8]) == (0x20, 0, 0, 0xFFFFF004)
    assert struct.unpack("@HBBI", raw[8:]) == (0x15, 1, 2, 0x86DD)
    assert len(pack(FILTER)) == 8 * len(FILTER)
    with pytest.raises(ValueError):
        pack([])
    with pytest.raises(ValueError):
        pack([Insn(0x15, 256, 0, 0)])


def test_assemble_resolves_labels_and_refuses_bad_jumps() -> None:
    ret0 = stmt(bpf.BPF_RET | bpf.BPF_K, 0)
    prog = assemble([jump(bpf.BPF_JEQ, 1, "b", "a"), bpf.Label("a"), ret0, bpf.Label("b"), ret0])
    assert prog[0] == Insn(bpf.BPF_JMP | bpf.BPF_JEQ, 1, 0, 1)
    with pytest.raises(ValueError, match="undefined"):
        assemble([jump(bpf.BPF_JEQ, 1, "nowhere"), ret0])
    with pytest.raises(ValueError, match="forward"):
        assemble([bpf.Label("back"), ret0, jump(bpf.BPF_JEQ, 1, "back"), ret0])
    with pytest.raises(ValueError, match="forward"):
        assemble([jump(bpf.BPF_JEQ, 1, "far"), *[ret0] * 256, bpf.Label("far"), ret0])


# ---------------------------------------------------------------- parse_knock


def test_parse_ipv4() -> None:
    k = parse_knock(ipv4(), ifindex=3, received_at=12.5)
    assert k == Knock(
        source=Endpoint.parse(f"{V4_SRC}:40000"),
        destination=Endpoint.parse(f"{V4_DST}:{PORT}"),
        payload=INIT,
        ifindex=3,
        received_at=12.5,
    )


def test_parse_ipv4_with_options_and_trailing_bytes() -> None:
    k = parse_knock(ipv4(options=b"\x01" * 12, sport=1))
    assert k is not None and k.payload == INIT and k.source.port == 1
    # bytes after the datagram (IP total length larger, or cut by the filter's snap length)
    k = parse_knock(ipv4(INIT + b"junk", udp_length=156))
    assert k is not None and k.payload == INIT
    k = parse_knock(ipv4(INIT + b"junk", udp_length=156)[:176])
    assert k is not None and k.payload == INIT


def test_parse_ipv6() -> None:
    k = parse_knock(ipv6(sport=65535), ifindex=7, received_at=1.0)
    assert k is not None
    assert k.source == Endpoint.parse(f"[{V6_SRC}]:65535")
    assert str(k.destination) == f"[{V6_DST}]:{PORT}"
    assert k.payload == INIT and k.ifindex == 7


@pytest.mark.parametrize(
    "pkt",
    [
        ipv4(INIT[:147]),
        ipv4(INIT + b"\x00"),
        ipv4(b"\x02" + INIT[1:]),
        ipv4(frag=0x2000),
        ipv4(frag=0x0001),
        ipv4(udp(40000, PORT, INIT), proto=6),
        ipv4(sport=0),
        ipv4(dport=0),
        ipv4(total=100),  # IP says the datagram is shorter than UDP claims
        ipv4(udp_length=157),
        ipv4()[:175],
        bytes([0x44]) + ipv4()[1:],  # IHL 4
        ipv6(next_header=6),
        ipv6(ext=b"\x11\x00" + bytes(6), next_header=0),
        ipv6()[:195],
        b"\x60" + ipv4()[1:],  # v4 bytes with a v6 version nibble
        bytes([0x50]) + ipv4()[1:],
        b"",
        b"\x45",
    ],
)
def test_parse_rejects(pkt: bytes) -> None:
    assert parse_knock(pkt) is None


def test_parse_checks_port_when_given() -> None:
    assert parse_knock(ipv4(), port=PORT) is not None
    assert parse_knock(ipv4(), port=PORT + 1) is None
    assert parse_knock(ipv6(dport=9), port=9) is not None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=260))
def test_parse_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    assert parse_knock(data) is None or isinstance(parse_knock(data), Knock)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from([ipv4(), ipv4(options=b"\x01" * 8), ipv6()]),
    st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)), max_size=3),
    st.integers(0, 10),
)
def test_mutated_headers_parse_only_if_the_filter_accepts(
    base: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    """Header bytes changed at random: whatever the parser takes, the filter takes too, and the
    bytes the filter keeps still parse to the same knock (the parser never needs more)."""
    pkt = bytearray(base)
    for at, value in edits:
        pkt[at] = value
    data = bytes(pkt[: len(pkt) - cut])
    knock = parse_knock(data, port=PORT)
    if knock is not None:
        protocol = bpf.ETH_P_IP if knock.source.host.version == 4 else bpf.ETH_P_IPV6
        kept = captured(data, protocol=protocol)
        assert kept is not None
        assert parse_knock(kept, port=PORT) == knock


# ---------------------------------------------------------------- the device's answers

RESPONSE_MSG = b"\x02\x00\x00\x00" + (0x11223344).to_bytes(4, "little") + (
    0x55667788).to_bytes(4, "little") + os.urandom(80)  # fmt: skip
COOKIE_MSG = b"\x03\x00\x00\x00" + (0x55667788).to_bytes(4, "little") + os.urandom(56)
ANSWERS = answers_filter(PORT)


def answered(pkt: bytes, *, pkttype: int = OUTGOING) -> bytes | None:
    protocol = bpf.ETH_P_IPV6 if pkt[0] >> 4 == 6 else bpf.ETH_P_IP
    keep = run_bpf(ANSWERS, pkt, pkttype=pkttype, protocol=protocol)
    return pkt[:keep] if keep else None


def _out(build: Callable[..., bytes], msg: bytes, **kw: Any) -> bytes:
    """An answer the device sends: from the listen port to a client's."""
    v4 = build is ipv4
    return build(msg, sport=PORT, dport=40000, src=V4_DST if v4 else V6_DST,
                 dst=V4_SRC if v4 else V6_SRC, **kw)  # fmt: skip


@pytest.mark.parametrize("build, ip", [(ipv4, 20), (ipv6, 40)], ids=["v4", "v6"])
@pytest.mark.parametrize("msg, kind", [(RESPONSE_MSG, RESPONSE), (COOKIE_MSG, COOKIE_REPLY)],
                         ids=["response", "cookie"])  # fmt: skip
def test_answers_filter_keeps_the_head_of_outgoing_answers(
    build: Callable[..., bytes], ip: int, msg: bytes, kind: int
) -> None:
    pkt = _out(build, msg)
    got = answered(pkt)
    assert got == pkt[: ip + 8 + bpf.ANSWER_KEEP]
    assert parse_answer(got, PORT) == Answer(kind, 0x55667788)  # the initiation's sender index
    assert answered(pkt, pkttype=HOST) is None  # an answer *to* us is not the device's


def test_answers_filter_keeps_ipv4_with_options() -> None:
    pkt = _out(ipv4, RESPONSE_MSG, options=b"\x01" * 8)
    got = answered(pkt)
    assert got is not None and len(got) == 28 + 8 + bpf.ANSWER_KEEP
    assert parse_answer(got) == Answer(RESPONSE, 0x55667788)


@pytest.mark.parametrize(
    "pkt",
    [
        ipv4(RESPONSE_MSG, sport=PORT + 1, dport=40000),  # another port's answers
        ipv6(COOKIE_MSG, sport=PORT + 1, dport=40000),
        ipv4(RESPONSE_MSG, sport=40000, dport=PORT),  # sent *to* the port
        ipv4(RESPONSE_MSG[:91], sport=PORT, dport=40000),  # wrong sizes
        ipv4(COOKIE_MSG + b"\x00", sport=PORT, dport=40000),
        ipv4(b"\x03" + RESPONSE_MSG[1:], sport=PORT, dport=40000),  # size of one, type of other
        ipv6(b"\x02" + COOKIE_MSG[1:], sport=PORT, dport=40000),
        ipv4(b"\x01\x00\x00\x00" + bytes(144), sport=PORT, dport=40000),  # an initiation
        ipv4(b"\x04\x00\x00\x00" + bytes(28), sport=PORT, dport=40000),  # transport data
        ipv4(RESPONSE_MSG, sport=PORT, dport=40000, frag=0x2000),
        ipv4(RESPONSE_MSG, sport=PORT, dport=40000, proto=6),
        ipv4(RESPONSE_MSG, sport=PORT, dport=40000)[:50],  # truncated
        ipv6(COOKIE_MSG, sport=PORT, dport=40000)[:70],
    ],
    ids=["v4-port", "v6-port", "v4-inbound", "v4-91", "v4-cookie-65", "v4-type3-92",
         "v6-type2-64", "v4-initiation", "v4-data", "v4-mf", "v4-tcp", "v4-truncated",
         "v6-truncated"],
)  # fmt: skip
def test_answers_filter_rejects(pkt: bytes) -> None:
    assert answered(pkt) is None


@given(st.binary(max_size=120))
def test_parse_answer_is_total(data: bytes) -> None:
    a = parse_answer(data)
    assert a is None or a.kind in (RESPONSE, COOKIE_REPLY)


def test_answers_filter_port_is_checked() -> None:
    for bad in (0, 65536):
        with pytest.raises(ValueError):
            answers_filter(bad)
