"""wgjit.handshake: round trips, every rejection reason, real wireguard-go initiations, fuzzing.

The forged-initiation test needs an initiator that lies about its static key, so this file has
an independent initiator (tests/wgref.py) written from the whitepaper with hashlib/hmac directly;
it doubles as an independent check of build_initiation.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.wgref import mac1 as _mac1
from tests.wgref import reference_initiation
from tests.wgref import with_mac1 as _with_mac1
from wgjit.handshake import (
    INITIATION_SIZE,
    BadMac1,
    BadStatic,
    BadTimestamp,
    HandshakeError,
    Initiation,
    Malformed,
    Responder,
    Timestamp,
    Verified,
    build_initiation,
    parse_initiation,
)
from wgjit.keys import PrivateKey, PublicKey

FIXTURE = Path(__file__).parent / "fixtures" / "wireguard_go_initiations.json"
GRANULARITY = 2**24 / 1e9  # timestamps keep nanoseconds in steps of 2^24 ns (~16.8 ms)

# Fixed keys so failures reproduce (X25519 accepts any 32 bytes as a private key).
GATEWAY = PrivateKey.from_hex("a8" + "11" * 30 + "47")
CLIENT = PrivateKey.from_hex("b0" + "22" * 30 + "58")
ATTACKER = PrivateKey.from_hex("c8" + "33" * 30 + "69")
EPHEMERAL = PrivateKey.from_hex("d0" + "44" * 30 + "7a")
# A point of order 8 on Curve25519: X25519 with it yields all zeros.
LOW_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


def _initiation(
    claimed_static: PublicKey,
    ss_key: PrivateKey,
    responder: PublicKey,
    *,
    ephemeral: PrivateKey = EPHEMERAL,
    timestamp: bytes = b"\x40" + bytes(11),
    index: int = 7,
) -> bytes:
    return reference_initiation(
        claimed_static, ss_key, responder, ephemeral=ephemeral, timestamp=timestamp, index=index
    )


@pytest.fixture(scope="module")
def responder() -> Responder:
    return Responder(GATEWAY)


def _flip(packet: bytes, i: int, bit: int = 0x01) -> bytes:
    return packet[:i] + bytes([packet[i] ^ bit]) + packet[i + 1 :]


def _tampered(i: int) -> bytes:
    """A genuine initiation with byte i changed and mac1 recomputed."""
    packet = build_initiation(CLIENT, GATEWAY.public_key())
    return _with_mac1(_flip(packet, i), GATEWAY.public_key())


# --- round trip -------------------------------------------------------------------------------
def test_round_trip(responder: Responder) -> None:
    ts = Timestamp.from_unix(1_700_000_000.25)
    packet = build_initiation(CLIENT, GATEWAY.public_key(), timestamp=ts, sender_index=0xDEADBEEF)
    assert len(packet) == INITIATION_SIZE
    assert packet[132:] == bytes(16)  # no cookie: mac2 is zero
    assert responder.public_key == GATEWAY.public_key()
    assert responder.verify(packet) == Verified(CLIENT.public_key(), ts, 0xDEADBEEF)
    responder.check_mac1(packet)  # no exception


def test_build_initiation_matches_independent_initiator() -> None:
    ts = Timestamp.from_unix(1_700_000_000.5)
    ours = build_initiation(
        CLIENT, GATEWAY.public_key(), timestamp=ts, sender_index=7, ephemeral=EPHEMERAL
    )
    ref = _initiation(CLIENT.public_key(), CLIENT, GATEWAY.public_key(), timestamp=ts.raw)
    assert ours == ref


def test_defaults_are_fresh(responder: Responder) -> None:
    a = build_initiation(CLIENT, GATEWAY.public_key())
    b = build_initiation(CLIENT, GATEWAY.public_key())
    assert a[4:40] != b[4:40]  # new sender index and ephemeral key each time
    va, vb = responder.verify(a), responder.verify(b)
    assert va.timestamp <= vb.timestamp
    assert abs(va.timestamp.to_unix() - Timestamp.now().to_unix()) < 5


def test_accepts_bytearray_and_memoryview(responder: Responder) -> None:
    packet = build_initiation(CLIENT, GATEWAY.public_key())
    # typed as bytes, but buffers straight from a socket work too
    for buf in (bytearray(packet), memoryview(packet)):
        assert responder.verify(buf).public_key == CLIENT.public_key()  # type: ignore[arg-type]


def test_static_cache_is_bounded_lru() -> None:
    r = Responder(GATEWAY, static_cache_size=2)
    keys = [PrivateKey.generate() for _ in range(3)]
    for k in keys:
        r.verify(build_initiation(k, GATEWAY.public_key()))
    # the cache is an implementation detail; peek only to check the bound and LRU order
    cache = r._cache
    assert list(cache) == [keys[1].public_key().raw, keys[2].public_key().raw]
    r.verify(build_initiation(keys[1], GATEWAY.public_key()))  # hit: becomes most recent
    assert list(cache) == [keys[2].public_key().raw, keys[1].public_key().raw]
    # cached and uncached paths agree
    packet = build_initiation(keys[1], GATEWAY.public_key())
    assert r.verify(packet) == Responder(GATEWAY, static_cache_size=0).verify(packet)
    with pytest.raises(ValueError):
        Responder(GATEWAY, static_cache_size=-1)


# --- rejections -------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(132))
def test_any_flipped_bit_before_mac2_is_rejected_cheaply(responder: Responder, i: int) -> None:
    packet = _flip(build_initiation(CLIENT, GATEWAY.public_key()), i, 0x80)
    expected = Malformed if i < 4 else BadMac1
    with pytest.raises(expected):
        responder.check_mac1(packet)
    with pytest.raises(expected):
        responder.verify(packet)


def test_mac2_is_not_checked(responder: Responder) -> None:
    packet = build_initiation(CLIENT, GATEWAY.public_key())
    assert responder.verify(packet[:132] + b"\xff" * 16).public_key == CLIENT.public_key()


def test_other_gateway_key_fails_mac1() -> None:
    packet = build_initiation(CLIENT, GATEWAY.public_key())
    with pytest.raises(BadMac1) as e:
        Responder(ATTACKER).verify(packet)
    assert e.value.reason == "bad_mac1"


@pytest.mark.parametrize("i", [40, 60, 87])
def test_tampered_static_with_valid_mac1(responder: Responder, i: int) -> None:
    packet = _tampered(i)
    responder.check_mac1(packet)
    with pytest.raises(BadStatic) as e:
        responder.verify(packet)
    assert e.value.reason == "bad_static"


def test_tampered_ephemeral_with_valid_mac1(responder: Responder) -> None:
    packet = _tampered(9)
    with pytest.raises(BadStatic):
        responder.verify(packet)


def test_low_order_ephemeral(responder: Responder) -> None:
    packet = build_initiation(CLIENT, GATEWAY.public_key())
    packet = _with_mac1(packet[:8] + LOW_ORDER + packet[40:], GATEWAY.public_key())
    with pytest.raises(BadStatic, match="low-order"):
        responder.verify(packet)


def test_low_order_static(responder: Responder) -> None:
    # Built honestly except that the "static key" is a low-order point nobody needs to hold.
    packet = _initiation(PublicKey(LOW_ORDER), CLIENT, GATEWAY.public_key())
    with pytest.raises(BadStatic, match="low-order"):
        responder.verify(packet)


@pytest.mark.parametrize("i", [88, 100, 115])
def test_tampered_timestamp_with_valid_mac1(responder: Responder, i: int) -> None:
    packet = _tampered(i)
    with pytest.raises(BadTimestamp):
        responder.verify(packet)


def test_forged_static_key_is_caught_by_timestamp() -> None:
    """An attacker can encrypt the victim's public key, but not do the victim's static DH."""
    r = Responder(GATEWAY)
    r.verify(build_initiation(CLIENT, GATEWAY.public_key()))  # victim's ss DH now cached
    forged = _initiation(CLIENT.public_key(), ATTACKER, GATEWAY.public_key())
    r.check_mac1(forged)  # mac1 is public knowledge: passes
    with pytest.raises(BadTimestamp) as e:
        r.verify(forged)
    assert e.value.reason == "forged"
    # uncached path as well, and the forgery must not enter the cache
    fresh = Responder(GATEWAY)
    with pytest.raises(BadTimestamp):
        fresh.verify(forged)
    assert len(fresh._cache) == 0


def test_honest_reference_initiation_verifies(responder: Responder) -> None:
    packet = _initiation(CLIENT.public_key(), CLIENT, GATEWAY.public_key(), index=1234)
    v = responder.verify(packet)
    assert (v.public_key, v.sender_index, v.timestamp.raw) == (
        CLIENT.public_key(),
        1234,
        b"\x40" + bytes(11),
    )


@pytest.mark.parametrize(
    ("packet", "match"),
    [
        (b"", "148 bytes"),
        (bytes(147), "148 bytes"),
        (b"\x01\x00\x00\x00" + bytes(145), "148 bytes"),
        (b"\x02\x00\x00\x00" + bytes(144), "type 2"),
        (b"\x04\x00\x00\x00" + bytes(144), "type 4"),
        (b"\x01\x00\x01\x00" + bytes(144), "reserved"),
        (b"\x01\x00\x00\x80" + bytes(144), "reserved"),
    ],
)
def test_malformed(responder: Responder, packet: bytes, match: str) -> None:
    for f in (parse_initiation, responder.check_mac1, responder.verify):
        with pytest.raises(Malformed, match=match) as e:
            f(packet)
        assert e.value.reason == "malformed"


def test_not_bytes_is_malformed(responder: Responder) -> None:
    for junk in ("x" * 148, 148, None):
        with pytest.raises(Malformed):
            responder.verify(junk)  # type: ignore[arg-type]


def test_reasons_are_stable() -> None:
    assert [c.reason for c in (Malformed, BadMac1, BadStatic, BadTimestamp)] == [
        "malformed",
        "bad_mac1",
        "bad_static",
        "forged",
    ]
    assert all(issubclass(c, HandshakeError) for c in (Malformed, BadMac1, BadStatic, BadTimestamp))


def test_parse_initiation_fields() -> None:
    packet = build_initiation(
        CLIENT, GATEWAY.public_key(), sender_index=0x01020304, ephemeral=EPHEMERAL
    )
    msg = parse_initiation(packet)
    assert msg == Initiation(
        sender_index=0x01020304,
        ephemeral=EPHEMERAL.public_key().raw,
        encrypted_static=packet[40:88],
        encrypted_timestamp=packet[88:116],
        mac1=packet[116:132],
        mac2=bytes(16),
    )
    assert packet[4:8] == b"\x04\x03\x02\x01"  # little-endian on the wire
    with pytest.raises(ValueError):
        build_initiation(CLIENT, GATEWAY.public_key(), sender_index=1 << 32)


# --- timestamps -------------------------------------------------------------------------------
def test_timestamp_encoding() -> None:
    ts = Timestamp.from_unix(0.0)
    assert ts.raw == bytes.fromhex("400000000000000a") + bytes(4)  # TAI64 label 2^62 + 10
    assert Timestamp.from_unix(1.999999999).raw[8:] == (0x3B000000).to_bytes(4, "big")
    for t in (0.0, 1_700_000_000.123, 1_795_505_190.987654, -12.5):
        back = Timestamp.from_unix(t).to_unix()
        assert t - GRANULARITY - 1e-6 < back <= t + 1e-6


def test_timestamp_clears_low_24_bits_of_nanoseconds() -> None:
    for t in (1_700_000_000.0 + i / 97 for i in range(97)):
        assert int.from_bytes(Timestamp.from_unix(t).raw[8:], "big") & 0xFFFFFF == 0
    assert int.from_bytes(Timestamp.now().raw[8:], "big") & 0xFFFFFF == 0


def test_timestamp_ordering() -> None:
    a = Timestamp.from_unix(1_700_000_000.0)
    b = Timestamp.from_unix(1_700_000_000.010)  # same 16.8 ms slot
    c = Timestamp.from_unix(1_700_000_000.020)
    d = Timestamp.from_unix(1_700_000_001.0)
    assert a == b < c < d
    assert sorted([d, c, a]) == [a, c, d]
    assert max(a, d) is d


def test_timestamp_validation() -> None:
    for bad in (b"", bytes(11), bytes(13)):
        with pytest.raises(ValueError):
            Timestamp(bad)
    for t in (float("nan"), float("inf"), -float("inf"), 1e30):
        with pytest.raises(ValueError):
            Timestamp.from_unix(t)


# --- real initiations from wireguard-go -------------------------------------------------------
def test_wireguard_go_initiations() -> None:
    fx = json.loads(FIXTURE.read_text())
    r = Responder(PrivateKey.from_b64(fx["gateway_private_key"]))
    assert r.public_key == PublicKey.from_b64(fx["gateway_public_key"])
    client = PublicKey.from_b64(fx["client_public_key"])
    assert PrivateKey.from_b64(fx["client_private_key"]).public_key() == client
    assert len(fx["initiations"]) >= 2
    previous: Verified | None = None
    for item in fx["initiations"]:
        packet = bytes.fromhex(item["hex"])
        r.check_mac1(packet)
        v = r.verify(packet)
        assert v.public_key == client
        assert abs(v.timestamp.to_unix() - item["captured_at"]) < 1.0
        assert int.from_bytes(v.timestamp.raw[8:], "big") & 0xFFFFFF == 0
        if previous is not None:
            assert v.timestamp > previous.timestamp  # retries are ~5 s apart
            assert v.sender_index != previous.sender_index  # each retry is a new handshake
        previous = v


def test_wireguard_go_initiation_forged_by_swapping_fields() -> None:
    """Splicing fields of two genuine initiations must not produce a valid one."""
    fx = json.loads(FIXTURE.read_text())
    gw = PrivateKey.from_b64(fx["gateway_private_key"])
    a, b = (bytes.fromhex(i["hex"]) for i in fx["initiations"][:2])
    spliced = _with_mac1(a[:88] + b[88:], gw.public_key())
    with pytest.raises(BadTimestamp):
        Responder(gw).verify(spliced)


# --- fuzzing ----------------------------------------------------------------------------------
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_R = Responder(GATEWAY)


def _only_handshake_errors(packet: bytes) -> None:
    for f in (parse_initiation, _R.check_mac1, _R.verify):
        with contextlib.suppress(HandshakeError):
            f(packet)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_any_bytes(packet: bytes) -> None:
    _only_handshake_errors(packet)


@FUZZ
@given(st.binary(min_size=144, max_size=144))
def test_fuzz_right_header(body: bytes) -> None:
    packet = b"\x01\x00\x00\x00" + body
    _only_handshake_errors(packet)
    with pytest.raises(BadMac1):  # a 2^-128 chance of a false failure
        _R.check_mac1(packet)


@FUZZ
@given(st.binary(min_size=112, max_size=112), st.binary(min_size=16, max_size=16))
def test_fuzz_valid_mac1_random_body(body: bytes, mac2: bytes) -> None:
    head = b"\x01\x00\x00\x00" + body
    packet = head + _mac1(GATEWAY.public_key(), head) + mac2
    _R.check_mac1(packet)
    with pytest.raises((BadStatic, BadTimestamp)):  # random ciphertext never authenticates
        _R.verify(packet)


@FUZZ
@given(st.integers(min_value=0, max_value=131), st.integers(min_value=1, max_value=255))
def test_fuzz_corrupted_genuine_initiation(i: int, xor: int) -> None:
    packet = build_initiation(CLIENT, GATEWAY.public_key(), ephemeral=EPHEMERAL)
    bad = _with_mac1(_flip(packet, i, xor), GATEWAY.public_key())
    if i < 4:
        with pytest.raises(Malformed):
            _R.verify(bad)
    elif i < 8:  # the sender index is covered by mac1 only, not by the AEAD
        v = _R.verify(bad)
        assert v.public_key == CLIENT.public_key()
        assert (
            v.sender_index
            == int.from_bytes(bad[4:8], "little")
            != int.from_bytes(packet[4:8], "little")
        )
    elif i < 116:
        with pytest.raises(HandshakeError):
            _R.verify(bad)
    else:  # only mac1 itself was corrupted, and then recomputed
        assert _R.verify(bad).public_key == CLIENT.public_key()
