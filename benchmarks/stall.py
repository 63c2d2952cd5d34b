"""How long the packet path is blocked while the gateway starts (reconcile) and sweeps, at N
installed peers on wireguard-go; and the gateway's memory.

    sudo .venv/bin/python -m benchmarks.stall --peers 10000 [--store sqlite|postgresql]

A lab (wgjit/lab.py): a wireguard-go gateway whose device already holds N peers (one
`wg addconf`), all of them in the store (`import_peers`), so the gateway's reconcile keeps them
all. A probe in a client namespace sends valid initiations (wgjit.handshake.build_initiation)
for PROBE_PEERS of those installed peers, each from its own source address (under the
gateway's per-source limit) and each peer 80 ms apart (over WireGuard's 20 ms flood limit),
--rate per second in all, and times each until the device answers it (a handshake response, or
a cookie reply when the device is under load: either way the initiation got through). It runs
from before the gateway starts until --sweep-cycles sweep intervals after `ready`.

"Blocked" for one initiation sent at t: from t until the device's first answer to it or to any
initiation sent after it (an initiation lost after a long hold is no evidence that the path
was free). Reported per window: before the gateway starts (the device alone), from the start
to 1 s after `ready` (reconcile; hold mode's queue rules), and the sweep cycles after that.
The gateway's memory from /proc/PID/status: VmRSS sampled every 0.5 s, VmHWM at the end.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.e2e.bulk import bulk_peers, load_device, load_store
from tests.pgserver import PostgresServer
from wgjit.handshake import Timestamp, build_initiation
from wgjit.keys import PrivateKey, PublicKey
from wgjit.lab import GATEWAY_PORT, UNDERLAY_V4, Lab, lab_flavour, percentile, time_factor

PROBE_PEERS = 16
PROBE_SOURCE_BASE = 100  # probe peer j sends from UNDERLAY_V4.(100 + j)
PEER_SPACING_S = 0.08
MAX_RUN_S = 900.0  # the probe stops by itself after this, whatever happens
SETTLE_S = 1.0  # after `ready`, before the sweep window
TAIL_S = 10.0  # probing goes on after the last window, so its blocked times end in an answer
MSG_RESPONSE, MSG_COOKIE = 2, 3


# -- the probe (runs in the client namespace) ------------------------------------------------


def probe(spec: dict[str, Any]) -> None:
    """Send initiations until SIGTERM or spec['max_s']; then print one JSON list of
    [send_monotonic, answer_monotonic or null, answer type or null] per initiation."""
    responder = PublicKey.from_b64(spec["gateway_key"])
    dest = (spec["gateway"], GATEWAY_PORT)
    peers = [PrivateKey.from_b64(k) for k in spec["keys"]]
    socks = []
    for src in spec["sources"]:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src, 0))
        s.setblocking(False)
        socks.append(s)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    interval = 1.0 / spec["rate"]
    max_count = int(spec["rate"] * spec["max_s"]) + 1
    sent: list[list[Any]] = []  # [send, answer, type]; the sender index is the list index
    last_ts = [0.0] * len(peers)
    start = time.monotonic()
    next_send = start
    print("ready", flush=True)
    while not stop and len(sent) < max_count and time.monotonic() - start < spec["max_s"]:
        now = time.monotonic()
        if now >= next_send:
            j = len(sent) % len(peers)
            # strictly increasing per peer: WireGuard refuses an old or equal timestamp
            t = max(time.time(), last_ts[j] + 0.017)
            last_ts[j] = t
            packet = build_initiation(
                peers[j], responder, timestamp=Timestamp.from_unix(t), sender_index=len(sent)
            )
            sent.append([time.monotonic(), None, None])
            with contextlib.suppress(OSError):
                socks[j].sendto(packet, dest)
            next_send += interval
            if next_send < now - 1.0:  # fell behind (a stopped process): do not burst
                next_send = now
        ready, _, _ = select.select(socks, [], [], max(0.0, next_send - time.monotonic()))
        got = time.monotonic()
        for s in ready:
            for _ in range(64):
                try:
                    data = s.recv(2048)
                except BlockingIOError:
                    break
                if len(data) >= 12 and data[0] in (MSG_RESPONSE, MSG_COOKIE):
                    # response: sender, receiver; cookie reply: receiver (our sender index)
                    off = 8 if data[0] == MSG_RESPONSE else 4
                    (idx,) = struct.unpack_from("<I", data, off)
                    if idx < len(sent) and sent[idx][1] is None:
                        sent[idx][1], sent[idx][2] = got, data[0]
    json.dump(sent, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()


# -- the driver ------------------------------------------------------------------------------


@dataclass
class Window:
    name: str
    sent: int
    answered: int
    blocked_max_ms: float
    blocked_p99_ms: float
    censored: bool  # some initiation never saw an answer after it: the max is a lower bound


def blocked_times(rows: list[list[Any]], run_end: float) -> list[tuple[float, float, bool]]:
    """(send time, blocked s, censored) per initiation, in send order."""
    out: list[tuple[float, float, bool]] = []
    first_answer_after = float("inf")
    for send, answer, _ in reversed(rows):
        if answer is not None:
            first_answer_after = min(first_answer_after, answer)
        if first_answer_after == float("inf"):
            out.append((send, run_end - send, True))
        else:
            out.append((send, first_answer_after - send, False))
    out.reverse()
    return out


def window(name: str, rows: list[list[Any]], run_end: float, t0: float, t1: float) -> Window:
    blocked = [b for b in blocked_times(rows, run_end) if t0 <= b[0] < t1]
    inside = [r for r in rows if t0 <= r[0] < t1]
    ms = [b * 1000 for _, b, _ in blocked] or [0.0]
    return Window(
        name,
        len(inside),
        sum(1 for r in inside if r[1] is not None),
        max(ms),
        percentile(ms, 99),
        any(c for _, _, c in blocked),
    )


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


def wall_to_mono(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp() - (time.time() - time.monotonic())


def run(n: int, store: str, rate: float, sweep_interval: float, cycles: int) -> str:
    keys = [PrivateKey.generate() for _ in range(PROBE_PEERS)]
    peers = bulk_peers(n, keys=[k.public_key() for k in keys])
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wgjit-stall-")))
        if store == "postgresql":
            srv = stack.enter_context(PostgresServer({"shared_buffers": "'512MB'"}))
            url = srv.create_database("stall")
        else:
            url = f"sqlite:///{tmp / 'peers.db'}"
        lab = stack.enter_context(Lab())
        gw = lab.add_gateway()
        client = lab.add_client()
        sources = [f"{UNDERLAY_V4}.{PROBE_SOURCE_BASE + j}" for j in range(PROBE_PEERS)]
        for src in sources:
            client.run("ip", "addr", "add", f"{src}/24", "dev", "eth0")
        device_s = load_device(gw, peers, tmp / "peers.conf")
        store_s = load_store(url, peers)
        print(f"{n} peers loaded: device {device_s:.1f} s, store {store_s:.1f} s", file=sys.stderr)

        spec = {
            "gateway_key": gw.public_key.b64(),
            "gateway": gw.underlay_v4,
            "keys": [k.b64() for k in keys],
            "sources": sources,
            "rate": rate,
            "max_s": MAX_RUN_S,
        }
        repo = Path(__file__).resolve().parent.parent
        prober = subprocess.Popen(
            ["ip", "netns", "exec", client.ns, sys.executable, "-m", "benchmarks.stall",
             "--probe"],
            cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        stack.callback(prober.kill)  # a no-op once it has exited
        assert prober.stdin is not None and prober.stdout is not None
        prober.stdin.write(json.dumps(spec) + "\n")  # keys on a pipe, not on a command line
        prober.stdin.close()
        if prober.stdout.readline().strip() != "ready":
            raise RuntimeError("the probe did not start")
        probe_start = time.monotonic()
        time.sleep(3.0)  # the device alone: a baseline

        peak = {"VmRSS": 0}
        sampling = threading.Event()
        gw_start = time.monotonic()
        # under emulation (WGJIT_LAB_TIME_FACTOR) every step is that much slower: so is the
        # queue delay that means load (the probe does not answer cookie replies)
        g = lab.start_gateway(
            url, "--mode", "hold", "--sweep-interval", f"{sweep_interval:g}",
            "--load-delay", f"{0.25 * time_factor():g}",
        )  # fmt: skip  # waits for `ready` (60 s at most)
        pid = g.proc.pid  # `ip netns exec` execs the gateway: same pid

        rises: list[tuple[float, int]] = []  # (when, VmRSS): each new maximum, after `ready`

        def sample() -> None:
            while not sampling.wait(0.5):
                rss = rss_kib(pid).get("VmRSS", 0)
                if rss > peak["VmRSS"]:
                    peak["VmRSS"] = rss
                    rises.append((time.monotonic(), rss))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        ready = wall_to_mono(g.events("ready")[-1]["ts"])
        reconcile = g.events("reconcile")
        kept = reconcile[-1].get("kept") if reconcile else "?"
        rss_ready = rss_kib(pid)
        sweep_start = ready + SETTLE_S
        sweep_end = sweep_start + cycles * sweep_interval
        time.sleep(max(0.0, sweep_end + TAIL_S - time.monotonic()))
        mem = rss_kib(pid)
        sampling.set()
        sampler.join()
        prober.send_signal(signal.SIGTERM)
        out = prober.stdout.read()
        prober.wait(30)
        run_end = time.monotonic()
        sweeps = [e for e in g.events("sweep") if sweep_start <= wall_to_mono(e["ts"]) < sweep_end]
        # what the gateway did after `ready` besides knocks and installs, beside its memory
        # (a re-check of every claim after a long reconcile costs memory too, not a sweep)
        happened = [
            (
                wall_to_mono(e["ts"]) - ready,
                e["event"] + ("" if e["event"] != "sweep" else f" ({e.get('took_ms')} ms)"),
            )
            for e in g.events()
            if e.get("event") in ("sweep", "reassert_claims", "sweep_failed", "lost", "stats")
            and wall_to_mono(e["ts"]) > ready
        ]
        assert g.stop() == 0, "\n".join(g.lines[-20:])
    rows: list[list[Any]] = json.loads(out)
    start_name = f"start + reconcile ({ready - gw_start:.1f} s to `ready`) + {SETTLE_S:g} s"
    windows = [
        window("device alone (no gateway)", rows, run_end, probe_start + 0.5, gw_start),
        window(start_name, rows, run_end, gw_start, sweep_start),
        window(f"{cycles} sweep cycles ({sweep_interval:g} s each)", rows, run_end,
               sweep_start, sweep_end),
    ]  # fmt: skip
    lines = [
        f"{n} installed peers ({'wireguard-go' if lab_flavour() == 'go' else 'kernel WireGuard'}),"
        f" {store} store, reconcile kept {kept};"
        f" probe {rate:g} initiations/s; {platform.node()}, load average"
        f" {os.getloadavg()[0]:.1f}",
        "",
        "| window | sent | answered | blocked max ms | blocked p99 ms |",
        "|---|---|---|---|---|",
    ]
    for w in windows:
        bound = "≥ " if w.censored else ""
        lines.append(f"| {w.name} | {w.sent} | {w.answered} | {bound}{w.blocked_max_ms:.1f}"
                     f" | {w.blocked_p99_ms:.1f} |")  # fmt: skip
    lines += [
        "",
        f"gateway memory: VmRSS {rss_ready.get('VmRSS', 0) / 1024:.0f} MiB at `ready`"
        f" (VmHWM then {rss_ready.get('VmHWM', 0) / 1024:.0f} MiB: start-up's peak),"
        f" max sampled {peak['VmRSS'] / 1024:.0f} MiB, {mem.get('VmRSS', 0) / 1024:.0f} MiB"
        f" at the end (RssAnon {mem.get('RssAnon', 0) / 1024:.0f} MiB, RssFile"
        f" {mem.get('RssFile', 0) / 1024:.0f} MiB: libraries); VmHWM"
        f" {mem.get('VmHWM', 0) / 1024:.0f} MiB",
        # (a memory figure says what a sweep holds only if a sweep ran whole in the window)
        "after `ready`: "
        + "; ".join(
            [f"+{t:.1f} s {what}" for t, what in happened]
            + [f"+{t - ready:.1f} s VmRSS {kib / 1024:.0f} MiB" for t, kib in rises]
        ),
        f"sweeps finished in the sweep window: {len(sweeps)}"
        + "".join(
            f"; {e.get('peers')} peers in {int(e.get('took_ms', 0)) / 1000:.1f} s"
            f"{'' if e.get('complete') in (True, 'true') else ' (incomplete)'}"
            for e in sweeps
        ),
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=10_000,
                    help="installed peers (<= 65536 on wireguard-go)")  # fmt: skip
    ap.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--rate", type=float, default=200.0, help="probe initiations per second")
    ap.add_argument("--sweep-interval", type=float, default=15.0, help="the gateway's")
    ap.add_argument("--sweep-cycles", type=int, default=2, help="sweep intervals measured")
    # internal: be the probe (its JSON spec on standard input)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe(json.loads(sys.stdin.readline()))
        return 0
    limit = 65536 if lab_flavour() == "go" else 1_000_000  # wireguard-go's limit
    if not PROBE_PEERS <= args.peers <= limit:
        ap.error(f"--peers must be {PROBE_PEERS}..{limit}")
    if not 1 <= args.rate <= PROBE_PEERS / PEER_SPACING_S:
        ap.error(f"--rate must be 1..{PROBE_PEERS / PEER_SPACING_S:g}")
    if not 1 <= args.sweep_cycles * args.sweep_interval <= 300:
        ap.error("--sweep-cycles x --sweep-interval must be 1..300 s")
    # a stopped benchmark still removes its namespaces and processes (the with-blocks)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(run(args.peers, args.store, args.rate, args.sweep_interval, args.sweep_cycles))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
