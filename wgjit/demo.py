"""`wgjit demo`: a live walk-through in throwaway network namespaces, on wireguard-go.

A gateway with no peers, stock clients, an SQLite store in a temporary directory, and the real
`wgjit gateway` process. Everything it creates is removed at the end, even on Ctrl-C.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from wgjit.addr import parse_networks
from wgjit.lab import (
    GatewayProcess,
    Host,
    Lab,
    LabError,
    first_ping,
    measure_connects,
    preinstall,
    summary,
    wait_for,
)
from wgjit.store import open_store

DEMO_IDLE_TIMEOUT = 6.0


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(n: int, total: int, text: str) -> None:
    _say(f"\n[{n}/{total}] {text}")


def _peer_table(gw: Host, names: dict[str, str]) -> None:
    peers = gw.peers()
    if not peers:
        _say("      gateway peer table: (empty)")
        return
    _say("      gateway peer table:")
    now = time.time()
    for key, p in peers.items():
        hs = int(p["latest_handshake"])
        ago = f"handshake {now - hs:.0f}s ago" if hs else "no handshake yet"
        _say(f"        {names.get(key, key[:8]):<8} endpoint {p['endpoint']:<22} {ago}")


def run_demo(connects: int = 20) -> int:
    total = 7
    try:
        with tempfile.TemporaryDirectory(prefix="wgjit-demo-") as tmp, Lab() as lab:
            return _demo(lab, f"sqlite:///{Path(tmp) / 'peers.db'}", connects, total)
    except LabError as e:
        print(f"wgjit: error: demo failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; lab cleaned up", file=sys.stderr)
        return 130


def _demo(lab: Lab, store_url: str, connects: int, total: int) -> int:
    _say("wgjit demo: just-in-time WireGuard peers, live in network namespaces")
    _step(1, total, "Building the lab: a gateway running wireguard-go with NO peers, and "
          "stock wireguard-go clients on a LAN (IPv4 198.18.0.0/24, IPv6 fd18::/64)")  # fmt: skip
    gw = lab.add_gateway()
    alice, bob, mallory = lab.add_client(), lab.add_client(), lab.add_client()
    dave = lab.add_client(v6=True)
    names = {c.public_key.b64(): n for c, n in
             [(alice, "alice"), (bob, "bob"), (mallory, "mallory"), (dave, "dave")]}  # fmt: skip
    _say(f"      gateway {gw.ns}: {gw.ifname} {gw.tunnel_ip}/24 listening on :51820")
    _peer_table(gw, names)

    _step(2, total, f"Peers live in the store ({store_url}), not in the kernel")
    with open_store(store_url) as store:
        for c, n in [(alice, "alice"), (bob, "bob"), (dave, "dave")]:
            store.add_peer(n, c.public_key, parse_networks(c.tunnel_ip))
            _say(f"      wgjit peer add {n:<5} --allowed-ips {c.tunnel_ip}/32 --public-key ...")
    _say("      mallory is NOT in the store")

    _step(3, total, f"Starting `wgjit gateway --interface {gw.ifname}` (idle timeout "
                    f"{DEMO_IDLE_TIMEOUT:g}s for the demo)")  # fmt: skip
    g = lab.start_gateway(
        store_url, "--idle-timeout", str(DEMO_IDLE_TIMEOUT), "--sweep-interval", "1",
        "--testing-short-timers",
    )  # fmt: skip
    mode = g.events("ready")[-1].get("mode", "?")
    _say(f"      ready, mode={mode}: " + _MODES.get(mode, ""))

    _step(4, total, "Clients knock: the first ping of each is their first packet ever")
    for c, n in [(alice, "alice"), (bob, "bob"), (dave, "dave")]:
        rtt = c.ping(gw.tunnel_ip, timeout=7)
        via = "IPv6" if c.use_v6 else "IPv4"
        ev = g.wait_event("install", peer=n)
        _say(f"      {n:<5} ({via}) first reply after {rtt} ms  <- gateway installed it in "
             f"{ev.get('took_ms')} ms from endpoint {ev.get('endpoint')}")  # fmt: skip
    _peer_table(gw, names)

    _step(5, total, "Refusals: an unknown key never reaches the kernel")
    rtt = mallory.ping(gw.tunnel_ip, timeout=2)
    ev = g.wait_event("reject", reason="unknown")
    _say(f"      mallory ping: {'no reply' if rtt is None else rtt}; gateway: reject "
         f"reason={ev['reason']} key={ev.get('key')} source={ev.get('source')}")  # fmt: skip
    _say(f"      mallory on the device: {mallory.public_key.b64() in gw.peers()}")

    _step(6, total, "Revocation and idle eviction")
    bob.connect_to(gw)  # a fresh session: bob knocks and is installed again if idle-evicted
    bob.ping(gw.tunnel_ip, timeout=2)
    t0 = time.monotonic()
    with open_store(store_url) as store:
        store.revoke("bob")
    g.wait_event("evict", peer="bob", reason="revoked")
    _say(f"      wgjit peer revoke bob -> evicted from the device after "
         f"{(time.monotonic() - t0) * 1000:.0f} ms")  # fmt: skip
    bob.connect_to(gw)  # bob knocks again with a new session
    rtt = bob.ping(gw.tunnel_ip, timeout=1)
    ev = g.wait_event("reject", peer="bob", reason="revoked")
    _say(f"      bob knocks again: {'no reply' if rtt is None else 'reply!'}; gateway: reject "
         f"reason={ev['reason']} peer=bob")  # fmt: skip
    _say(f"      waiting for dave to be idle for {DEMO_IDLE_TIMEOUT:g}s ...")
    g.wait_event("evict", timeout=DEMO_IDLE_TIMEOUT + 10, peer="dave", reason="idle")
    _say("      dave evicted (idle); his next knock installs him again:")
    dave.connect_to(gw)  # as if his session had expired
    _say(f"      dave first reply after {dave.ping(gw.tunnel_ip, timeout=7)} ms")
    wait_for("dave back on the device", lambda: dave.public_key.b64() in gw.peers())
    _peer_table(gw, names)

    _stop(g)

    _step(7, total, f"First-ping latency by mode, {connects} fresh connects each (same run)")
    _say("      (without wgjit's handshake completion a new peer waits for the client's 5 s retry)")
    preinstall(alice, gw, store_url, "bench-pre")  # a plain gateway: no wgjit running
    pre = [first_ping(alice, gw) for _ in range(connects)]
    _say(f"      pre-installed peer   : {summary(pre)}")
    for m in ("hold", "replay", "invert"):
        g = lab.start_gateway(store_url, "--mode", m)
        try:
            jit = measure_connects(alice, gw, store_url, connects, jit=True, prefix=f"bench-{m}")
        finally:
            g.stop()
        extra = statistics.median(jit) - statistics.median(pre)
        _say(f"      JIT, {m:<6} mode    : {summary(jit)}   ({extra:+.1f} ms median)")

    _say("\nDone; removing the lab's namespaces and processes.")
    return 0


_MODES = {
    "hold": "each initiation waits in an NFQUEUE until its peer is installed, then goes on",
    "replay": "initiations are captured and re-sent to the device once the peer is installed",
    "invert": "initiations are captured; once installed the gateway initiates back",
}


def _stop(g: GatewayProcess) -> None:
    g.stop()
    stats = g.events("stopping")
    if stats:
        shown = {k: v for k, v in stats[-1].items() if k not in ("ts", "level", "event")}
        _say("      gateway counters: " + " ".join(f"{k}={v}" for k, v in shown.items()))
