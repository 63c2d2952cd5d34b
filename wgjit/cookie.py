"""WireGuard's answer to load, responder side: mac2 checks and cookie replies (sans-IO).

Whitepaper §5.4.7, kernel drivers/net/wireguard/cookie.c, wireguard-go device/cookie.go. Under
load a responder answers an initiation that lacks a valid mac2 with a cookie reply instead of
doing any Diffie-Hellman: the cookie is a MAC of the sender's address under a secret that
changes every two minutes, sent encrypted (XChaCha20-Poly1305, key from the responder's public
key, the initiation's mac1 as associated data). The client puts MAC(cookie, message) into
mac2 of its next initiation, which proves it can receive at the address it sends from: a flood
from spoofed sources then costs one BLAKE2s per packet, never an X25519.

No I/O, no clock of its own (`now` is passed in), no decisions about when load begins.
XChaCha20-Poly1305 comes from libsodium (PyNaCl); BLAKE2s from hashlib.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)

from wgjit.addr import Endpoint
from wgjit.handshake import LABEL_COOKIE, MAC_SIZE, OFF_MAC1, OFF_MAC2, OFF_SENDER_INDEX
from wgjit.keys import PublicKey

# messages.h: MESSAGE_HANDSHAKE_COOKIE, COOKIE_SECRET_MAX_AGE, COOKIE_NONCE_LEN, COOKIE_LEN
MESSAGE_COOKIE_REPLY = 3
COOKIE_SECRET_MAX_AGE = 120.0
COOKIE_NONCE_SIZE = 24
COOKIE_SIZE = 16
_AEAD_TAG = 16
# type(1) reserved(3) receiver_index(4) nonce(24) encrypted_cookie(16 + 16)
COOKIE_REPLY_SIZE = 8 + COOKIE_NONCE_SIZE + COOKIE_SIZE + _AEAD_TAG


def _address_bytes(source: Endpoint) -> bytes:
    """What a cookie is bound to: the sender's IP and port (like the kernel: network order)."""
    return source.host.packed + source.port.to_bytes(2, "big")


def cookie_key(responder: PublicKey) -> bytes:
    """The key cookie replies are encrypted with: HASH(LABEL_COOKIE ‖ Spub_r)."""
    return hashlib.blake2s(LABEL_COOKIE + responder.raw).digest()


class CookieChecker:
    """Checks mac2 and makes cookie replies for one responder key."""

    __slots__ = ("_key", "_random", "_secret", "_secret_at")

    def __init__(self, responder: PublicKey, random: Callable[[int], bytes] = os.urandom) -> None:
        self._key = cookie_key(responder)
        self._random = random
        self._secret = b""
        self._secret_at = float("-inf")

    def _cookie(self, source: Endpoint, now: float) -> bytes:
        if now - self._secret_at >= COOKIE_SECRET_MAX_AGE:
            self._secret = self._random(32)
            self._secret_at = now
        h = hashlib.blake2s(key=self._secret, digest_size=COOKIE_SIZE)
        h.update(_address_bytes(source))
        return h.digest()

    def mac2_ok(self, packet: bytes, source: Endpoint, now: float) -> bool:
        """Whether the initiation's mac2 is the one a cookie we gave `source` (within the
        last two minutes) makes. A zero or wrong mac2 is simply False."""
        if len(packet) < OFF_MAC2 + MAC_SIZE:
            return False
        h = hashlib.blake2s(key=self._cookie(source, now), digest_size=MAC_SIZE)
        h.update(packet[:OFF_MAC2])
        return hmac.compare_digest(h.digest(), packet[OFF_MAC2 : OFF_MAC2 + MAC_SIZE])

    def reply(self, packet: bytes, source: Endpoint, now: float) -> bytes:
        """The cookie reply to an initiation (mac1 already checked) from `source`."""
        nonce = self._random(COOKIE_NONCE_SIZE)
        sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(
            self._cookie(source, now), packet[OFF_MAC1:OFF_MAC2], nonce, self._key
        )
        receiver = packet[OFF_SENDER_INDEX : OFF_SENDER_INDEX + 4]
        return bytes((MESSAGE_COOKIE_REPLY, 0, 0, 0)) + receiver + nonce + sealed


def open_cookie_reply(reply: bytes, responder: PublicKey, mac1: bytes) -> bytes:
    """The initiator's side (tests, load generation): the cookie in a reply to an initiation
    whose mac1 was `mac1`. Raises ValueError if it is not one."""
    if len(reply) != COOKIE_REPLY_SIZE or reply[0] != MESSAGE_COOKIE_REPLY:
        raise ValueError("not a cookie reply")
    nonce = reply[8 : 8 + COOKIE_NONCE_SIZE]
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(
            reply[8 + COOKIE_NONCE_SIZE :], mac1, nonce, cookie_key(responder)
        )
    except Exception as e:  # nacl.exceptions.CryptoError
        raise ValueError(f"cookie reply does not decrypt: {e}") from None


def add_mac2(packet: bytes, cookie: bytes) -> bytes:
    """An initiation with mac2 set from `cookie` (what a client does after a cookie reply)."""
    h = hashlib.blake2s(key=cookie, digest_size=MAC_SIZE)
    h.update(packet[:OFF_MAC2])
    return packet[:OFF_MAC2] + h.digest()
