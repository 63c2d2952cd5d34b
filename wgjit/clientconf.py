"""wg-quick configs for clients: every value validated, so a config works as printed and no
input can add lines to it (a newline in --endpoint or --dns is an error, not a new line).

Sans-IO: the CLI (or an API) gathers the gateway's key and port, this module checks and
renders. A private key appears only when the caller has it (wgjit stores none: see README).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from wgjit.addr import InvalidAddress, IPNetwork, parse_networks
from wgjit.errors import WgjitError
from wgjit.keys import PresharedKey, PrivateKey, PublicKey

DEFAULT_PORT: Final = 51820
FILL_IN_KEY: Final = "<fill in: this peer's private key>"
FILL_IN_GATEWAY: Final = "<fill in: the gateway's public key, `wg show IFNAME public-key`>"
FILL_IN_ENDPOINT: Final = "<fill in: the gateway's HOST:PORT>"
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class ConfigInputError(WgjitError, ValueError):
    """A value for a client config is invalid; the message names the option and the fix."""


def _hostname(text: str) -> bool:
    name = text[:-1] if text.endswith(".") else text
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(part) for part in name.split("."))


def parse_endpoint(text: str, default_port: int = DEFAULT_PORT) -> str:
    """`HOST[:PORT]` (HOST: an IPv4 address, `[IPv6]`, or a DNS name) as wg-quick wants it;
    the port defaults to `default_port`."""
    t = text.strip()
    bad = ConfigInputError(
        f"--endpoint {text!r} is not HOST:PORT (a DNS name, an IPv4 address or [IPv6], and a"
        " port 1-65535), e.g. vpn.example.net:51820"
    )
    if not t or any(c.isspace() or ord(c) < 32 for c in t):
        raise bad
    host, port_text = t, ""
    if t.startswith("["):
        close = t.find("]")
        if close < 0:
            raise bad
        host, rest = t[1:close], t[close + 1 :]
        if rest and not rest.startswith(":"):
            raise bad
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
        host = f"[{host}]"
    else:
        if t.count(":") > 1:
            raise ConfigInputError(
                f"--endpoint {text!r}: put an IPv6 address in brackets, [V6]:PORT"
            )
        host, _, port_text = t.partition(":")
        if not _hostname(host):
            raise bad
        if ":" in t and not port_text:
            raise bad
    port = default_port
    if port_text:
        if not port_text.isdigit():
            raise bad
        port = int(port_text)
    if not 0 < port < 65536:
        raise bad
    return f"{host}:{port}"


def parse_dns(text: str) -> tuple[str, ...]:
    """`--dns ADDR|DOMAIN[,...]`: resolver addresses and search domains."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            out.append(str(ipaddress.ip_address(part)))
        except ValueError:
            if not _hostname(part):
                raise ConfigInputError(
                    f"--dns {part!r} is neither an IP address nor a search domain"
                ) from None
            out.append(part)
    if not out:
        raise ConfigInputError("--dns needs an address (e.g. 100.65.0.1) or a search domain")
    return tuple(out)


def parse_allowed(text: str) -> tuple[IPNetwork, ...]:
    try:
        return parse_networks(text)
    except InvalidAddress as e:
        raise ConfigInputError(f"--client-allowed-ips: {e}") from None


@dataclass(frozen=True, slots=True)
class ClientConfig:
    addresses: tuple[IPNetwork, ...]
    private_key: PrivateKey | None = None
    gateway_key: PublicKey | None = None
    preshared_key: PresharedKey | None = None
    endpoint: str | None = None  # already checked by parse_endpoint
    allowed_ips: tuple[IPNetwork, ...] = (
        ipaddress.IPv4Network("0.0.0.0/0"),
        ipaddress.IPv6Network("::/0"),
    )
    dns: tuple[str, ...] = ()
    mtu: int | None = None
    persistent_keepalive: int | None = None

    def missing(self) -> list[str]:
        """What the config lacks to work as printed (placeholders instead)."""
        gaps = []
        if self.private_key is None:
            gaps.append("the private key")
        if self.gateway_key is None:
            gaps.append("the gateway's public key (--interface or --gateway-public-key)")
        if self.endpoint is None:
            gaps.append("the endpoint (--endpoint HOST[:PORT])")
        return gaps

    def render(self) -> str:
        def join(items: Sequence[object]) -> str:
            return ", ".join(str(i) for i in items)

        lines = [
            "[Interface]",
            f"PrivateKey = {self.private_key.b64() if self.private_key else FILL_IN_KEY}",
            f"Address = {join(self.addresses)}",
        ]
        if self.dns:
            lines.append(f"DNS = {join(self.dns)}")
        if self.mtu is not None:
            lines.append(f"MTU = {self.mtu}")
        lines += [
            "",
            "[Peer]",
            f"PublicKey = {self.gateway_key.b64() if self.gateway_key else FILL_IN_GATEWAY}",
        ]
        if self.preshared_key is not None:
            lines.append(f"PresharedKey = {self.preshared_key.b64()}")
        lines += [
            f"Endpoint = {self.endpoint or FILL_IN_ENDPOINT}",
            f"AllowedIPs = {join(self.allowed_ips)}",
        ]
        if self.persistent_keepalive:
            lines.append(f"PersistentKeepalive = {self.persistent_keepalive}")
        return "\n".join(lines) + "\n"
