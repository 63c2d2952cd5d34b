"""Verified initiations per second vs the raw X25519 rate, measured side by side.

    .venv/bin/python benchmarks/verify.py [--seconds 10] [--rounds 5] [--no-pool]

Rows: raw X25519 exactly as verification pays it (the gateway's X25519PrivateKey object, and an
X25519PublicKey made from the 32 bytes of each packet's ephemeral: a packet brings bytes, and the
library computes only on key objects); Responder.verify with the static·static DH cached and
uncached; forged initiations (always uncached); and verification through the worker-process pool
(`wgjit.gateway.pool.VerifyPool`) with 1 and 2 workers, fed the cached-path packets as the
gateway's loop feeds them (the loop checks mac1 itself, so the workers do not). Every row runs
once per round, rows interleaved within each round (a burst of load elsewhere then moves one
sample of every row, not every sample of one row), and each row's median over the rounds is
reported.

Two rates per row: per second of wall-clock time (what a gateway gets; on a machine shared with
other work it measures that work too), and per CPU-second of the process doing the crypto (this
process; for the pool rows, the workers together): the cost of one verification, which other
processes on the machine barely move. "vs raw" compares each with raw X25519 measured the same
way in the same run. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from wgjit.handshake import HandshakeError, Responder, Timestamp, build_initiation
from wgjit.keys import PrivateKey


def rate(fn: Callable[[], int], cpu: Callable[[], float], seconds: float) -> tuple[float, float]:
    """(items per wall second, items per CPU second): fn() does a pass and returns how many
    items it did; cpu() is the CPU time used so far by whoever does the work."""
    done = 0
    c0 = cpu()
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or not done:
        done += fn()
    used = cpu() - c0
    return done / elapsed, done / used if used > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0, help="per row, over all rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-pool", action="store_true", help="skip the worker-pool rows")
    args = ap.parse_args()
    gw = PrivateKey.generate()
    clients = [PrivateKey.generate() for _ in range(2000)]
    ts = Timestamp.from_unix(time.time())
    pkts = [build_initiation(c, gw.public_key(), timestamp=ts) for c in clients]
    ephemerals = [p[8:40] for p in pkts]

    cold = Responder(gw, static_cache_size=0)
    warm = Responder(gw)
    for p in pkts:
        warm.verify(p)
    forger = PrivateKey.generate()
    forged = [build_initiation(forger, gw.public_key(), timestamp=ts) for _ in range(200)]
    x = gw.x25519()  # the object Responder computes with

    def raw() -> int:
        for e in ephemerals:
            x.exchange(X25519PublicKey.from_public_bytes(e))
        return len(ephemerals)

    def each(r: Responder, packets: list[bytes]) -> Callable[[], int]:
        def run() -> int:
            verify = r.verify
            for p in packets:
                verify(p)
            return len(packets)

        return run

    # what a flood of valid-looking initiations from keys never seen before costs
    def verify_forged() -> int:
        for p in forged:
            with contextlib.suppress(HandshakeError):
                cold.verify(p)
        return len(forged)

    here = time.process_time
    cases: list[tuple[str, Callable[[], int], Callable[[], float]]] = [
        ("raw X25519 exchange (as verify pays it)", raw, here),
        ("verify, static DH uncached (2 X25519)", each(cold, pkts), here),
        ("verify, static DH cached (1 X25519)", each(warm, pkts), here),
        ("verify, uncached key (forgery path)", verify_forged, here),
    ]
    with contextlib.ExitStack() as stack:
        if not args.no_pool:
            from wgjit.gateway.pool import bench_pool

            for n in (1, 2):
                run, cpu = stack.enter_context(bench_pool(gw, n, pkts))
                cases.append((f"pool, {n} worker{'s' * (n > 1)} (cached path)", run, cpu))
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in cases}
        for _ in range(args.rounds):
            for name, fn, cpu in cases:
                samples[name].append(rate(fn, cpu, args.seconds / args.rounds))
    rows = [
        (name, statistics.median(w for w, _ in samples[name]),
         statistics.median(c for _, c in samples[name]))
        for name, _, _ in cases
    ]  # fmt: skip
    _, wall0, cpu0 = rows[0]
    print(f"{os.cpu_count()} cores; rows interleaved over {args.rounds} rounds, median per row.\n")
    print("| operation | per second | vs raw X25519 | per CPU-second | vs raw (CPU) |")
    print("|---|---|---|---|---|")
    for name, wall, cpu in rows:
        print(f"| {name} | {wall:,.0f} | {wall / wall0:.2f} | {cpu:,.0f} | {cpu / cpu0:.2f} |")


if __name__ == "__main__":
    main()
