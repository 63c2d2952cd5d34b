"""First-ping latency by completion mode, pre-installed peers as the baseline, same lab, same run.

    sudo .venv/bin/python benchmarks/first_ping.py [--connects 50] [--no-help-connects 50]

Prints a Markdown table for docs/benchmarks.md. Each connect starts from a client with no
session; the figure is ping's round trip for the client's very first packet, which waits in
the client's WireGuard queue until the handshake is done. Rows:

- pre-installed peer, with the gateway running in invert mode (AF_PACKET only copies packets:
  the baseline) and in hold mode (every initiation, also an installed peer's, passes the queue);
- a peer installed just in time by `wgjit gateway --mode hold|replay|invert`;
- the same with `--testing-no-completion`: installed, nothing else (the client's 5 s retry).

The modes are measured in interleaved rounds (a gateway restart per mode and round) so drift on
the machine hits them alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from pathlib import Path

from wgjit.lab import Lab, first_ping, measure_connects, percentile, preinstall

ROUNDS = 5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connects", type=int, default=50, help="per row")
    ap.add_argument("--no-help-connects", type=int, default=50,
                    help="for the no-completion row (each takes ~5 s; 0 skips it)")  # fmt: skip
    args = ap.parse_args()
    per = max(1, args.connects // ROUNDS)
    rows: dict[str, list[float]] = {
        "pre-installed peer (gateway in invert mode: baseline)": [],
        "pre-installed peer (gateway in hold mode)": [],
        "JIT, hold (NFQUEUE)": [],
        "JIT, replay (re-injected initiation)": [],
        "JIT, invert (role inversion)": [],
    }
    no_help: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
        flavour = "kernel WireGuard" if lab.wg == "kernel" else "wireguard-go"
        store_url = f"sqlite:///{Path(tmp) / 'peers.db'}"
        gw = lab.add_gateway()
        client = lab.add_client()
        for r in range(ROUNDS):
            for mode, pre_row, jit_row in [
                ("invert", "pre-installed peer (gateway in invert mode: baseline)",
                 "JIT, invert (role inversion)"),
                ("hold", "pre-installed peer (gateway in hold mode)", "JIT, hold (NFQUEUE)"),
                ("replay", None, "JIT, replay (re-injected initiation)"),
            ]:  # fmt: skip
                if pre_row:
                    # on the device before the gateway starts: it adopts the peer as installed
                    preinstall(client, gw, store_url, f"pre-{mode}-{r}")
                g = lab.start_gateway(store_url, "--mode", mode)
                try:
                    if pre_row:
                        rows[pre_row] += [first_ping(client, gw) for _ in range(per)]
                    rows[jit_row] += measure_connects(
                        client, gw, store_url, per, jit=True, prefix=f"{mode}{r}"
                    )
                finally:
                    g.stop()
        if args.no_help_connects:
            g = lab.start_gateway(store_url, "--testing-no-completion")
            try:
                no_help = measure_connects(
                    client, gw, store_url, args.no_help_connects, jit=True, prefix="none"
                )
            finally:
                g.stop()
    if no_help:
        rows["JIT, no completion (client's 5 s retry)"] = no_help
    print(f"{flavour} gateway and client in namespaces; {platform.node()}, "
          f"Python {platform.python_version()}, {ROUNDS} interleaved rounds")  # fmt: skip
    print()
    print("| how | n | median ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for name, v in rows.items():
        print(f"| {name} | {len(v)} | {statistics.median(v):.1f} | {percentile(v, 99):.1f} "
              f"| {max(v):.1f} |")  # fmt: skip
    base = rows["pre-installed peer (gateway in invert mode: baseline)"]
    hold = rows["JIT, hold (NFQUEUE)"]
    print(
        f"\nhold vs pre-installed: median {statistics.median(hold) - statistics.median(base):+.1f}"
        f" ms, p99 {percentile(hold, 99) - percentile(base, 99):+.1f} ms"
    )


if __name__ == "__main__":
    main()
