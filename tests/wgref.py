"""An independent WireGuard initiator for tests, written from the whitepaper (section 5.4.2)
with hashlib/hmac directly. It can lie about its static key, which build_initiation cannot:
the forged-initiation tests need that.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wgjit.keys import PrivateKey, PublicKey


def _h(*parts: bytes) -> bytes:
    return hashlib.blake2s(b"".join(parts)).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def _kdf(key: bytes, data: bytes, n: int) -> list[bytes]:
    t0, out, prev = _hmac(key, data), [], b""
    for i in range(1, n + 1):
        prev = _hmac(t0, prev + bytes([i]))
        out.append(prev)
    return out


def mac1(responder: PublicKey, body: bytes) -> bytes:
    key = _h(b"mac1----", responder.raw)
    return hashlib.blake2s(body, key=key, digest_size=16).digest()


def with_mac1(packet: bytes, responder: PublicKey) -> bytes:
    """Recompute mac1 after tampering, so the packet gets past the cheap check."""
    return packet[:116] + mac1(responder, packet[:116]) + packet[132:]


def reference_initiation(
    claimed_static: PublicKey,
    ss_key: PrivateKey,
    responder: PublicKey,
    *,
    ephemeral: PrivateKey | None = None,
    timestamp: bytes = b"\x40" + bytes(11),
    index: int = 7,
) -> bytes:
    """An initiation claiming `claimed_static`, with the static-static DH done with `ss_key`.

    Honest when ss_key is the private key of claimed_static; forged otherwise.
    """
    ephemeral = ephemeral or PrivateKey.generate()
    nonce = bytes(12)
    c = _h(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
    h = _h(_h(c, b"WireGuard v1 zx2c4 Jason@zx2c4.com"), responder.raw)
    epub = ephemeral.public_key().raw
    (c,) = _kdf(c, epub, 1)
    h = _h(h, epub)
    c, k = _kdf(c, ephemeral.exchange(responder), 2)
    static = ChaCha20Poly1305(k).encrypt(nonce, claimed_static.raw, h)
    h = _h(h, static)
    c, k = _kdf(c, ss_key.exchange(responder), 2)
    stamp = ChaCha20Poly1305(k).encrypt(nonce, timestamp, h)
    body = b"\x01\x00\x00\x00" + index.to_bytes(4, "little") + epub + static + stamp
    return body + mac1(responder, body) + bytes(16)
