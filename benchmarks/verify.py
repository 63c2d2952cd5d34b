"""Verified initiations per second vs the raw X25519 rate, measured side by side.

    .venv/bin/python benchmarks/verify.py [--seconds 2]

Rows: raw X25519 exchanges (the floor every verification pays once or twice), Responder.verify
with the static·static DH cached and uncached, and forged initiations (always uncached). The
rows are interleaved over 5 rounds and each row's median is reported. Prints a Markdown table
for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

from wgjit.handshake import HandshakeError, Responder, Timestamp, build_initiation
from wgjit.keys import PrivateKey

ROUNDS = 5


def rate(fn: Callable[[int], object], items: int, seconds: float) -> float:
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(items):
            fn(i)
        done += items
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0, help="per row, over all rounds")
    s = ap.parse_args().seconds
    gw = PrivateKey.generate()
    clients = [PrivateKey.generate() for _ in range(2000)]
    ts = Timestamp.from_unix(time.time())
    pkts = [build_initiation(c, gw.public_key(), timestamp=ts) for c in clients]
    other = PrivateKey.generate().public_key()

    cold = Responder(gw, static_cache_size=0)
    warm = Responder(gw)
    for p in pkts:
        warm.verify(p)
    forger = PrivateKey.generate()
    forged = [build_initiation(forger, gw.public_key(), timestamp=ts) for _ in range(200)]

    # what a flood of valid-looking initiations from keys never seen before costs
    def verify_forged(i: int) -> None:
        with contextlib.suppress(HandshakeError):
            cold.verify(forged[i % len(forged)])

    cases: list[tuple[str, Callable[[int], object], int]] = [
        ("raw X25519 exchange", lambda i: gw.exchange(other), 1000),
        ("verify, static DH uncached (2 X25519)", lambda i: cold.verify(pkts[i]), len(pkts)),
        ("verify, static DH cached (1 X25519)", lambda i: warm.verify(pkts[i]), len(pkts)),
        ("verify, uncached key (forgery path)", verify_forged, len(forged)),
    ]
    # rows interleaved over ROUNDS rounds, the median of each: a burst of load elsewhere on
    # the machine then moves one round of every row, not all rounds of one row
    samples: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _ in range(ROUNDS):
        for name, fn, items in cases:
            samples[name].append(rate(fn, items, s / ROUNDS))
    rows = [(name, statistics.median(samples[name])) for name, _, _ in cases]
    base = rows[0][1]
    print("| operation | per second (1 core) | vs raw X25519 |")
    print("|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r:,.0f} | {r / base:.2f} |")


if __name__ == "__main__":
    main()
