"""What idle eviction and herd installs cost on the device: read() vs handshakes() vs
stats() (what a sweep reads since per-peer traffic is kept), set_peer one by one vs set_peers
batched.

    sudo .venv/bin/python benchmarks/device_read.py [--peers 65536] [--batch 2000] [--rounds 5]

Part 1 (root, wireguard-go): one wireguard-go gateway in a network namespace of its own (the
lab's `wjl-TAG-gw`, removed at the end, also on failure). On the empty device, `--batch` new
peers (endpoint + one /32, as the gateway installs them) are added with set_peer one by one and
with one set_peers; then the role-inversion keepalive-off update (update_only) of those peers,
one by one and batched. Then the device is filled to `--peers` and the time of one `get=1`
(raw bytes, no parsing), read(), handshakes() and stats() is measured; all rows in
interleaved rounds, medians reported. Peak Python memory of read(), handshakes() and stats()
(tracemalloc, result included) is measured once each, apart from the timings, and so is the
longest time a 1 ms ticker thread (standing in for the gateway's packet loop) was kept
waiting for the GIL meanwhile.

Part 2 (no root, no kernel): the netlink parsers on an in-memory dump of `--netlink-peers`
peers laid out like the kernel's (key, preshared key, handshake time, keepalive, counters,
protocol version, endpoint, one /32), in 32 KiB messages: DumpParser (read()) vs
HandshakeParser (handshakes()) vs StatsParser (stats()), parsing only; the kernel's own dump
time comes on top.
`--netlink-only` runs just this part.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import platform
import socket
import statistics
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from wgjit.addr import Endpoint
from wgjit.device import PeerConfig
from wgjit.device.netlink import (
    WGDEVICE_A_PEERS,
    WGPEER_A_ALLOWEDIPS,
    WGPEER_A_ENDPOINT,
    WGPEER_A_LAST_HANDSHAKE_TIME,
    WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
    WGPEER_A_PRESHARED_KEY,
    WGPEER_A_PUBLIC_KEY,
    WGPEER_A_RX_BYTES,
    WGPEER_A_TX_BYTES,
    DumpParser,
    HandshakeParser,
    StatsParser,
    _attr,
    _nest,
    encode_endpoint,
)
from wgjit.device.uapi import UAPIDevice, uapi_socket_path
from wgjit.keys import PublicKey

LOAD_CHUNK = 8192  # peers per set_peers while filling the device
# an install during a sweep: when it starts, and the pause between the sweep's chunks
SWEEP_INSTALL_DELAYS = (0.0, 0.05, 0.1, 0.2, 0.4)
SWEEP_CHUNK_PAUSE = 0.01


def _key() -> PublicKey:
    return PublicKey(os.urandom(32))  # any 32 bytes will do for a peer that never connects


def _config(i: int, key: PublicKey) -> PeerConfig:
    ip = ipaddress.IPv4Network((0x0A000000 + i, 32))  # 10.0.0.0/8, one /32 per peer
    return PeerConfig(key, Endpoint(ipaddress.IPv4Address("198.18.0.2"), 1024 + i % 60000), (ip,))


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _peak_mb(fn: Callable[[], Any]) -> tuple[float, float]:
    """Peak and retained (the result) Python allocations of one call, MB."""
    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak / 1e6, retained / 1e6


def _max_stall(fn: Callable[[], Any]) -> float:
    """The longest another Python thread (one that sleeps 1 ms in a loop, like an event loop
    waiting for packets) was kept from running while `fn` ran in this one: the GIL."""
    stop = threading.Event()
    worst = 0.0

    def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.001)
            last = now

    t = threading.Thread(target=ticker)
    t.start()
    try:
        time.sleep(0.05)
        fn()
    finally:
        stop.set()
        t.join()
    return worst


def _raw_get(ifname: str) -> int:
    """One `get=1` on a fresh connection, bytes only (what any reader pays at least)."""
    n = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(uapi_socket_path(ifname)))
        s.sendall(b"get=1\n\n")
        last = b""
        while last != b"\n\n":
            chunk = s.recv(1 << 16)
            if not chunk:
                raise RuntimeError("wireguard-go closed the connection")
            n += len(chunk)
            last = (last + chunk)[-2:]
    return n


def _install_during_sweep(dev: UAPIDevice, delay: float, pause: float) -> tuple[float, float]:
    """One new peer installed `delay` s after a sweep's stats_dump started, while another
    thread takes the dump in chunks of 4 096 peers, `pause` s apart (the gateway's loop
    handling a chunk before it asks for the next): how long the install took, and the sweep."""
    dump = dev.stats_dump()
    swept = 0.0

    def sweep() -> None:
        nonlocal swept
        t = time.perf_counter()
        while not dump.done:
            dump.take(4096)
            time.sleep(pause)
        swept = time.perf_counter() - t

    thread = threading.Thread(target=sweep)
    thread.start()
    try:
        time.sleep(delay)
        config = _config(0, _key())
        took = _timed(lambda: dev.set_peer(config))
    finally:
        thread.join()
    dev.remove_peers([config.public_key])
    return took, swept


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:,.0f} ms"


def uapi_part(peers: int, batch: int, rounds: int) -> list[tuple[str, str]]:
    from wgjit.lab import Lab  # root and wireguard-go only needed here

    rows: list[tuple[str, str]] = []
    with Lab(wg="go") as lab:
        gw = lab.add_gateway()
        with UAPIDevice(gw.ifname) as dev:
            one: list[float] = []
            batched: list[float] = []
            upd_one: list[float] = []
            upd_batched: list[float] = []
            for r in range(rounds):
                a = [_config(i, _key()) for i in range(batch)]
                b = [_config(i, _key()) for i in range(batch)]
                off = [PeerConfig(c.public_key, persistent_keepalive=0, update_only=True)
                       for c in a]  # fmt: skip
                off_b = [PeerConfig(c.public_key, persistent_keepalive=0, update_only=True)
                         for c in b]  # fmt: skip
                # alternate which goes first, so drift hits both alike
                order = [("one", a), ("batched", b)][:: 1 if r % 2 == 0 else -1]
                for how, configs in order:
                    if how == "one":
                        one.append(_timed(lambda cs=configs: [dev.set_peer(c) for c in cs]))
                    else:
                        batched.append(_timed(lambda cs=configs: dev.set_peers(cs)))
                updates = [(upd_one, lambda o=off: [dev.set_peer(c) for c in o]),
                           (upd_batched, lambda o=off_b: dev.set_peers(o))]  # fmt: skip
                for sink, fn in updates[:: 1 if r % 2 == 0 else -1]:
                    sink.append(_timed(fn))
                dev.remove_peers([c.public_key for c in a + b])
            rows += [
                (f"add {batch:,} peers, set_peer one by one", _ms(one) +
                 f" ({batch / statistics.median(one):,.0f} peers/s)"),
                (f"add {batch:,} peers, one set_peers", _ms(batched) +
                 f" ({batch / statistics.median(batched):,.0f} peers/s)"),
                (f"update_only (keepalive off) {batch:,} peers, one by one", _ms(upd_one) +
                 f" ({batch / statistics.median(upd_one):,.0f} peers/s)"),
                (f"update_only (keepalive off) {batch:,} peers, one set_peers", _ms(upd_batched) +
                 f" ({batch / statistics.median(upd_batched):,.0f} peers/s)"),
            ]  # fmt: skip

            t = time.perf_counter()
            for start in range(0, peers, LOAD_CHUNK):
                dev.set_peers(
                    [_config(i, _key()) for i in range(start, min(peers, start + LOAD_CHUNK))]
                )
            load_s = time.perf_counter() - t
            rows.append((f"fill to {peers:,} peers (set_peers, {LOAD_CHUNK:,} per call)",
                         f"{load_s:.1f} s ({peers / load_s:,.0f} peers/s)"))  # fmt: skip

            raw: list[float] = []
            full: list[float] = []
            hs: list[float] = []
            st: list[float] = []
            size = 0
            for r in range(rounds):
                steps: list[tuple[list[float], Callable[[], Any]]] = [
                    (raw, lambda: _raw_get(gw.ifname)),
                    (full, dev.read),
                    (hs, dev.handshakes),
                    (st, dev.stats),
                ]
                for sink, fn in steps[:: 1 if r % 2 == 0 else -1]:
                    gc.collect()
                    sink.append(_timed(fn))
            size = _raw_get(gw.ifname)
            got = dev.handshakes()
            if len(got) != peers or len(dev.read().peers) != peers:
                raise RuntimeError(f"expected {peers} peers, handshakes() saw {len(got)}")
            del got
            read_peak, read_kept = _peak_mb(dev.read)
            hs_peak, hs_kept = _peak_mb(dev.handshakes)
            st_peak, st_kept = _peak_mb(dev.stats)
            read_stall = [_max_stall(dev.read) for _ in range(rounds)]
            hs_stall = [_max_stall(dev.handshakes) for _ in range(rounds)]
            st_stall = [_max_stall(dev.stats) for _ in range(rounds)]
            # room for one install on a full device (wireguard-go refuses the 65 537th)
            dev.remove_peers([next(iter(dev.handshakes()))])
            waits, sweeps = [], []
            for _ in range(rounds):
                for delay in SWEEP_INSTALL_DELAYS:
                    took, swept = _install_during_sweep(dev, delay, SWEEP_CHUNK_PAUSE)
                    waits.append(took)
                    sweeps.append(swept)
            rows += [
                (f"`get=1` with {peers:,} peers, raw bytes only ({size / 1e6:.1f} MB)", _ms(raw)),
                (f"read() with {peers:,} peers", _ms(full)),
                (f"handshakes() with {peers:,} peers", _ms(hs)),
                (f"stats() with {peers:,} peers", _ms(st)),
                ("read(): peak Python memory (result kept)",
                 f"{read_peak:.0f} MB ({read_kept:.0f} MB)"),
                ("handshakes(): peak Python memory (result kept)",
                 f"{hs_peak:.0f} MB ({hs_kept:.0f} MB)"),
                ("stats(): peak Python memory (result kept)",
                 f"{st_peak:.0f} MB ({st_kept:.0f} MB)"),
                ("read() in a thread: longest stall of another thread (median, max)",
                 f"{statistics.median(read_stall) * 1e3:.1f} ms, {max(read_stall) * 1e3:.1f} ms"),
                ("handshakes() in a thread: longest stall of another thread (median, max)",
                 f"{statistics.median(hs_stall) * 1e3:.1f} ms, {max(hs_stall) * 1e3:.1f} ms"),
                ("stats() in a thread: longest stall of another thread (median, max)",
                 f"{statistics.median(st_stall) * 1e3:.1f} ms, {max(st_stall) * 1e3:.1f} ms"),
                (f"set_peer (one new peer) while a sweep takes the dump, {len(waits)} installs"
                 f" {'/'.join(f'{d * 1e3:g}' for d in SWEEP_INSTALL_DELAYS)} ms into it"
                 " (median, max; the sweep's median)",
                 f"{statistics.median(waits) * 1e3:.1f} ms, {max(waits) * 1e3:.1f} ms;"
                 f" {_ms(sweeps)}"),
            ]  # fmt: skip
    return rows


# -- part 2: netlink parsers on a synthetic dump ----------------------------------------------


def kernel_dump(n: int, message_size: int = 32 * 1024) -> list[bytes]:
    """Dump messages (attributes after the genl header) with `n` peers as the kernel lays
    them out; a peer that would not fit starts the next message."""
    ep = encode_endpoint(Endpoint.parse("198.18.0.2:51821"))
    messages: list[bytes] = []
    nests: list[bytes] = []
    size = 0
    for i in range(n):
        ip = _nest(0, (_attr(1, struct.pack("=H", socket.AF_INET)),
                       _attr(2, struct.pack("!I", 0x0A000000 + i)), _attr(3, b"\x20")))  # fmt: skip
        peer = _nest(0, (
            _attr(WGPEER_A_PUBLIC_KEY, os.urandom(32)),
            _attr(WGPEER_A_PRESHARED_KEY, bytes(32)),
            _attr(WGPEER_A_LAST_HANDSHAKE_TIME, struct.pack("=qq", 1_700_000_000 + i, i)),
            _attr(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, struct.pack("=H", 0)),
            _attr(WGPEER_A_TX_BYTES, struct.pack("=Q", 148)),
            _attr(WGPEER_A_RX_BYTES, struct.pack("=Q", 92)),
            _attr(10, struct.pack("=I", 1)),
            _attr(WGPEER_A_ENDPOINT, ep),
            _nest(WGPEER_A_ALLOWEDIPS, [ip]),
        ))  # fmt: skip
        if nests and size + len(peer) > message_size:
            messages.append(_nest(WGDEVICE_A_PEERS, nests))
            nests, size = [], 0
        nests.append(peer)
        size += len(peer)
    if nests:
        messages.append(_nest(WGDEVICE_A_PEERS, nests))
    return messages


def netlink_part(peers: int, rounds: int) -> list[tuple[str, str]]:
    messages = kernel_dump(peers)
    total = sum(len(m) for m in messages)

    def full() -> object:
        p = DumpParser("bench")
        for m in messages:
            p.feed(memoryview(m))
        return p.result()

    def lean() -> object:
        p = HandshakeParser("bench")
        for m in messages:
            p.feed(memoryview(m))
        return p.result()

    def stats() -> object:
        p = StatsParser("bench")
        for m in messages:
            p.feed(memoryview(m))
        return p.result()

    t_full: list[float] = []
    t_lean: list[float] = []
    t_stats: list[float] = []
    for r in range(rounds):
        steps = [(t_full, full), (t_lean, lean), (t_stats, stats)]
        for sink, fn in steps[:: 1 if r % 2 == 0 else -1]:
            gc.collect()
            sink.append(_timed(fn))
    full_peak, full_kept = _peak_mb(full)
    lean_peak, lean_kept = _peak_mb(lean)
    stats_peak, stats_kept = _peak_mb(stats)
    return [
        (f"netlink dump of {peers:,} peers, parse only ({len(messages):,} messages, "
         f"{total / 1e6:.1f} MB): DumpParser (read())", _ms(t_full)),
        ("same dump: HandshakeParser (handshakes())", _ms(t_lean)),
        ("same dump: StatsParser (stats())", _ms(t_stats)),
        ("DumpParser: peak Python memory (result kept)",
         f"{full_peak:.0f} MB ({full_kept:.0f} MB)"),
        ("HandshakeParser: peak Python memory (result kept)",
         f"{lean_peak:.0f} MB ({lean_kept:.0f} MB)"),
        ("StatsParser: peak Python memory (result kept)",
         f"{stats_peak:.0f} MB ({stats_kept:.0f} MB)"),
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=65536, help="wireguard-go device size")
    ap.add_argument("--batch", type=int, default=2000, help="peers per set_peer/set_peers row")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--netlink-peers", type=int, default=100_000)
    ap.add_argument("--netlink-only", action="store_true", help="skip part 1 (no root needed)")
    args = ap.parse_args()
    if not 0 < args.batch * 2 <= args.peers <= 65536:
        ap.error("need 0 < 2 * --batch <= --peers <= 65536 (wireguard-go's maximum)")
    rows = [] if args.netlink_only else uapi_part(args.peers, args.batch, args.rounds)
    rows += netlink_part(args.netlink_peers, args.rounds)
    print(f"Python {platform.python_version()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; medians of {args.rounds} rounds")  # fmt: skip
    print("\n| operation | figure |\n|---|---|")
    for a, b in rows:
        print(f"| {a} | {b} |")


if __name__ == "__main__":
    main()
