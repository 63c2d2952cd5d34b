"""Load generator for a wgjit (or plain WireGuard) gateway in a lab network namespace.

    sudo .venv/bin/python -m benchmarks.loadgen --make-keys 10000 /tmp/lg.keys
    .venv/bin/wgjit --store ... peer import /tmp/lg.keys.csv
    sudo .venv/bin/python -m benchmarks.loadgen --gateway-netns wjl-TAG-gw --interface wjTAGg \\
        --keys /tmp/lg.keys --clients 10000 --spread 1 [--addresses 10] \\
        [--flood unknown,bad_mac1,spoofed --flood-rate 50000 --flood-seconds 5] [--json out.json]

Where it sends, and only there: a gateway address in the lab's underlay (198.18.0.0/24 or
fd18::/64, see wgjit/lab.py) reached from a network namespace of its own that it creates
(`wjlg-PID`), plugged into the bridge `br0` of the gateway namespace it is given; it refuses
any other target, and any gateway namespace without that bridge and address. For many source
addresses it routes 198.18.128.0/17 (RFC 2544 benchmarking space, never routed anywhere) from
the gateway namespace to its own: 198.18.128.0/18 are its clients' addresses (a local route,
so sockets bind to any of them), 198.18.192.0/18 the sources of spoofed packets (nobody
there: answers to them die in its namespace). Everything it adds is removed on exit.

What it sends:
- clients: one socket (source address and port) per stored peer, `--clients N` of them behind
  `--addresses M` addresses (default: one address each, a failover herd; fewer: a crowd behind
  NAT), each sending one valid initiation at a time spread evenly over `--spread` seconds. Like
  a stock client: a cookie reply is opened and its cookie goes into mac2 of that peer's next
  initiation; an unanswered initiation is retried after 5 s (+ up to 1/3 s jitter), at most
  `--retries` times. Per peer: the time from its first initiation to the first handshake
  response (type 2) whose receiver index is one of its sender indexes.
- a flood at `--flood-rate` pkt/s for `--flood-seconds`, the kinds of `--flood` in turn:
  `unknown` (valid mac1, made-up static keys, from `--flood-sources` sockets), `bad_mac1`
  (random bytes after a valid header, same sockets), `replay` (copies of earlier valid
  initiations of stored peers, same sockets), `malformed` (wrong sizes, types, reserved
  bytes), `spoofed` (forgeries of stored keys: the static key of a stored peer, a timestamp
  the sender cannot encrypt, from random spoofed addresses and ports through a raw socket).
  A flood packet differs from the last one of its kind (sender index, hence mac1), so the
  gateway's duplicate filter does not make it free. Unknown and spoofed floods cycle through
  `--flood-pool` distinct initiations (default 64), made before the flood starts.

Every run is bounded: `--max-seconds` (default 60) and `--max-packets` (default 2 000 000).
Output: Markdown (counts per kind, answered within 2 s / at all, latency percentiles), and
with `--json FILE` the same as JSON (tests read it).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import heapq
import ipaddress
import json
import os
import random
import resource
import selectors
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wgjit.addr import Endpoint
from wgjit.capture.replay import build_datagram
from wgjit.cookie import add_mac2, open_cookie_reply
from wgjit.handshake import (
    MAC_SIZE,
    OFF_MAC1,
    OFF_MAC2,
    OFF_SENDER_INDEX,
    OFF_TIMESTAMP,
    Timestamp,
    build_initiation,
)
from wgjit.keys import PrivateKey, PublicKey

LAB_V4 = ipaddress.ip_network("198.18.0.0/24")
LAB_V6 = ipaddress.ip_network("fd18::/64")
ROUTED = ipaddress.ip_network("198.18.128.0/17")  # from the gateway namespace to ours
CLIENT_NET = ipaddress.ip_network("198.18.128.0/18")  # our clients' source addresses
SPOOF_NET = ipaddress.ip_network("198.18.192.0/18")  # spoofed sources (nobody lives there)
OUR_ADDRESS = "198.18.0.250"  # our end of the veth on the lab bridge
GATEWAY_PORT = 51820
REKEY_TIMEOUT = 5.0  # WireGuard's retry of an unanswered initiation
REKEY_JITTER = 1 / 3
ANSWER_WINDOW = 2.0  # the yardstick: answered within 2 s of the first initiation
MSG_RESPONSE, MSG_COOKIE = 2, 3
RESPONSE_SIZE, COOKIE_REPLY_SIZE = 92, 64
FLOOD_KINDS = ("unknown", "bad_mac1", "replay", "malformed", "spoofed")
_MAC1_LABEL = b"mac1----"
_INDEX = struct.Struct("<I")
CLONE_NEWNET = 0x40000000


class LoadgenError(RuntimeError):
    pass


# -- keys ------------------------------------------------------------------------------------


def make_keys(n: int, path: Path) -> Path:
    """`n` new private keys in `path` (base64, one a line, mode 0600) and `path`.csv for
    `wgjit peer import` (name lg-I, allowed IP 10.0.0.0/8 + I). Returns the CSV's path."""
    if not 0 < n <= 1 << 20:
        raise LoadgenError("--make-keys: 1 to 2**20 keys")
    keys = [PrivateKey.generate() for _ in range(n)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.writelines(k.b64() + "\n" for k in keys)
    csv_path = path.with_name(path.name + ".csv")
    with csv_path.open("w") as f:
        f.write("name,public_key,allowed_ips\n")
        for i, k in enumerate(keys):
            f.write(f"lg-{i},{k.public_key().b64()},{ipaddress.IPv4Address(0x0A000000 + i)}/32\n")
    return csv_path


def read_keys(path: Path) -> list[PrivateKey]:
    return [PrivateKey.from_b64(line.strip()) for line in path.read_text().split() if line]


# -- the namespace ---------------------------------------------------------------------------


def _run(*argv: str, check: bool = True) -> str:
    p = subprocess.run(argv, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise LoadgenError(f"{' '.join(argv)}: {p.stderr.strip()}")
    return p.stdout


def check_target(target: str, gateway_ns: str) -> None:
    """Refuse anything but a lab underlay address that the gateway namespace owns."""
    addr = ipaddress.ip_address(target)
    if addr not in LAB_V4 and addr not in LAB_V6:
        raise LoadgenError(f"refusing {target}: only the lab underlay {LAB_V4} / {LAB_V6}")
    if addr.version == 6:
        raise LoadgenError("IPv6 targets are not supported yet (the per-source pool is IPv4)")
    out = _run("ip", "-n", gateway_ns, "-o", "addr", "show", "dev", "br0")
    if f" {target}/" not in out:
        raise LoadgenError(f"{target} is not on br0 in namespace {gateway_ns}: not a lab gateway")


@contextlib.contextmanager
def load_namespace(gateway_ns: str) -> Iterator[str]:
    """A namespace of our own on the lab bridge, with routes for our source pools; removed
    (with the gateway namespace's route) on exit."""
    ns = f"wjlg-{os.getpid()}"
    outer = f"vlg{os.getpid()}"[:15]
    _run("ip", "netns", "add", ns)
    routed = False
    try:
        _run("ip", "link", "add", outer, "netns", gateway_ns, "type", "veth", "peer", "name",
             "eth0", "netns", ns)  # fmt: skip
        _run("ip", "-n", gateway_ns, "link", "set", outer, "master", "br0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "addr", "add", f"{OUR_ADDRESS}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "route", "add", "local", str(CLIENT_NET), "dev", "lo")
        # a namespace of an earlier run had our address with another MAC: forget it, or the
        # gateway's answers go to a dead MAC until its neighbour entry is probed again (~5 s)
        _run("ip", "-n", gateway_ns, "neigh", "flush", "to", OUR_ADDRESS, check=False)
        _run("ip", "-n", gateway_ns, "route", "add", str(ROUTED), "via", OUR_ADDRESS)
        routed = True
        yield ns
    finally:
        if routed:
            _run("ip", "-n", gateway_ns, "route", "del", str(ROUTED), check=False)
        _run("ip", "-n", gateway_ns, "neigh", "flush", "to", OUR_ADDRESS, check=False)
        _run("ip", "netns", "delete", ns, check=False)


def enter_namespace(ns: str) -> None:
    """Move this (single-threaded) process into network namespace `ns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{ns}") as f:
        if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
            raise LoadgenError(f"setns {ns}: {os.strerror(ctypes.get_errno())}")


# -- packets ---------------------------------------------------------------------------------


def _mac1_key(responder: PublicKey) -> bytes:
    return hashlib.blake2s(_MAC1_LABEL + responder.raw).digest()


class Reindexer:
    """Copies of an initiation with a new sender index and a matching mac1 (one BLAKE2s)."""

    def __init__(self, responder: PublicKey) -> None:
        self._mac = hashlib.blake2s(key=_mac1_key(responder), digest_size=MAC_SIZE)

    def __call__(self, packet: bytes, index: int) -> bytes:
        body = bytearray(packet[:OFF_MAC1])
        _INDEX.pack_into(body, OFF_SENDER_INDEX, index)
        h = self._mac.copy()
        h.update(body)
        return bytes(body) + h.digest() + bytes(MAC_SIZE)


def forge(victim: PublicKey, responder: PublicKey) -> bytes:
    """An initiation claiming `victim`'s static key by one who lacks its private key: the
    static key is encrypted properly (that needs only the ephemeral key), the timestamp is
    noise. Uses the handshake module's own primitives (whitepaper section 5.4.2)."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from wgjit import handshake as hs

    eph = PrivateKey.generate()
    epub = eph.public_key().raw
    ck = hs._hmac(hs._hmac(hs._CK0, epub), hs._ONE)
    h = hs._hash(hs._initial_hash(responder), epub)
    ck, key = hs._kdf2(ck, eph.exchange(responder))
    enc_static = ChaCha20Poly1305(key).encrypt(hs._ZERO_NONCE, victim.raw, h)
    body = b"\x01\x00\x00\x00" + os.urandom(4) + epub + enc_static
    body += os.urandom(OFF_MAC1 - OFF_TIMESTAMP)
    return body + hs._mac(hs._mac1_key(responder), body) + bytes(MAC_SIZE)


def malformed_packets() -> list[bytes]:
    """Shapes a gateway must shrug off: wrong sizes, types and reserved bytes."""
    r = os.urandom
    return [
        b"\x01\x00\x00\x00" + r(143),  # 147 bytes
        b"\x01\x00\x00\x00" + r(145),  # 149 bytes
        b"\x01\x00\x01\x00" + r(144),  # reserved bytes set
        b"\x02\x00\x00\x00" + r(144),  # a 148-byte "response"
        b"\x04\x00\x00\x00" + r(28),  # a short data packet
        b"",
        r(1),
        b"\x01" + r(1400),
    ]


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Peer:
    n: int
    key: PrivateKey
    sock: socket.socket
    attempts: list[bytes] = field(default_factory=list)  # prebuilt initiations
    sent_at: list[float] = field(default_factory=list)
    first: float = 0.0
    answered: float | None = None
    answered_attempt: int = -1
    cookie: bytes | None = None
    cookies: int = 0
    mac2_sent: int = 0


@dataclass
class Config:
    target: str
    gateway_key: PublicKey
    port: int = GATEWAY_PORT
    keys: Sequence[PrivateKey] = ()
    clients: int = 0
    addresses: int = 0  # 0: one per client
    spread: float = 1.0
    start_after: float = 0.0  # clients begin this long after the flood
    retries: int = 2
    flood: Sequence[str] = ()
    flood_rate: float = 0.0
    flood_seconds: float = 0.0
    flood_sources: int = 1
    flood_pool: int = 64
    max_seconds: float = 60.0
    max_packets: int = 2_000_000
    seed: int | None = None


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def q(p: float) -> float:
        k = max(0, min(len(s) - 1, -(-len(s) * p // 100) - 1))
        return round(s[int(k)] * 1000, 1)

    return {"p50_ms": q(50), "p90_ms": q(90), "p99_ms": q(99), "max_ms": round(s[-1] * 1000, 1)}


def run(cfg: Config) -> dict[str, Any]:
    """Send what `cfg` says from the current namespace (see load_namespace); the report."""
    rng = random.Random(cfg.seed)
    if cfg.clients > len(cfg.keys):
        raise LoadgenError(f"--clients {cfg.clients}: only {len(cfg.keys)} keys")
    n_addr = cfg.addresses or cfg.clients
    if n_addr > CLIENT_NET.num_addresses - 2:
        raise LoadgenError(f"at most {CLIENT_NET.num_addresses - 2} client addresses")
    bad_kinds = set(cfg.flood) - set(FLOOD_KINDS)
    if bad_kinds:
        raise LoadgenError(f"unknown flood kinds {sorted(bad_kinds)}; choose from {FLOOD_KINDS}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = cfg.clients + cfg.flood_sources + 64
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    gw = (cfg.target, cfg.port)
    reindex = Reindexer(cfg.gateway_key)
    sel = selectors.DefaultSelector()
    by_index: dict[int, tuple[Peer, int]] = {}
    used_idx: set[int] = set()

    def new_index() -> int:
        while True:
            i = rng.getrandbits(32)
            if i not in used_idx:
                used_idx.add(i)
                return i

    def bind(addr: str) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        s.bind((addr, 0))
        s.setblocking(False)
        return s

    # prebuild everything that costs X25519 before the clock starts
    t_build = time.monotonic()
    addrs = [str(CLIENT_NET.network_address + 1 + i) for i in range(n_addr)]
    wall0 = time.time()
    peers: list[Peer] = []
    for i in range(cfg.clients):
        p = Peer(i, cfg.keys[i], bind(addrs[i % n_addr]))
        for a in range(cfg.retries + 1):
            idx = new_index()
            # strictly increasing timestamps, as a client's retries carry
            ts = Timestamp.from_unix(wall0 + a * 0.1)
            p.attempts.append(
                build_initiation(p.key, cfg.gateway_key, timestamp=ts, sender_index=idx)
            )
            by_index[idx] = (p, a)
        sel.register(p.sock, selectors.EVENT_READ, p)
        peers.append(p)
    flood_socks = [bind(OUR_ADDRESS) for _ in range(cfg.flood_sources if cfg.flood else 0)]
    for s in flood_socks:
        sel.register(s, selectors.EVENT_READ, None)
    unknown_pool = [
        build_initiation(PrivateKey.generate(), cfg.gateway_key) for _ in range(cfg.flood_pool)
    ] if "unknown" in cfg.flood else []  # fmt: skip
    victims = [k.public_key() for k in cfg.keys[: max(1, min(len(cfg.keys), 64))]]
    forged_pool = [
        forge(victims[i % len(victims)], cfg.gateway_key) for i in range(cfg.flood_pool)
    ] if "spoofed" in cfg.flood else []  # fmt: skip
    if "spoofed" in cfg.flood and not cfg.keys:
        raise LoadgenError("spoofed forgeries need stored keys (--keys)")
    # replays are copies of initiations that were answered (so seen and accepted) before: a
    # peer's first initiation once it is answered; until one is, replay turns send nothing
    replay_pool: list[bytes] = []
    if "replay" in cfg.flood and not cfg.clients:
        raise LoadgenError("replays copy the clients' answered initiations: need --clients")
    malformed = malformed_packets()
    raw = None
    if "spoofed" in cfg.flood:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    # a spoofed datagram: built once by build_datagram, then source, port and payload patched
    # in; the kernel fills in the IP header checksum (IP_HDRINCL), UDP's is 0 ("none", IPv4)
    spoof0 = Endpoint.parse(f"{SPOOF_NET.network_address + 1}:1")
    template = bytearray(build_datagram(spoof0, Endpoint.parse(f"{cfg.target}:{cfg.port}"),
                                        bytes(148)))  # fmt: skip
    build_s = time.monotonic() - t_build

    sent: Counter[str] = Counter()
    send_errors: Counter[str] = Counter()
    received: Counter[str] = Counter()
    heap: list[tuple[float, int, int]] = []  # (due, peer, attempt)
    t0 = time.monotonic() + 0.05
    c_start = t0 + cfg.start_after
    for p in peers:
        due = c_start + (p.n * cfg.spread / cfg.clients if cfg.clients else 0)
        heapq.heappush(heap, (due, p.n, 0))
    flood_end = t0 + cfg.flood_seconds if cfg.flood and cfg.flood_rate > 0 else t0
    hard_end = t0 + cfg.max_seconds
    flood_sent = 0
    kind_cycle = list(cfg.flood)
    total = 0
    last_send: dict[int, float] = {}

    def send_attempt(p: Peer, a: int, now: float) -> None:
        pkt = p.attempts[a]
        if p.cookie is not None:
            pkt = add_mac2(pkt, p.cookie)
            p.mac2_sent += 1
        try:
            p.sock.sendto(pkt, gw)
            sent["valid" if a == 0 else "valid_retry"] += 1
        except OSError as e:
            send_errors[f"valid:{e.errno}"] += 1
        if a == 0:
            p.first = now
        p.sent_at.append(now)
        if a < cfg.retries:
            heapq.heappush(heap, (now + REKEY_TIMEOUT + rng.random() * REKEY_JITTER, p.n, a + 1))
        else:
            heapq.heappush(heap, (now + REKEY_TIMEOUT, p.n, -1))  # the end of its wait

    def send_flood(kind: str, k: int) -> None:
        idx = rng.getrandbits(32)
        try:
            if kind == "unknown":
                flood_socks[k % len(flood_socks)].sendto(
                    reindex(unknown_pool[k % len(unknown_pool)], idx), gw)  # fmt: skip
            elif kind == "bad_mac1":
                flood_socks[k % len(flood_socks)].sendto(
                    b"\x01\x00\x00\x00" + os.urandom(144), gw)  # fmt: skip
            elif kind == "replay":
                if not replay_pool:
                    return
                flood_socks[k % len(flood_socks)].sendto(replay_pool[k % len(replay_pool)], gw)
            elif kind == "malformed":
                flood_socks[k % len(flood_socks)].sendto(malformed[k % len(malformed)], gw)
            else:
                assert raw is not None
                payload = reindex(forged_pool[k % len(forged_pool)], idx)
                src = SPOOF_NET.network_address + 1 + (idx % (SPOOF_NET.num_addresses - 2))
                dgram = template
                dgram[12:16] = src.packed
                dgram[20:22] = struct.pack("!H", 1024 + idx % 60000)
                dgram[26:28] = b"\x00\x00"
                dgram[28:] = payload
                raw.sendto(dgram, (cfg.target, 0))
            sent[kind] += 1
        except OSError as e:
            send_errors[f"{kind}:{e.errno}"] += 1

    def on_packet(p: Peer | None, data: bytes, now: float) -> None:
        if len(data) == RESPONSE_SIZE and data[0] == MSG_RESPONSE:
            (idx,) = _INDEX.unpack_from(data, 8)
            hit = by_index.get(idx)
            if p is None:
                received["response_to_flood"] += 1  # an unknown key admitted: a bug
                return
            if hit is None or hit[0] is not p:
                received["response_unmatched"] += 1
                return
            received["response"] += 1
            if p.answered is None:
                p.answered = now
                p.answered_attempt = hit[1]
                if len(replay_pool) < 1024:
                    replay_pool.append(p.attempts[hit[1]])
        elif len(data) == COOKIE_REPLY_SIZE and data[0] == MSG_COOKIE:
            received["cookie_reply" if p is not None else "cookie_reply_to_flood"] += 1
            if p is None:
                return
            (idx,) = _INDEX.unpack_from(data, 4)
            hit = by_index.get(idx)
            if hit is None or hit[0] is not p:
                received["cookie_unmatched"] += 1
                return
            mac1 = p.attempts[hit[1]][OFF_MAC1:OFF_MAC2]
            try:
                p.cookie = open_cookie_reply(data, cfg.gateway_key, mac1)
                p.cookies += 1
            except ValueError:
                received["cookie_bad"] += 1
        else:
            received["other"] += 1

    started = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= hard_end or total >= cfg.max_packets:
            break
        # clients due
        while heap and heap[0][0] <= now:
            _, n, a = heapq.heappop(heap)
            p = peers[n]
            if a < 0 or p.answered is not None:
                continue
            # a peer's initiations never closer than 20 ms (WireGuard refuses those)
            if now - last_send.get(n, -1.0) < 0.02:
                heapq.heappush(heap, (now + 0.02, n, a))
                continue
            last_send[n] = now
            send_attempt(p, a, now)
            total += 1
        # flood due (paced; at most 512 per turn so answers are still read)
        if now < flood_end:
            want = int((now - t0) * cfg.flood_rate) - flood_sent
            for _ in range(min(want, 512)):
                send_flood(kind_cycle[flood_sent % len(kind_cycle)], flood_sent // len(kind_cycle))
                flood_sent += 1
                total += 1
        pending_clients = any(p.answered is None for p in peers) and heap
        if not pending_clients and now >= flood_end:
            break
        nxt = min(heap[0][0] if heap else hard_end, hard_end)
        timeout = 0.0 if now < flood_end else max(0.0, nxt - time.monotonic())
        for key, _ in sel.select(min(timeout, 0.05)):
            sk = key.fileobj
            assert isinstance(sk, socket.socket)
            for _ in range(64):
                try:
                    data = sk.recv(2048)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    received[f"recv_error:{e.errno}"] += 1
                    break
                on_packet(key.data, data, time.monotonic())
    elapsed = time.monotonic() - started
    # late answers already in the socket buffers
    for key, _ in sel.select(0.2):
        sk = key.fileobj
        assert isinstance(sk, socket.socket)
        with contextlib.suppress(OSError):
            while True:
                on_packet(key.data, sk.recv(2048), time.monotonic())
    for p in peers:
        p.sock.close()
    for s in flood_socks:
        s.close()
    if raw is not None:
        raw.close()

    answered = [p for p in peers if p.answered is not None]
    lat = [p.answered - p.first for p in answered if p.answered is not None]
    flood_time = min(cfg.flood_seconds, elapsed) if cfg.flood else 0.0
    return {
        "target": f"{cfg.target}:{cfg.port}",
        "clients": cfg.clients,
        "addresses": n_addr if cfg.clients else 0,
        "spread_s": cfg.spread,
        "build_s": round(build_s, 2),
        "elapsed_s": round(elapsed, 2),
        "sent": dict(sent),
        "send_errors": dict(send_errors),
        "received": dict(received),
        "answered": len(answered),
        "answered_2s": sum(1 for x in lat if x <= ANSWER_WINDOW),
        "answered_first_attempt": sum(1 for p in answered if p.answered_attempt == 0),
        "answered_by_attempt": dict(Counter(str(p.answered_attempt) for p in answered)),
        "peers_with_cookie": sum(1 for p in peers if p.cookies),
        "mac2_sent": sum(p.mac2_sent for p in peers),
        "latency": _percentiles(lat),
        "answered_keys": [p.key.public_key().b64() for p in answered],
        "flood": list(cfg.flood),
        "flood_rate_asked": cfg.flood_rate,
        "flood_rate_sent": round(flood_sent / flood_time) if flood_time > 0 else 0,
        "flood_sent": flood_sent,
    }


def markdown(r: dict[str, Any]) -> str:
    lines = [f"| what | value |", "|---|---|"]  # noqa: F541
    n = r["clients"]
    if n:
        pct = 100 * r["answered_2s"] / n
        lines += [
            f"| clients (stored peers) | {n} behind {r['addresses']} addresses, "
            f"spread over {r['spread_s']:g} s |",
            f"| answered within 2 s | {r['answered_2s']} ({pct:.1f} %) |",
            f"| answered at all | {r['answered']} ({100 * r['answered'] / n:.1f} %) |",
            f"| answered on the first initiation | {r['answered_first_attempt']} |",
            f"| peers that got a cookie reply | {r['peers_with_cookie']} "
            f"(initiations sent with mac2: {r['mac2_sent']}) |",
        ]
        lat = r["latency"]
        if lat:
            lines.append(
                f"| latency (first initiation to response) | p50 {lat['p50_ms']} ms, "
                f"p90 {lat['p90_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms |"
            )
    if r["flood"]:
        lines.append(
            f"| flood | {', '.join(r['flood'])}: {r['flood_sent']} packets, asked "
            f"{r['flood_rate_asked']:g}/s, sent {r['flood_rate_sent']}/s |"
        )
    for k, v in sorted(r["sent"].items()):
        lines.append(f"| sent: {k} | {v} |")
    for k, v in sorted(r["received"].items()):
        lines.append(f"| received: {k} | {v} |")
    for k, v in sorted(r["send_errors"].items()):
        lines.append(f"| send error: {k} | {v} |")
    lines.append(f"| run | {r['elapsed_s']} s (prebuilding packets: {r['build_s']} s) |")
    return "\n".join(lines)


def _gateway_key(args: argparse.Namespace) -> PublicKey:
    if args.gateway_key:
        return PublicKey.from_b64(args.gateway_key)
    if not args.interface:
        raise LoadgenError("--gateway-key or --interface (read with wg show) is needed")
    out = _run("ip", "netns", "exec", args.gateway_netns, "wg", "show", args.interface,
               "public-key")  # fmt: skip
    return PublicKey.from_b64(out.strip())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--make-keys", nargs=2, metavar=("N", "FILE"),
                    help="write N private keys to FILE (0600), FILE.csv to import")  # fmt: skip
    ap.add_argument("--gateway-netns", help="the lab's gateway namespace (has br0)")
    ap.add_argument("--target", default="198.18.0.1", help="gateway address (lab underlay)")
    ap.add_argument("--port", type=int, default=GATEWAY_PORT)
    ap.add_argument("--gateway-key", help="gateway public key (base64)")
    ap.add_argument("--interface", help="or read it from this WireGuard interface")
    ap.add_argument("--keys", type=Path, help="private key file (--make-keys)")
    ap.add_argument("--clients", type=int, default=0, help="stored peers that knock (default 0)")
    ap.add_argument("--addresses", type=int, default=0,
                    help="source addresses of the clients (default: one each)")  # fmt: skip
    ap.add_argument("--spread", type=float, default=1.0, help="seconds the first knocks span")
    ap.add_argument("--start-after", type=float, default=0.0,
                    help="clients begin this long after the flood starts")  # fmt: skip
    ap.add_argument("--retries", type=int, default=2, help="client retries (5 s apart)")
    ap.add_argument("--flood", default="", help=f"comma-separated kinds: {','.join(FLOOD_KINDS)}")
    ap.add_argument("--flood-rate", type=float, default=0.0, help="packets per second")
    ap.add_argument("--flood-seconds", type=float, default=0.0)
    ap.add_argument("--flood-sources", type=int, default=1, help="sockets of the plain floods")
    ap.add_argument("--flood-pool", type=int, default=64,
                    help="distinct initiations the unknown and spoofed floods cycle through, "
                         "each resent under fresh sender indexes (made before the flood: about "
                         "75 us each)")  # fmt: skip
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--max-packets", type=int, default=2_000_000)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    try:
        if args.make_keys:
            csv_path = make_keys(int(args.make_keys[0]), Path(args.make_keys[1]))
            print(f"wrote {args.make_keys[1]} (0600) and {csv_path}")
            return 0
        if not args.gateway_netns:
            raise LoadgenError("--gateway-netns is required")
        if os.geteuid() != 0:
            raise LoadgenError("needs root (namespaces, raw sockets)")
        if not 0 < args.max_seconds <= 600:
            raise LoadgenError("--max-seconds: 0 to 600")
        if args.flood_seconds > args.max_seconds:
            raise LoadgenError("--flood-seconds exceeds --max-seconds")
        check_target(args.target, args.gateway_netns)
        cfg = Config(
            target=args.target, gateway_key=_gateway_key(args), port=args.port,
            keys=read_keys(args.keys) if args.keys else (), clients=args.clients,
            addresses=args.addresses, spread=args.spread, start_after=args.start_after,
            retries=args.retries, flood=[k for k in args.flood.split(",") if k],
            flood_rate=args.flood_rate, flood_seconds=args.flood_seconds,
            flood_sources=args.flood_sources, flood_pool=args.flood_pool,
            max_seconds=args.max_seconds, max_packets=args.max_packets, seed=args.seed,
        )  # fmt: skip
        with load_namespace(args.gateway_netns) as ns:
            enter_namespace(ns)
            report = run(cfg)
    except LoadgenError as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    print(markdown(report), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
