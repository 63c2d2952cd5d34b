"""Store benchmark: bulk-load N peers, then time the gateway's hot-path store calls.

    sudo .venv/bin/python -m benchmarks.store_lookup --peers 1000000 [--backend sqlite|postgresql]

Loads through `Store.import_peers` (the path `wgjit peer import` takes: executemany on SQLite,
COPY + one INSERT ... ON CONFLICT per batch on PostgreSQL) and reports the load rate; then
lookup() latency percentiles for random known keys (and unknown ones), advance_handshake(),
with --many M a gateway's reconcile of M device peers (lookup_many and claim_many against M
lookup() and claim() calls), with --traffic T a sweep's traffic write of T active peers
(record_traffic, twice) and what `wgjit status` reads (gateways(), count_peers(), the ten
busiest), and, for PostgreSQL, change-feed propagation: revoke() on one
connection until another, waiting on its wake-up fd, reads the key from changes_since().
PostgreSQL runs on a throwaway local server (tests/pgserver.py) over its unix socket. Prints one
table; writes nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import select
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.pgserver import PostgresServer
from wgjit.addr import IPNetwork, parse_network
from wgjit.keys import PublicKey
from wgjit.lab import percentile
from wgjit.store import Handshake, Peer, Store, Traffic, open_store

BATCH = 10000


def key_of(i: int) -> PublicKey:
    """Peer i's key: derived, so 10 million peers need not be held in memory."""
    return PublicKey(hashlib.blake2b(i.to_bytes(8, "big"), digest_size=32).digest())


def peer_of(i: int) -> Peer:
    net: IPNetwork = parse_network(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32")
    return Peer(f"p{i:08d}", key_of(i), (net,))


def load(store: Store, n: int, label: str) -> float:
    t0 = time.monotonic()
    last = t0
    for i in range(0, n, BATCH):
        res = store.import_peers([peer_of(j) for j in range(i, min(n, i + BATCH))])
        assert not res.rejected, res.rejected[:3]
        if time.monotonic() - last > 30:
            last = time.monotonic()
            done = i + BATCH
            print(f"  {label}: {done:,} rows, {done / (last - t0):,.0f}/s", flush=True)
    return time.monotonic() - t0


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1000.0)
    return out


def stats(name: str, us: list[float]) -> str:
    return (
        f"| {name} | {percentile(us, 50):.0f} | {percentile(us, 99):.0f} |"
        f" {percentile(us, 99.9):.0f} | {len(us)} |"
    )


def tai64n(s: int) -> bytes:
    return struct.pack(">QI", 2**62 + s, 0)


def reconcile(store: Store, keys: list[PublicKey], label: str) -> list[str]:
    """A gateway adopting len(keys) device peers: batched calls against one call per key."""
    m = len(keys)

    def secs(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    many = secs(lambda: store.lookup_many(keys))
    single = secs(lambda: [store.lookup(k) for k in keys])
    claim_first = secs(lambda: store.claim_many(keys, "bench-a"))
    claim_again = secs(lambda: store.claim_many(keys, "bench-a"))
    cursor = store.change_cursor()
    takeover = secs(lambda: store.claim_many(keys, "bench-b"))
    moved = len(store.changes_since(cursor)[0])
    part = keys[: max(1, m // 16)]
    per_claim = secs(lambda: [store.claim(k, "bench-c") for k in part]) / len(part)
    return [
        "",
        f"| {label}: reconcile {m:,} peers | s |",
        "|---|---|",
        f"| lookup_many | {many:.2f} |",
        f"| {m:,} calls of lookup() | {single:.2f} |",
        f"| claim_many, unclaimed | {claim_first:.2f} |",
        f"| claim_many, already ours | {claim_again:.2f} |",
        f"| claim_many, all taken from another gateway ({moved:,} in the feed) | {takeover:.2f} |",
        f"| {m:,} calls of claim() (extrapolated from {len(part):,}) | {per_claim * m:.2f} |",
    ]


def traffic(store: Store, n: int, active: int, label: str) -> list[str]:
    """A sweep's write of `active` peers' traffic (twice: the second adds to totals that
    exist), then the reads of `wgjit status`."""
    rnd = random.Random(2)
    picked = rnd.sample(range(n), active)
    now = time.time()
    rows = [Traffic(key_of(i), rnd.randrange(1, 10**9), rnd.randrange(1, 10**9), now,
                    f"198.18.{i >> 8 & 255}.{i & 255}:{1024 + i % 60000}")
            for i in picked]  # fmt: skip
    out = [f"| {label}: status call | ms |", "|---|---|"]
    for what in ("record_traffic, new totals", "record_traffic, adding to totals"):
        t0 = time.perf_counter()
        store.record_traffic(rows)
        out.append(f"| {what} ({active:,} peers) | {(time.perf_counter() - t0) * 1e3:,.0f} |")
    store.heartbeat("gw-bench", installed=active, rejects={"unknown": 3})
    for what, fn in (
        ("gateways()", store.gateways),
        (f"count_peers() of {n:,}", store.count_peers),
        (f"busiest_peers(10) of {n:,} ({active:,} with traffic)", lambda: store.busiest_peers(10)),
    ):
        fn()  # warm
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out.append(f"| {what} | {sorted(times)[1] * 1e3:,.0f} |")
    return out


def bench(url: str, n: int, lookups: int, label: str, many: int = 0,
          active: int = 0) -> list[str]:  # fmt: skip
    rows = []
    with open_store(url) as store:
        secs = load(store, n, label)
        rows.append(f"load {n:,} peers ({label}): {secs:.1f} s, {n / secs:,.0f} rows/s")
        print(rows[-1], flush=True)
        rnd = random.Random(1)
        keys = [key_of(rnd.randrange(n)) for _ in range(lookups)]
        unknown = [PublicKey(os.urandom(32)) for _ in range(lookups // 10)]
        for k in keys[:1000]:
            store.lookup(k)  # warm up
        it = iter(keys)
        known = timed(lambda: store.lookup(next(it)), lookups)
        it2 = iter(unknown)
        miss = timed(lambda: store.lookup(next(it2)), len(unknown))
        ts = iter(range(1, 10**9))
        it3 = iter(keys)
        adv = timed(
            lambda: store.advance_handshake(Handshake(next(it3), tai64n(next(ts)), 1.0)),
            lookups // 10,
        )
        rows += [
            "",
            f"| {label} call | p50 µs | p99 µs | p99.9 µs | n |",
            "|---|---|---|---|---|",
            stats("lookup (known key)", known),
            stats("lookup (unknown key)", miss),
            stats("advance_handshake", adv),
        ]
        if many:
            rows += reconcile(store, [key_of(i) for i in rnd.sample(range(n), many)], label)
            print("\n".join(rows[-9:]), flush=True)
        if active:
            rows += ["", *traffic(store, n, active, label)]
            print("\n".join(rows[-7:]), flush=True)
        fd = store.wakeup_fd()
        if fd is not None:
            with open_store(url) as admin:
                prop = []
                for p in map(peer_of, range(200)):
                    cursor = store.change_cursor()
                    store.changes_since(cursor)
                    t0 = time.perf_counter_ns()
                    admin.revoke(p.name)
                    fd = store.wakeup_fd()
                    assert fd is not None
                    select.select([fd], [], [], 5)
                    got, _ = store.changes_since(cursor)
                    assert p.public_key in got
                    prop.append((time.perf_counter_ns() - t0) / 1000.0)
                rows.append(stats("revoke → other connection sees it (NOTIFY)", prop))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=1_000_000)
    ap.add_argument("--lookups", type=int, default=100_000)
    ap.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    ap.add_argument("--many", type=int, default=0, help="also time a reconcile of this many")
    ap.add_argument("--traffic", type=int, default=0,
                    help="also time a sweep's traffic write of this many peers, and status")
    args = ap.parse_args()
    # a stopped benchmark still stops its PostgreSQL server and deletes its files
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out: list[str] = []
    peers = args.peers
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory(prefix="wgjit-bench-") as d:
            out += bench(
                f"sqlite://{Path(d) / 'peers.db'}", peers, args.lookups, "SQLite", args.many,
                args.traffic,
            )
            size = (Path(d) / "peers.db").stat().st_size
            out.append(f"SQLite file: {size / 2**20:,.0f} MiB")
    if args.backend in ("postgresql", "both"):
        with PostgresServer({"shared_buffers": "'2GB'", "max_wal_size": "'8GB'"}) as srv:
            url = srv.create_database("bench")
            out += ["", *bench(url, peers, args.lookups, "PostgreSQL", args.many, args.traffic)]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
