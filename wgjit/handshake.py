"""Parse and authenticate WireGuard handshake initiations as the responder (and build them).

Sans-IO: bytes in, a verified (public key, timestamp, sender index) or a HandshakeError out. It
must not do I/O, keep per-peer state beyond a bounded DH cache, or decide who may connect.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wgjit.keys import PrivateKey, PublicKey

# --- Protocol constants -------------------------------------------------------------------------
# Message type and size: WireGuard whitepaper §5.4.2, kernel drivers/net/wireguard/messages.h
# (MESSAGE_HANDSHAKE_INITIATION, struct message_handshake_initiation).
MESSAGE_INITIATION = 1
INITIATION_SIZE = 148
# Noise protocol name, WireGuard identifier and MAC labels: whitepaper §5.4, kernel noise.c and
# cookie.c (handshake_name, identifier_name, mac1_key_label, cookie_key_label).
CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"  # cookie reply key label (wgjit.cookie)
# Field offsets of the initiation (struct message_handshake_initiation, all little-endian):
# type(1) reserved(3) sender_index(4) ephemeral(32) static(32+16) timestamp(12+16) mac1 mac2
OFF_SENDER_INDEX = 4
OFF_EPHEMERAL = 8
OFF_STATIC = 40
OFF_TIMESTAMP = 88
OFF_MAC1 = 116
OFF_MAC2 = 132
MAC_SIZE = 16  # keyed BLAKE2s-128 (whitepaper §5.4.4)
# TAI64N (whitepaper §5.4.2, https://cr.yp.to/libtai/tai64.html): 8-byte big-endian seconds
# offset by 2^62 + 10, then 4-byte big-endian nanoseconds. The kernel (noise.c) and wireguard-go
# (tai64n.go) clear the low 24 bits of the nanoseconds so timestamps leak less timing.
TIMESTAMP_SIZE = 12
TAI64_BASE = (1 << 62) + 10
TIMESTAMP_NANOS_MASK = ~0xFFFFFF

_HEADER = bytes((MESSAGE_INITIATION, 0, 0, 0))
_ZERO_NONCE = bytes(12)  # AEAD nonce: 4 zero bytes ‖ counter 0 as 64-bit little-endian
_ONE = b"\x01"
_TWO = b"\x02"
_TAI64N = struct.Struct(">QI")
_INDEX = struct.Struct("<I")


# --- Errors -------------------------------------------------------------------------------------
class HandshakeError(Exception):
    """A packet is not an authentic initiation for this gateway. `reason` is a stable label."""

    reason: ClassVar[str] = "handshake"


class Malformed(HandshakeError):
    """Wrong length, wrong message type or non-zero reserved bytes."""

    reason = "malformed"


class BadMac1(HandshakeError):
    """mac1 does not match: not addressed to this gateway's public key, or corrupted."""

    reason = "bad_mac1"


class BadStatic(HandshakeError):
    """The encrypted static key does not decrypt (or a key is a low-order point)."""

    reason = "bad_static"


class BadTimestamp(HandshakeError):
    """The timestamp does not decrypt: the sender lacks the claimed static private key."""

    reason = "forged"


# --- Primitives (HASH, MAC, HMAC, KDF as in whitepaper §5.4) ------------------------------------
def _hash(a: bytes, b: bytes) -> bytes:
    """HASH(a ‖ b) = BLAKE2s-256."""
    h = hashlib.blake2s(a)
    h.update(b)
    return h.digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256. RFC 2104 over BLAKE2s's 64-byte block, like the kernel's blake2s_hmac."""
    return hmac.digest(key, data, hashlib.blake2s)


def _kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """KDF2(key, data) -> (t1, t2): the next chaining key and an AEAD key."""
    t0 = _hmac(key, data)
    t1 = _hmac(t0, _ONE)
    return t1, _hmac(t0, t1 + _TWO)


def _mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, data) = keyed BLAKE2s with a 16-byte digest."""
    return hashlib.blake2s(data, key=key, digest_size=MAC_SIZE).digest()


# Gateway-independent start of the handshake: Ci = HASH(construction), HASH(Ci ‖ identifier).
_CK0 = hashlib.blake2s(CONSTRUCTION).digest()
_H_ID = _hash(_CK0, IDENTIFIER)


def _initial_hash(responder: PublicKey) -> bytes:
    return _hash(_H_ID, responder.raw)


def _mac1_key(responder: PublicKey) -> bytes:
    return _hash(LABEL_MAC1, responder.raw)


# --- Values ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, order=True)
class Timestamp:
    """A TAI64N timestamp as carried in an initiation; orders like the numbers it encodes."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != TIMESTAMP_SIZE:
            raise ValueError(f"a TAI64N timestamp is {TIMESTAMP_SIZE} bytes")

    @classmethod
    def trusted(cls, raw: bytes) -> Timestamp:
        """A timestamp from 12 bytes known to be right (a decrypted AEAD plaintext of that
        size): no check, for the hot path."""
        self = object.__new__(cls)
        object.__setattr__(self, "raw", raw)
        return self

    @classmethod
    def _from_parts(cls, seconds: int, nanos: int) -> Timestamp:
        tai = TAI64_BASE + seconds
        if not 0 <= tai < 1 << 64:
            raise ValueError("time out of TAI64 range")
        return cls(_TAI64N.pack(tai, min(nanos, 999_999_999) & TIMESTAMP_NANOS_MASK))

    @classmethod
    def from_unix(cls, t: float) -> Timestamp:
        """The timestamp a WireGuard client would send at Unix time `t` (~16.8 ms granularity)."""
        if not math.isfinite(t):
            raise ValueError("time must be finite")
        seconds = math.floor(t)
        return cls._from_parts(seconds, int((t - seconds) * 1e9))

    @classmethod
    def now(cls) -> Timestamp:
        seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
        return cls._from_parts(seconds, nanos)

    def to_unix(self) -> float:
        tai: int
        nanos: int
        tai, nanos = _TAI64N.unpack(self.raw)
        return (tai - TAI64_BASE) + nanos / 1e9


@dataclass(frozen=True, slots=True)
class Initiation:
    """The fields of a handshake initiation, split but not checked beyond type and size."""

    sender_index: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes
    mac2: bytes


@dataclass(frozen=True, slots=True)
class Verified:
    """An authenticated initiation: the sender holds the private key of `public_key`."""

    public_key: PublicKey
    timestamp: Timestamp
    sender_index: int


def _check_header(packet: bytes) -> bytes:
    """The packet as bytes if its size, type and reserved bytes are right; else Malformed."""
    if type(packet) is not bytes:
        if not isinstance(packet, bytearray | memoryview):
            raise Malformed("not a byte string")
        packet = bytes(packet)
    if len(packet) != INITIATION_SIZE:
        raise Malformed(f"initiation is {INITIATION_SIZE} bytes, got {len(packet)}")
    if packet[:4] != _HEADER:
        if packet[0] != MESSAGE_INITIATION:
            raise Malformed(f"message type {packet[0]}, expected {MESSAGE_INITIATION}")
        raise Malformed("reserved bytes are not zero")
    return packet


def parse_initiation(packet: bytes) -> Initiation:
    """Split a 148-byte initiation into its fields. Raises Malformed."""
    return _split(_check_header(packet))


def _split(packet: bytes) -> Initiation:
    return Initiation(
        sender_index=int.from_bytes(packet[OFF_SENDER_INDEX:OFF_EPHEMERAL], "little"),
        ephemeral=packet[OFF_EPHEMERAL:OFF_STATIC],
        encrypted_static=packet[OFF_STATIC:OFF_TIMESTAMP],
        encrypted_timestamp=packet[OFF_TIMESTAMP:OFF_MAC1],
        mac1=packet[OFF_MAC1:OFF_MAC2],
        mac2=packet[OFF_MAC2:INITIATION_SIZE],
    )


# --- Responder ----------------------------------------------------------------------------------
# The responder's hot path binds its primitives to module names once: a verification is ~10
# calls into C, and Python's attribute look-ups and wrapper objects were a third of its non-DH
# cost. HMAC is the stdlib's (hmac.digest over hashlib.blake2s: its inline RFC 2104 path, faster
# here than OpenSSL's HMAC object for 32-byte messages); nothing below re-implements a primitive.
_blake2s = hashlib.blake2s
_hmac_digest = hmac.digest
_compare = hmac.compare_digest
_x25519_public = X25519PublicKey.from_public_bytes
_Aead = ChaCha20Poly1305


class Opened:
    """An initiation whose static key is decrypted but not yet authenticated.

    A plain slotted class, not a dataclass: one is made per initiation on the hot path.
    `chaining_key` and `hash` are the handshake state after the static key (C and H of
    whitepaper §5.4.2), which authenticate() continues from."""

    __slots__ = ("chaining_key", "hash", "packet", "public_key")

    def __init__(self, public_key: PublicKey, packet: bytes, chaining_key: bytes, hash: bytes
                 ) -> None:  # fmt: skip
        self.public_key = public_key  # claimed, not proven
        self.packet = packet
        self.chaining_key = chaining_key
        self.hash = hash

    @property
    def message(self) -> Initiation:
        return _split(self.packet)

    @property
    def sender_index(self) -> int:
        return int.from_bytes(self.packet[OFF_SENDER_INDEX:OFF_EPHEMERAL], "little")

    def __repr__(self) -> str:
        return f"Opened({self.public_key!r}, index={self.sender_index})"


class Responder:
    """Authenticates initiations addressed to one gateway key (whitepaper §5.4.2, responder side).

    Caches DH(gateway, initiator static) per initiator key in a bounded LRU: like the kernel's
    precomputed static-static, it never changes for a peer. Only keys whose timestamp decrypted
    are cached, so forged initiations cannot evict real peers. Not thread-safe for concurrent
    verify() calls beyond what the GIL gives (races can only cost a cache entry, never a result).

    Per gateway it also keeps what does not depend on the packet: the mac1 key's BLAKE2s state,
    H after the responder's public key, and the HMAC state keyed with the constant first
    chaining key (each check copies a state instead of re-keying).
    """

    __slots__ = ("_cache", "_cache_size", "_ck0", "_h0", "_mac1", "_private", "_public", "_x")

    def __init__(self, private_key: PrivateKey, static_cache_size: int = 65536) -> None:
        if static_cache_size < 0:
            raise ValueError("static_cache_size must be >= 0")
        self._private = private_key
        self._x = private_key.x25519()
        self._public = private_key.public_key()
        self._h0 = _blake2s(_initial_hash(self._public))
        self._ck0 = hmac.new(_CK0, digestmod=_blake2s)
        self._mac1 = _blake2s(key=_mac1_key(self._public), digest_size=MAC_SIZE)
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_size = static_cache_size

    @property
    def public_key(self) -> PublicKey:
        return self._public

    def _mac1_ok(self, packet: bytes) -> bool:
        h = self._mac1.copy()
        h.update(packet[:OFF_MAC1])
        return _compare(h.digest(), packet[OFF_MAC1:OFF_MAC2])

    def check_mac1(self, packet: bytes) -> None:
        """Cheap pre-filter (no DH): raises Malformed or BadMac1 unless mac1 is for this key."""
        if not self.mac1_ok(packet):
            raise BadMac1("mac1 does not match this gateway's key")

    def mac1_ok(self, packet: bytes) -> bool:
        """check_mac1() as a bool: a flood of garbage comes here, and raising is its dearest
        part. Still raises Malformed for what is not an initiation at all."""
        return self._mac1_ok(_check_header(packet))

    def verify(self, packet: bytes) -> Verified:
        """Authenticate an initiation; at most two X25519 operations, one for a cached peer."""
        packet = _check_header(packet)
        if not self._mac1_ok(packet):
            raise BadMac1("mac1 does not match this gateway's key")
        static, ck, h = self._open(packet)
        return self._authenticate(static, packet, ck, h)

    def open_static(self, packet: bytes, *, mac1_checked: bool = False) -> Opened:
        """First half of verify(): mac1 and one X25519 reveal the key the sender *claims*.

        Lets the caller drop keys it does not know before paying the second X25519; the
        claim proves nothing until authenticate() succeeds. `mac1_checked`: the caller has
        just called check_mac1() on these very bytes."""
        if not mac1_checked:
            packet = _check_header(packet)
            if not self._mac1_ok(packet):
                raise BadMac1("mac1 does not match this gateway's key")
        elif type(packet) is not bytes:
            packet = bytes(packet)
        static, ck, h = self._open(packet)
        return Opened(PublicKey.trusted(static), packet, ck, h)

    def open_raw(self, packet: bytes) -> tuple[bytes, bytes, bytes]:
        """open_static() for a packet whose header and mac1 were checked, without objects:
        (claimed static key, chaining key, hash) as bytes. For worker processes."""
        return self._open(packet)

    def _open(self, packet: bytes) -> tuple[bytes, bytes, bytes]:
        ephemeral = packet[OFF_EPHEMERAL:OFF_STATIC]
        # C = KDF1(C, Epub_i) (the HMAC keyed with the constant first C is precomputed);
        # H = HASH(H ‖ Epub_i)
        mac = self._ck0.copy()
        mac.update(ephemeral)
        ck = _hmac_digest(mac.digest(), _ONE, _blake2s)
        hs = self._h0.copy()
        hs.update(ephemeral)
        h = hs.digest()
        # C, k = KDF2(C, DH(Spriv_r, Epub_i)); Spub_i = AEAD-decrypt(k, 0, static, H)
        try:
            es = self._x.exchange(_x25519_public(ephemeral))
        except ValueError:  # an all-zero result: a low-order point
            raise BadStatic("low-order ephemeral key") from None
        t0 = _hmac_digest(ck, es, _blake2s)
        ck = _hmac_digest(t0, _ONE, _blake2s)
        encrypted = packet[OFF_STATIC:OFF_TIMESTAMP]
        try:
            static = _Aead(_hmac_digest(t0, ck + _TWO, _blake2s)).decrypt(_ZERO_NONCE, encrypted, h)
        except InvalidTag:
            raise BadStatic("encrypted static key does not decrypt") from None
        return static, ck, _blake2s(h + encrypted).digest()

    def authenticate(self, opened: Opened) -> Verified:
        """Second half of verify(): the static·static DH (cached per peer) and the timestamp.
        Success proves the sender holds the private key of `opened.public_key`."""
        return self._authenticate(
            opened.public_key.raw, opened.packet, opened.chaining_key, opened.hash
        )

    def cached(self, static: bytes) -> bool:
        """Whether authenticating `static` needs no X25519 (its static DH is cached)."""
        return static in self._cache

    def authenticate_raw(self, static: bytes, packet: bytes, ck: bytes, h: bytes
                         ) -> tuple[bytes, int]:  # fmt: skip
        """authenticate() without objects: (timestamp, sender index). For worker processes."""
        stamp = self._decrypt_timestamp(static, packet, ck, h)
        return stamp, _INDEX.unpack_from(packet, OFF_SENDER_INDEX)[0]

    def _authenticate(self, static: bytes, packet: bytes, ck: bytes, h: bytes) -> Verified:
        stamp = self._decrypt_timestamp(static, packet, ck, h)
        return Verified(
            PublicKey.trusted(static),
            Timestamp.trusted(stamp),
            _INDEX.unpack_from(packet, OFF_SENDER_INDEX)[0],
        )

    def _decrypt_timestamp(self, static: bytes, packet: bytes, ck: bytes, h: bytes) -> bytes:
        # C, k = KDF2(C, DH(Spriv_r, Spub_i)); timestamp = AEAD-decrypt(k, 0, timestamp, H)
        cache = self._cache
        ss = cache.get(static)
        cached = ss is not None
        if ss is None:
            try:
                ss = self._x.exchange(_x25519_public(static))
            except ValueError:
                raise BadStatic("low-order static key") from None
        t0 = _hmac_digest(ck, ss, _blake2s)
        key = _hmac_digest(t0, _hmac_digest(t0, _ONE, _blake2s) + _TWO, _blake2s)
        try:
            stamp = _Aead(key).decrypt(_ZERO_NONCE, packet[OFF_TIMESTAMP:OFF_MAC1], h)
        except InvalidTag:
            raise BadTimestamp("timestamp does not decrypt: sender lacks the static key") from None
        try:
            if cached:
                cache.move_to_end(static)
            elif self._cache_size:
                cache[static] = ss
                if len(cache) > self._cache_size:
                    cache.popitem(last=False)
        except KeyError:  # another thread evicted it meanwhile; the cache is only an optimisation
            pass
        return stamp


# --- Initiator (tests, load generation) ----------------------------------------------------------
def build_initiation(
    initiator: PrivateKey,
    responder: PublicKey,
    *,
    timestamp: Timestamp | None = None,
    sender_index: int | None = None,
    ephemeral: PrivateKey | None = None,
) -> bytes:
    """A 148-byte initiation as a WireGuard client sends it (mac2 zero: no cookie).

    Defaults: the current time, a random sender index and a fresh ephemeral key.
    """
    if sender_index is None:
        sender_index = int.from_bytes(os.urandom(4), "little")
    elif not 0 <= sender_index < 1 << 32:
        raise ValueError("sender_index must fit in 32 bits")
    if ephemeral is None:
        ephemeral = PrivateKey.generate()
    if timestamp is None:
        timestamp = Timestamp.now()
    epub = ephemeral.public_key().raw

    ck = _hmac(_hmac(_CK0, epub), _ONE)
    h = _hash(_initial_hash(responder), epub)
    ck, key = _kdf2(ck, ephemeral.exchange(responder))
    encrypted_static = ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, initiator.public_key().raw, h)
    h = _hash(h, encrypted_static)
    _, key = _kdf2(ck, initiator.exchange(responder))
    encrypted_timestamp = ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, timestamp.raw, h)

    body = b"".join(
        (_HEADER, _INDEX.pack(sender_index), epub, encrypted_static, encrypted_timestamp)
    )
    return body + _mac(_mac1_key(responder), body) + bytes(MAC_SIZE)
