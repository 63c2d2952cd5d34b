"""First-ping latency: JIT-installed peer vs pre-installed peer, same lab, same run.

    sudo .venv/bin/python benchmarks/first_ping.py [--connects 50]

Prints a Markdown table for docs/benchmarks.md. Each connect starts from a client with no
session; the figure is ping's round trip for the client's very first packet, which waits in
the client's WireGuard queue until the handshake is done.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from pathlib import Path

from wgjit.lab import Lab, measure_connects, percentile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connects", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
        store_url = f"sqlite:///{Path(tmp) / 'peers.db'}"
        gw = lab.add_gateway()
        client = lab.add_client()
        g = lab.start_gateway(store_url)
        try:
            rows = {}
            # interleave in rounds so drift on the machine hits both sides alike
            pre: list[float] = []
            jit: list[float] = []
            rounds = 5
            per = max(1, args.connects // rounds)
            for r in range(rounds):
                pre += measure_connects(client, gw, store_url, per, jit=False, prefix=f"p{r}")
                jit += measure_connects(client, gw, store_url, per, jit=True, prefix=f"j{r}")
            rows["pre-installed peer"] = pre
            rows["JIT peer (role inversion)"] = jit
        finally:
            g.stop()
    print(f"wireguard-go gateway and client in namespaces; {platform.node()}, "
          f"{platform.python_version()}")  # fmt: skip
    print()
    print("| how | n | median ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for name, v in rows.items():
        print(f"| {name} | {len(v)} | {statistics.median(v):.1f} | {percentile(v, 99):.1f} "
              f"| {max(v):.1f} |")  # fmt: skip
    ratio = statistics.median(rows["JIT peer (role inversion)"]) / statistics.median(
        rows["pre-installed peer"]
    )
    print(f"\nJIT / pre-installed, median: {ratio:.2f}x")


if __name__ == "__main__":
    main()
