"""What a stored peer may hold: allowed-IP prefixes that route, and a public key that is a key.

Rules shared by every backend (so the CLI, an import and an API refuse the same things):
- never: loopback, multicast, "this network" / unspecified addresses (no design routes them
  through a tunnel, and WireGuard would install them anyway);
- only with `allow_overlap` (deliberate designs: an exit node, a site-to-site link): link-local
  ranges, the default routes 0.0.0.0/0 and ::/0, and a prefix that overlaps another peer's;
- never a low-order public key (X25519 with it yields all zeros: no session key is secret).
Prefixes nest or are disjoint, so "overlaps" means "one contains the other"; the backends find
that with index seeks (`supernet_firsts`), never a scan of every peer. No I/O here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from wgjit.addr import IPNetwork
from wgjit.keys import PublicKey

ALLOW_HINT: Final = "pass --allow-overlap for a deliberate design"

_NEVER: Final = tuple(
    (ipaddress.ip_network(n), why)
    for n, why in [
        ("127.0.0.0/8", "loopback"),
        ("::1/128", "loopback"),
        ("224.0.0.0/4", "multicast"),
        ("ff00::/8", "multicast"),
        ("0.0.0.0/8", "'this network' (unspecified)"),
        ("::/128", "unspecified"),
    ]
)
_UNLESS_ALLOWED: Final = tuple(
    (ipaddress.ip_network(n), why)
    for n, why in [("169.254.0.0/16", "link-local"), ("fe80::/10", "link-local")]
)

# Curve25519 points of small order and their non-canonical encodings (u and u + p; X25519
# ignores the top bit, so each also with bit 255 set): X25519 with any of them is all zeros.
# tests/unit/test_store_overlaps.py checks each against the X25519 implementation.
_LOW_ORDER_HEX: Final = (
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
)
LOW_ORDER_KEYS: Final = frozenset(
    bytes.fromhex(h)[:31] + bytes([bytes.fromhex(h)[31] | top])
    for h in _LOW_ORDER_HEX
    for top in (0, 0x80)
)


def key_problem(key: PublicKey) -> str | None:
    """Why `key` cannot be a peer's public key, or None."""
    if key.raw in LOW_ORDER_KEYS:
        return (
            f"public key {key.b64()} is a low-order Curve25519 point (no secret session key"
            " can be made with it); use the key `wg pubkey` prints for the peer's private key"
        )
    return None


def prefix_problem(net: IPNetwork, allow_overlap: bool) -> str | None:
    """Why `net` cannot be an allowed IP (whatever other peers hold), or None."""
    for special, why in _NEVER:
        if net.version == special.version and net.subnet_of(special):  # type: ignore[arg-type]
            return f"allowed IP {net} is {why}: it cannot be routed through a tunnel"
    if allow_overlap:
        return None
    if net.prefixlen == 0:
        return (
            f"allowed IP {net} is the whole address family: it overlaps every other peer and"
            f" takes all traffic; {ALLOW_HINT} (an exit node)"
        )
    for special, why in _UNLESS_ALLOWED:
        if net.version == special.version and net.subnet_of(special):  # type: ignore[arg-type]
            return f"allowed IP {net} is {why}; {ALLOW_HINT}"
    return None


def peer_problem(key: PublicKey, nets: Iterable[IPNetwork], allow_overlap: bool) -> str | None:
    """The first reason the store must refuse this peer before looking at other peers."""
    why = key_problem(key)
    if why:
        return why
    nets = tuple(nets)
    for net in nets:
        why = prefix_problem(net, allow_overlap)
        if why:
            return why
    if not allow_overlap:
        clash = _first_overlap_pair(nets)
        if clash:
            return f"allowed IPs {clash[0]} and {clash[1]} overlap each other; give one of them"
    return None


def overlap_message(net: IPNetwork, other: IPNetwork, owner: str) -> str:
    return (
        f"allowed IP {net} overlaps {other} of peer {owner!r} (WireGuard routes a prefix to one"
        f" peer only); give another prefix, or {ALLOW_HINT}"
    )


# -- index keys -----------------------------------------------------------------------------


def bounds(net: IPNetwork) -> tuple[int, bytes, bytes]:
    """(family, first address, last address) as stored: big-endian bytes compare like the
    addresses (4 bytes for IPv4, 16 for IPv6)."""
    return net.version, net.network_address.packed, net.broadcast_address.packed


def supernet_firsts(net: IPNetwork) -> list[bytes]:
    """The first address of every strict supernet of `net` (deduplicated): a stored prefix
    contains `net` exactly when its first address is one of these and its last >= net's."""
    width = net.max_prefixlen
    value = int(net.network_address)
    seen: dict[int, None] = {}
    for length in range(net.prefixlen):
        mask = ((1 << width) - 1) ^ ((1 << (width - length)) - 1)
        seen[value & mask] = None
    return [v.to_bytes(width // 8, "big") for v in seen]


def network_of(family: int, first: bytes, last: bytes) -> IPNetwork:
    """The prefix a stored (family, first, last) row stands for."""
    lo, hi = int.from_bytes(first, "big"), int.from_bytes(last, "big")
    width = 32 if family == 4 else 128
    length = width - (hi - lo + 1).bit_length() + 1
    return (
        ipaddress.ip_network((lo, length)) if family == 4 else ipaddress.IPv6Network((lo, length))
    )


# -- within one batch -----------------------------------------------------------------------


def overlaps_within(
    rows: Sequence[tuple[int, str, Sequence[IPNetwork]]],
) -> dict[int, str]:
    """Rows (index, name, prefixes) of one batch that overlap an EARLIER row of another name:
    {index: reason}. One sort and a sweep, O(n log n)."""
    items = sorted(
        (net.version, int(net.network_address), net.prefixlen, int(net.broadcast_address),
         i, n, net)
        for i, n, nets in rows
        for net in nets
    )  # fmt: skip
    bad: dict[int, str] = {}
    stack: list[tuple[int, int, int, int, str, IPNetwork]] = []  # open enclosing prefixes
    for version, first, _, last, i, name, net in items:
        while stack and (stack[-1][0] != version or stack[-1][2] < first):
            stack.pop()
        # every prefix on the stack contains this one: the later row of the two is refused
        for _, _, _, j, other_name, other in stack:
            if other_name == name:
                continue
            if j < i:
                later, why = i, overlap_message(net, other, other_name)
            else:
                later, why = j, overlap_message(other, net, name)
            bad.setdefault(later, why + " (earlier in the same import)")
        stack.append((version, first, last, i, name, net))
    return bad


def _first_overlap_pair(nets: Sequence[IPNetwork]) -> tuple[IPNetwork, IPNetwork] | None:
    for x in range(len(nets)):
        for y in range(x + 1, len(nets)):
            a, b = nets[x], nets[y]
            if a.version == b.version and a.overlaps(b):
                return a, b
    return None


@dataclass(frozen=True, slots=True)
class UpdatePlan:
    check_overlap: bool


def plan_update(
    new_name: str | None,
    public_key: PublicKey | None,
    allowed_ips: Sequence[IPNetwork] | None,
    allow_overlap: bool,
) -> UpdatePlan:
    """The checks of Store.update_peer that need no database (raises InvalidPeerName or
    PeerRefused); says what the backend must still check."""
    from wgjit.store import PeerRefused, validate_peer_name

    if new_name is not None:
        validate_peer_name(new_name)
    if public_key is not None:
        why = key_problem(public_key)
        if why:
            raise PeerRefused(why)
    if allowed_ips is not None:
        for net in allowed_ips:
            why = prefix_problem(net, allow_overlap)
            if why:
                raise PeerRefused(why)
        if not allow_overlap:
            clash = _first_overlap_pair(allowed_ips)
            if clash:
                raise PeerRefused(
                    f"allowed IPs {clash[0]} and {clash[1]} overlap each other; give one of them"
                )
    return UpdatePlan(check_overlap=allowed_ips is not None and not allow_overlap)
