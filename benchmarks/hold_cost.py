"""What hold mode costs an already-installed peer's handshake: the trip through the queue.

    sudo .venv/bin/python benchmarks/hold_cost.py [--packets 2000]

In a throwaway network namespace: a UDP socket on 127.0.0.1:51820 stands in for the device, the
gateway's own NFQUEUE rules are installed, and the real policy (`Policy.on_knocks`, SQLite store,
200 peers all already installed) judges real initiations, which are then released with an
ACCEPT verdict. Rows: send-to-receive time without the rule, with it (one packet at a time,
so the figure includes the policy's work), the policy's share, and the rate one core sustains
with batches of 64. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from wgjit.addr import parse_networks
from wgjit.capture.iptables import QueueRules
from wgjit.capture.nfqueue import Held, NfQueue
from wgjit.device import DeviceState, PeerConfig, PeerState, PeerStats, SnapshotDump, StatsDump
from wgjit.events import EventLog
from wgjit.gateway.core import GatewayConfig, Policy
from wgjit.gateway.effects import Verdict, run_inline
from wgjit.handshake import Responder, Timestamp, build_initiation
from wgjit.keys import PrivateKey, PublicKey
from wgjit.lab import percentile
from wgjit.store import open_store

PORT = 51820
PEERS = 200
INNER = "WGJIT_HOLD_COST_INNER"


class InstalledDevice:
    """A device that already has every peer (only `read()` matters here)."""

    name = "bench0"

    def __init__(self, key: PrivateKey, peers: Iterable[PublicKey]) -> None:
        self.key = key
        self.peers = {k: PeerState(k) for k in peers}

    def read(self, peers: bool = True) -> DeviceState:
        return DeviceState(self.name, self.key, PORT, dict(self.peers) if peers else {})

    def handshakes(self) -> dict[PublicKey, float]:
        return dict.fromkeys(self.peers, 0.0)

    def stats(self) -> dict[PublicKey, PeerStats]:
        return dict.fromkeys(self.peers, (0.0, 0, 0, None))

    def stats_dump(self) -> StatsDump:
        return SnapshotDump(self.stats())

    def set_peer(self, config: PeerConfig) -> None:
        pass

    def set_peers(self, configs: Sequence[PeerConfig]) -> None:
        pass

    def remove_peers(self, keys: Iterable[PublicKey]) -> None:
        pass

    def identity(self) -> object:
        return id(self)

    def close(self) -> None:
        pass


def inner(n: int) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    gw_key = PrivateKey.generate()
    clients = [PrivateKey.generate() for _ in range(PEERS)]
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{Path(tmp) / 'peers.db'}")
        for i, c in enumerate(clients):
            store.add_peer(f"p{i}", c.public_key(), parse_networks(f"100.64.{i // 250}.{i % 250}"))
        config = GatewayConfig(per_source_rate=1e9, per_source_burst=1e9, global_rate=1e9,
                               global_burst=1e9, completion="hold")  # fmt: skip
        device = InstalledDevice(gw_key, (c.public_key() for c in clients))
        gw = Policy(Responder(gw_key), config, EventLog(io.StringIO()), wall=time.time)
        now = time.monotonic
        run_inline(
            gw.reconcile(device.handshakes(), now()),
            lambda e, r, err: gw.on_done(e, r, err, now()),
            store,
            device,
        )

        def judge(batch: list[Held]) -> None:
            """The policy's verdicts for installed peers: no store or device call."""
            for e in gw.on_knocks([(h.knock, h) for h in batch], now()):
                assert isinstance(e, Verdict), e
                queue.verdict(e.ticket, e.outcome.accepts)  # type: ignore[arg-type]

        t0 = time.time()
        packets = [
            build_initiation(clients[i % PEERS], gw_key.public_key(),
                             timestamp=Timestamp.from_unix(t0 + i * 0.02))
            for i in range(n)
        ]  # fmt: skip
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", PORT))
        rx.settimeout(1.0)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dst = ("127.0.0.1", PORT)

        def one_way(pkt: bytes, queue: NfQueue | None) -> float:
            t = time.perf_counter()
            tx.sendto(pkt, dst)
            if queue is not None:
                while True:
                    select.select([queue], [], [], 1.0)
                    held = queue.recv_batch()
                    if held:
                        break
                judge(held)
                queue.flush()
            rx.recv(256)
            return (time.perf_counter() - t) * 1e6

        base = [one_way(p, None) for p in packets]
        handle_us: list[float] = []
        rules = QueueRules(PORT, PORT, "bench0")
        with NfQueue(PORT, PORT) as queue:
            rules.install()
            try:
                held_us = [one_way(p, queue) for p in packets]
                # the policy alone, on fresh packets of the same peers
                later = [
                    build_initiation(clients[i % PEERS], gw_key.public_key(),
                                     timestamp=Timestamp.from_unix(t0 + 100 + i * 0.02))
                    for i in range(n)
                ]  # fmt: skip
                from wgjit.addr import Endpoint
                from wgjit.capture.packet import Knock

                src, dst_ep = Endpoint.parse("127.0.0.1:40000"), Endpoint.parse("127.0.0.1:51820")
                for p in later:
                    k = Knock(src, dst_ep, p, 1, time.monotonic())
                    t = time.perf_counter()
                    [v] = gw.on_knocks([(k, k)], now())
                    handle_us.append((time.perf_counter() - t) * 1e6)
                    assert isinstance(v, Verdict) and v.outcome == "already_installed", v
                # throughput: bursts of 64
                burst = [
                    build_initiation(clients[i % PEERS], gw_key.public_key(),
                                     timestamp=Timestamp.from_unix(t0 + 200 + i * 0.02))
                    for i in range(n)
                ]  # fmt: skip
                t = time.perf_counter()
                done = 0
                for k in range(0, n, 64):
                    chunk = burst[k : k + 64]
                    for p in chunk:
                        tx.sendto(p, dst)
                    got = 0
                    while got < len(chunk):
                        select.select([queue], [], [], 1.0)
                        held = queue.recv_batch()
                        judge(held)
                        got += len(held)
                        queue.flush()
                    for _ in chunk:
                        rx.recv(256)
                    done += len(chunk)
                rate = done / (time.perf_counter() - t)
                counts = dict(gw.counters)
            finally:
                rules.remove()
        store.close()

    def row(name: str, v: list[float]) -> str:
        return f"| {name} | {statistics.median(v):.0f} | {percentile(v, 99):.0f} |"

    print(f"{n} initiations of {PEERS} installed peers, loopback, one core; outcomes {counts}")
    print()
    print("| path of one initiation | median µs | p99 µs |")
    print("|---|---|---|")
    print(row("no queue (invert/replay mode, or no gateway)", base))
    print(row("hold mode: queue + policy + ACCEPT verdict", held_us))
    print(row("of which the policy (`Policy.on_knocks`, already installed)", handle_us))
    print()
    added = statistics.median(held_us) - statistics.median(base)
    print(f"added per handshake, median: {added:.0f} µs; "
          f"p99: {percentile(held_us, 99) - percentile(base, 99):.0f} µs")  # fmt: skip
    print(f"sustained with batches of 64: {rate:,.0f} initiations/s through the queue")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packets", type=int, default=2000)
    args = ap.parse_args()
    if os.environ.get(INNER):
        inner(args.packets)
        return
    if os.geteuid() != 0:
        sys.exit("needs root (a network namespace, iptables, NFQUEUE)")
    ns = f"wjb-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        r = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, __file__, "--packets", str(args.packets)],
            env={**os.environ, INNER: "1"},
        )
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    sys.exit(r.returncode)


if __name__ == "__main__":
    main()
