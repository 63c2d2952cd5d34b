"""The address pool of `peer add NAME --allowed-ips auto` (set with `wgjit store set-defaults
--pool CIDR[,CIDR6]`), and the store-wide defaults' names and checks.

A pool is one IPv4 prefix and/or one IPv6 prefix. A peer gets the lowest free /32 of the IPv4
part (and the lowest free /128 of the IPv6 part, if any). Never handed out: the pool's network
address, its first address (the gateway's own tunnel address, by convention: give the
gateway's interface e.g. 10.8.0.1/24 for the pool 10.8.0.0/24), the IPv4 broadcast address,
and any address another peer's prefix covers (whatever the pool).

Atomicity: the free address is computed from a read of every peer's prefixes, then added with
`Store.add_peer`, whose overlap check runs in the same transaction as the insert (SQLite's write
lock, PostgreSQL's prefix lock). Two concurrent adds may pick the same address; the second is
refused as an overlap and picks again (`add_with_auto_address`). No I/O but through the store.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from wgjit.addr import InvalidAddress, IPNetwork, parse_networks
from wgjit.store import Peer, PeerRefused, Store, StoreError
from wgjit.store.prefixes import prefix_problem

POOL_HINT: Final = "wgjit store set-defaults --pool CIDR[,CIDR6]"
# how often an add retries after a concurrent add took the address it picked
AUTO_ATTEMPTS: Final = 20


class PoolError(StoreError):
    """No pool, a bad pool, or a full pool; the message names `wgjit store set-defaults`."""


@dataclass(frozen=True, slots=True)
class Pool:
    v4: ipaddress.IPv4Network | None
    v6: ipaddress.IPv6Network | None

    def __str__(self) -> str:
        return ",".join(str(n) for n in (self.v4, self.v6) if n is not None)


def parse_pool(text: str) -> Pool:
    """`CIDR[,CIDR6]`: at most one prefix per family, room for at least one peer (IPv4 /30 or
    shorter, IPv6 /126 or shorter), no special-purpose range. Raises PoolError."""
    try:
        nets = parse_networks(text)
    except InvalidAddress as e:
        raise PoolError(f"--pool: {e}") from None
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    if len(v4) > 1 or len(v6) > 1:
        raise PoolError(f"--pool {text.strip()!r}: give at most one IPv4 and one IPv6 prefix")
    for n, longest in ((v4[0] if v4 else None, 30), (v6[0] if v6 else None, 126)):
        if n is None:
            continue
        if n.prefixlen > longest:
            raise PoolError(f"--pool {n} is too small: use a /{longest} or a shorter prefix")
        why = prefix_problem(n, allow_overlap=False)
        if why:
            raise PoolError(f"--pool {n}: {why}")
    return Pool(v4[0] if v4 else None, v6[0] if v6 else None)


def _lowest_free(net: IPNetwork, taken: Iterable[IPNetwork]) -> IPNetwork | None:
    """The lowest single-address prefix in `net` past its network and first address (and
    before an IPv4 broadcast address) that no prefix in `taken` covers; None if there is none."""
    first = int(net.network_address) + 2
    last = int(net.broadcast_address) - (1 if net.version == 4 else 0)
    spans = sorted(
        (int(t.network_address), int(t.broadcast_address)) for t in taken if _covers(t, net)
    )
    candidate = first
    for lo, hi in spans:
        if candidate < lo:
            break
        candidate = max(candidate, hi + 1)
    if candidate > last:
        return None
    bits = 32 if net.version == 4 else 128
    return ipaddress.ip_network((candidate, bits))


def next_free(pool: Pool, taken: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """The next free /32 (and /128 if the pool has an IPv6 part). Raises PoolError if full."""
    taken = list(taken)
    out: list[IPNetwork] = []
    for net in (pool.v4, pool.v6):
        if net is None:
            continue
        free = _lowest_free(net, taken)
        if free is None:
            raise PoolError(
                f"the address pool {net} is full; widen it with `{POOL_HINT}` or give"
                " --allowed-ips explicitly"
            )
        out.append(free)
    return tuple(out)


def store_pool(store: Store) -> Pool:
    """The store's pool; PoolError naming `wgjit store set-defaults --pool` if none is set."""
    text = store.get_defaults().get("pool")
    if not text:
        raise PoolError(f"--allowed-ips auto needs an address pool; set one with `{POOL_HINT}`")
    return parse_pool(text)


def add_with_auto_address(
    store: Store,
    add: Callable[[tuple[IPNetwork, ...]], Peer],
    attempts: int = AUTO_ATTEMPTS,
) -> Peer:
    """Pick the next free address(es) of the store's pool and `add` the peer with them; if a
    concurrent add took them first (the store refuses the overlap), pick again."""
    pool = store_pool(store)
    for _ in range(attempts):
        nets = next_free(pool, _all_prefixes(store))
        try:
            return add(nets)
        except PeerRefused:
            # taken meanwhile: pick again; refused for another reason: that is the answer
            if not any(_covers(t, n) for t in _all_prefixes(store) for n in nets):
                raise
    raise PoolError(
        f"could not allocate an address from the pool {pool} in {attempts} attempts (many"
        " concurrent adds); try again"
    )


def _covers(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.overlaps(b)


def _all_prefixes(store: Store) -> list[IPNetwork]:
    return [n for p in store.iter_peers() for n in p.allowed_ips]
