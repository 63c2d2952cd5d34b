"""Addresses: UDP endpoints and allowed-IP prefixes, parsed strictly with clear errors.

No I/O here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from wgjit.errors import WgjitError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class InvalidAddress(WgjitError, ValueError):
    """An endpoint or prefix could not be parsed; the message names the bad text."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A UDP endpoint. Prints as `198.18.0.2:51820` or `[fd00::2]:51820` (wg's format)."""

    host: IPAddress
    port: int

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        text = text.strip()
        host, sep, port = text.rpartition(":")
        if not sep:
            raise InvalidAddress(f"endpoint {text!r} has no port (expected HOST:PORT or [V6]:PORT)")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
            p = int(port)
        except ValueError:
            raise InvalidAddress(f"endpoint {text!r} is not HOST:PORT with a numeric IP") from None
        if not 0 < p < 65536:
            raise InvalidAddress(f"endpoint {text!r}: port must be 1-65535")
        return cls(ip, p)


def parse_network(text: str) -> IPNetwork:
    """Parse one CIDR prefix strictly: host bits must be zero (`10.0.0.1/24` is refused)."""
    t = text.strip()
    try:
        return ipaddress.ip_network(t, strict=True)
    except ValueError as e:
        if "/" in t:
            try:
                fixed = ipaddress.ip_network(t, strict=False)
            except ValueError:
                pass
            else:
                raise InvalidAddress(f"{t!r} has host bits set; did you mean {fixed}?") from None
        raise InvalidAddress(f"{t!r} is not a valid CIDR prefix ({e})") from None


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """Parse `CIDR[,CIDR...]`; a bare address becomes a /32 or /128."""
    parts = [p for p in (s.strip() for s in text.split(",")) if p]
    if not parts:
        raise InvalidAddress("no CIDR prefixes given (expected e.g. 100.65.0.2/32)")
    return tuple(parse_network(p) for p in parts)


def format_networks(nets: tuple[IPNetwork, ...]) -> str:
    return ",".join(str(n) for n in nets)
