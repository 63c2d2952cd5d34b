"""Kernel WireGuard at scale through the netlink backend: install N peers, evict them all.

Run as root in a kernel with WireGuard, e.g. the qemu guest of tests/kernel (see
docs/benchmarks.md, "Kernel WireGuard (qemu TCG)", for the exact command):

    .venv/bin/python benchmarks/kernel_scale.py --peers 100000 --sample 2000

Creates one kernel WireGuard interface of its own (`wjscale<pid>`, in the current network
namespace) and deletes it at the end. Measures, in this order: JIT installs on an empty
device (endpoint + one /32, then the role-inversion keepalive on/off: what the gateway does per
knock); one-by-one installs (a sample); batched installs up to N (set_peers); a full read with
N peers (what an idle sweep cost before handshakes()); handshakes() with N peers (what an idle
sweep needs); JIT installs with N peers present; one-by-one removals (a sample,
extrapolated to N); one batched removal of all the rest. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from wgjit.addr import Endpoint
from wgjit.device import PeerConfig
from wgjit.device.netlink import NetlinkDevice
from wgjit.keys import PrivateKey, PublicKey

JIT_SAMPLES = 200


@dataclass
class Result:
    peers: int
    sample: int
    jit_empty_ms_median: float
    jit_empty_ms_p99: float
    install_one_by_one_per_s: float
    install_batched_per_s: float
    read_full_s: float
    handshakes_s: float
    jit_full_ms_median: float
    jit_full_ms_p99: float
    remove_one_by_one_per_s: float
    remove_one_by_one_extrapolated_s: float
    remove_batched_s: float
    remove_batched_per_s: float
    remove_batched_peers: int


def _key() -> PublicKey:
    # any 32 bytes are a valid X25519 public key; the kernel still does its per-peer DH
    return PublicKey(os.urandom(32))


def _config(i: int, key: PublicKey) -> PeerConfig:
    ip = ipaddress.IPv4Network((0x0A000000 + i, 32))  # 10.0.0.0/8, one /32 per peer
    return PeerConfig(key, Endpoint(ipaddress.IPv4Address("198.18.0.2"), 1024 + i % 60000), (ip,))


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))]


def _jit(dev: NetlinkDevice, first_index: int, samples: int) -> tuple[list[float], list[PublicKey]]:
    """What the gateway does per knock: install with endpoint and allowed IPs, then the
    role-inversion keepalive on and off. Returns ms per knock and the keys added."""
    times, keys = [], []
    for i in range(samples):
        k = _key()
        t = time.perf_counter()
        dev.set_peer(_config(first_index + i, k))
        dev.set_peer(PeerConfig(k, persistent_keepalive=1, update_only=True))
        dev.set_peer(PeerConfig(k, persistent_keepalive=0, update_only=True))
        times.append((time.perf_counter() - t) * 1e3)
        keys.append(k)
    return times, keys


def run(peers: int, sample: int, log: Callable[[str], None] = print) -> Result:
    if sample > peers // 2:
        raise ValueError("--sample must be at most half of --peers")
    ifname = f"wjscale{os.getpid() % 100000}"
    subprocess.run(["ip", "link", "add", ifname, "type", "wireguard"], check=True)
    try:
        with NetlinkDevice(ifname) as dev:
            dev.configure(PrivateKey.generate(), 0)
            subprocess.run(["ip", "link", "set", ifname, "up"], check=True)
            return _measure(dev, peers, sample, log)
    finally:
        subprocess.run(["ip", "link", "del", ifname], check=False)


def _measure(dev: NetlinkDevice, n: int, sample: int, log: Callable[[str], None]) -> Result:
    jit_empty, jit_keys = _jit(dev, n, JIT_SAMPLES)
    dev.remove_peers(jit_keys)
    log(f"JIT install on an empty device: median {statistics.median(jit_empty):.2f} ms")

    keys = [_key() for _ in range(n)]
    t = time.perf_counter()
    for i in range(sample):
        dev.set_peer(_config(i, keys[i]))
    one_rate = sample / (time.perf_counter() - t)
    log(f"one-by-one install: {one_rate:.0f} peers/s ({sample} peers)")
    t = time.perf_counter()
    dev.set_peers([_config(i, keys[i]) for i in range(sample, n)])
    batch_rate = (n - sample) / (time.perf_counter() - t)
    log(f"batched install: {batch_rate:.0f} peers/s ({n - sample} peers)")

    t = time.perf_counter()
    state = dev.read()
    read_s = time.perf_counter() - t
    if len(state.peers) != n:
        raise RuntimeError(f"expected {n} peers on the device, read {len(state.peers)}")
    del state
    log(f"full read with {n} peers: {read_s:.2f} s")
    t = time.perf_counter()
    handshakes = dev.handshakes()
    handshakes_s = time.perf_counter() - t
    if len(handshakes) != n or any(handshakes.values()):
        raise RuntimeError(f"expected {n} peers that never shook hands, got {len(handshakes)}")
    del handshakes
    log(f"handshakes() with {n} peers: {handshakes_s:.2f} s")

    jit_full, jit_keys = _jit(dev, 2 * n, JIT_SAMPLES)
    dev.remove_peers(jit_keys)
    log(f"JIT install with {n} peers present: median {statistics.median(jit_full):.2f} ms")

    t = time.perf_counter()
    for k in keys[:sample]:
        dev.remove_peers([k])
    one_remove_rate = sample / (time.perf_counter() - t)
    log(f"one-by-one removal: {one_remove_rate:.0f} peers/s ({sample} peers)")
    rest = keys[sample:]
    t = time.perf_counter()
    dev.remove_peers(rest)
    batch_s = time.perf_counter() - t
    log(f"batched removal of {len(rest)} peers: {batch_s:.2f} s")
    if dev.read().peers:
        raise RuntimeError("peers left on the device after removing them all")
    return Result(
        peers=n,
        sample=sample,
        jit_empty_ms_median=statistics.median(jit_empty),
        jit_empty_ms_p99=_percentile(jit_empty, 99),
        install_one_by_one_per_s=one_rate,
        install_batched_per_s=batch_rate,
        read_full_s=read_s,
        handshakes_s=handshakes_s,
        jit_full_ms_median=statistics.median(jit_full),
        jit_full_ms_p99=_percentile(jit_full, 99),
        remove_one_by_one_per_s=one_remove_rate,
        remove_one_by_one_extrapolated_s=n / one_remove_rate,
        remove_batched_s=batch_s,
        remove_batched_per_s=len(rest) / batch_s,
        remove_batched_peers=len(rest),
    )


def table(r: Result) -> str:
    rows = [
        ("JIT install, empty device (set + keepalive on/off)",
         f"median {r.jit_empty_ms_median:.2f} ms, p99 {r.jit_empty_ms_p99:.2f} ms"),
        (f"JIT install, {r.peers:,} peers present",
         f"median {r.jit_full_ms_median:.2f} ms, p99 {r.jit_full_ms_p99:.2f} ms"),
        (f"install one by one ({r.sample:,} peers)", f"{r.install_one_by_one_per_s:,.0f} peers/s"),
        (f"install batched ({r.peers - r.sample:,} peers)",
         f"{r.install_batched_per_s:,.0f} peers/s"),
        (f"full read (dump) of {r.peers:,} peers", f"{r.read_full_s:.2f} s"),
        (f"handshakes() (same dump, key + time only) of {r.peers:,} peers",
         f"{r.handshakes_s:.2f} s"),
        (f"remove one by one ({r.sample:,} peers)", f"{r.remove_one_by_one_per_s:,.0f} peers/s"),
        (f"remove one by one, extrapolated to {r.peers:,}",
         f"~{r.remove_one_by_one_extrapolated_s:,.0f} s (estimate)"),
        (f"remove batched ({r.remove_batched_peers:,} peers)",
         f"{r.remove_batched_s:.2f} s ({r.remove_batched_per_s:,.0f} peers/s)"),
    ]  # fmt: skip
    return "\n".join(["| operation | figure |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=100_000)
    ap.add_argument("--sample", type=int, default=2000, help="peers measured one by one")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args()
    r = run(args.peers, args.sample)
    print(table(r))
    if args.json:
        print(json.dumps(asdict(r)))


if __name__ == "__main__":
    main()
