"""WireGuard Curve25519 keys as types.

`PublicKey` and `PresharedKey`/`PrivateKey` parse and print the base64 form `wg` uses and the
hex form UAPI uses. Secret keys never show their value in repr/str; `.b64()` is explicit.
This module does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Self

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from wgjit.errors import WgjitError

KEY_LEN = 32


class InvalidKey(WgjitError, ValueError):
    """A key could not be parsed; the message says what was wrong."""


class _Key:
    __slots__ = ("_raw",)
    _kind = "key"

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes | bytearray) or len(raw) != KEY_LEN:
            raise InvalidKey(f"{self._kind} must be {KEY_LEN} bytes")
        self._raw = bytes(raw)

    @classmethod
    def from_b64(cls, text: str) -> Self:
        text = text.strip()
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidKey(
                f"{cls._kind} {text[:8]!r}... is not valid base64 "
                "(expected 44 characters, as `wg genkey` prints)"
            ) from None
        if len(raw) != KEY_LEN or len(text) != 44:
            raise InvalidKey(
                f"{cls._kind} must be {KEY_LEN} bytes (44 base64 characters), got {len(raw)} bytes"
            )
        return cls(raw)

    @classmethod
    def from_hex(cls, text: str) -> Self:
        try:
            raw = bytes.fromhex(text.strip())
        except ValueError:
            raise InvalidKey(f"{cls._kind} is not valid hex") from None
        return cls(raw)

    @property
    def raw(self) -> bytes:
        return self._raw

    def b64(self) -> str:
        return base64.b64encode(self._raw).decode("ascii")

    def hex(self) -> str:
        return self._raw.hex()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._raw))


class PublicKey(_Key):
    """A peer's or the gateway's public key. Safe to print."""

    __slots__ = ()
    _kind = "public key"

    def __repr__(self) -> str:
        return f"PublicKey({self.b64()})"

    def __str__(self) -> str:
        return self.b64()

    def short(self) -> str:
        """First 8 base64 characters, for logs."""
        return self.b64()[:8]

    @classmethod
    def trusted(cls, raw: bytes) -> PublicKey:
        """A key from 32 bytes known to be right (`bytes`, e.g. a decrypted static key): no
        check or copy, for the hot path."""
        self = object.__new__(cls)
        self._raw = raw
        return self


class _SecretKey(_Key):
    __slots__ = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)


class PrivateKey(_SecretKey):
    """A static private key. Never printed; use `.b64()` explicitly to export it."""

    __slots__ = ("_x25519",)
    _kind = "private key"

    def __init__(self, raw: bytes) -> None:
        super().__init__(raw)
        self._x25519 = X25519PrivateKey.from_private_bytes(self._raw)

    @classmethod
    def generate(cls) -> PrivateKey:
        k = X25519PrivateKey.generate()
        return cls(k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))

    def public_key(self) -> PublicKey:
        return PublicKey(self._x25519.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def x25519(self) -> X25519PrivateKey:
        """The key as the cryptography library's object (for callers that do many exchanges
        and keep their own X25519PublicKey objects)."""
        return self._x25519

    def exchange(self, peer: PublicKey | bytes) -> bytes:
        """X25519(self, peer). Raises InvalidKey for a low-order peer key (all-zero result)."""
        raw = peer.raw if isinstance(peer, PublicKey) else peer
        try:
            return self._x25519.exchange(X25519PublicKey.from_public_bytes(raw))
        except ValueError:
            raise InvalidKey("X25519 with a low-order public key") from None


class PresharedKey(_SecretKey):
    """An optional per-peer symmetric key (the `psk` of Noise_IKpsk2). Never printed."""

    __slots__ = ()
    _kind = "preshared key"

    @classmethod
    def generate(cls) -> PresharedKey:
        return cls(os.urandom(KEY_LEN))
