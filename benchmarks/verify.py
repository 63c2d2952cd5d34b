"""Verified initiations per second vs the raw X25519 rate, measured side by side.

    .venv/bin/python benchmarks/verify.py [--seconds 2]

Rows: raw X25519 exchanges (the floor every verification pays once or twice), Responder.verify
with the static·static DH cached and uncached, and forged initiations (always uncached).
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
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

    rows = [
        ("raw X25519 exchange", rate(lambda i: gw.exchange(other), 1000, s)),
        (
            "verify, static DH uncached (2 X25519)",
            rate(lambda i: cold.verify(pkts[i]), len(pkts), s),
        ),
        ("verify, static DH cached (1 X25519)", rate(lambda i: warm.verify(pkts[i]), len(pkts), s)),
        ("verify, uncached key (forgery path)", rate(verify_forged, len(forged), s)),
    ]
    base = rows[0][1]
    print("| operation | per second (1 core) | vs raw X25519 |")
    print("|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r:,.0f} | {r / base:.2f} |")


if __name__ == "__main__":
    main()
