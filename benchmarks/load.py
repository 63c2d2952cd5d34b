"""Issue 10's load figures, side by side in one run: herd, crowd, floods (wireguard-go, hold mode,
SQLite). Uses benchmarks/loadgen.py against a lab gateway; prints Markdown for docs/benchmarks.md.

    sudo .venv/bin/python -m benchmarks.load [--herd 10000] [--crowd 1000 --crowd-addresses 10]
        [--flood-rate 50000 --flood-seconds 8 --flood-clients 20] [--rounds 1]
        [--profile DIR]   # py-spy record of the JIT gateway during each herd (raw stacks)

- herd: `--herd` stored peers, one source address each, knock within 1 s at (a) an empty JIT
  gateway, (b) plain wireguard-go with all of them pre-installed and no wgjit running;
- crowd: `--crowd` stored peers behind `--crowd-addresses` addresses knock within 1 s (JIT);
- floods: `--flood-rate` pkt/s of unknown keys, spoofed forgeries of stored keys, and bad mac1
  garbage (each from one source but the spoofed ones), while `--flood-clients` stock
  wireguard-go clients with new stored keys connect, one every 0.2 s from 1 s into the flood.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.loadgen import make_keys, read_keys
from wgjit.addr import parse_networks
from wgjit.keys import PrivateKey
from wgjit.lab import GatewayProcess, Host, Lab, percentile, wait_for
from wgjit.store import UnknownPeer, open_store

ROOT = Path(__file__).resolve().parents[1]
COUNTERS = ("installed", "already_installed", "cookie", "rate_limited", "timeout", "overloaded",
            "duplicate", "replay", "forged", "unknown", "negative_cached", "bad_mac1",
            "queue_accepted", "queue_dropped", "queue_overruns", "queue_expired",
            "loop_max_stall_ms", "installed_now", "stale", "queue_paced", "under_load",
            "verify_backlog", "queue_paced_max", "release_window", "release_inflight_max",
            "release_timeout_ms", "device_answers", "device_cookies", "release_unanswered",
            "release_late_answers", "release_backoffs", "reinjected", "source_limited",
            "reinject_missed", "device_cookies_resent", "running_late")  # fmt: skip


def loadgen(gw: Host, tmp: Path, *args: str) -> dict[str, Any]:
    out = tmp / "lg.json"
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.loadgen", "--gateway-netns", gw.ns,
         "--gateway-key", gw.public_key.b64(), "--json", str(out), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(f"loadgen failed: {p.stderr}")
    r: dict[str, Any] = json.loads(out.read_text())
    return r


def stats(g: GatewayProcess) -> dict[str, str]:
    before = len(g.events("stats"))
    g.proc.send_signal(signal.SIGUSR1)
    wait_for("stats line", lambda: len(g.events("stats")) > before, timeout=10)
    return g.events("stats")[-1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class CpuWatch:
    """Who had the CPUs while a herd was answered. Every 0.1 s: the machine's busy share
    (/proc/stat), the CPU time of the gateway, its verify workers, wireguard-go and the load
    generator (/proc/PID/stat), and the gateway's loop thread's time on a CPU and runnable
    but waiting for one (/proc/PID/task/PID/schedstat). `summary()` covers `window` seconds
    from when the gateway (plain: wireguard-go) starts working on the herd's first knocks."""

    TICK = 0.1
    GROUPS = ("gateway", "verify workers", "wireguard-go", "load generator")

    def __init__(self, ifname: str, gateway_pid: int | None, window: float = 1.0) -> None:
        self.ifname, self.pid, self.window = ifname, gateway_pid, window
        self.samples: list[tuple[float, list[int], dict[str, float], tuple[int, ...]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _groups(self) -> dict[str, float]:
        hz = os.sysconf("SC_CLK_TCK")
        out = dict.fromkeys(self.GROUPS, 0.0)
        for d in Path("/proc").iterdir():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                stat = (d / "stat").read_text()
            except (OSError, NotADirectoryError):
                continue
            if d.name == str(self.pid):
                group = "gateway"
            elif "wgjit.gateway.pool" in cmd:
                group = "verify workers"
            elif "wireguard-go" in cmd and self.ifname in cmd:
                group = "wireguard-go"
            elif "benchmarks.loadgen" in cmd:
                group = "load generator"
            else:
                continue
            f = stat[stat.rindex(")") + 2 :].split()
            out[group] += (int(f[11]) + int(f[12])) / hz
        return out

    def _run(self) -> None:
        loop = f"/proc/{self.pid}/task/{self.pid}/schedstat"
        while not self._stop.wait(self.TICK):
            cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
            try:
                sched = tuple(map(int, Path(loop).read_text().split()[:2])) if self.pid else ()
            except OSError:
                return
            self.samples.append((time.monotonic(), cpu, self._groups(), sched))

    def summary(self) -> str:
        self._stop.set()
        self._thread.join()
        s = self.samples

        def working(i: int) -> bool:  # over 30 % of a CPU in the tick up to sample i
            if self.pid:
                return s[i][3][0] - s[i - 1][3][0] > 0.3 * self.TICK * 1e9
            return s[i][2]["wireguard-go"] - s[i - 1][2]["wireguard-go"] > 0.3 * self.TICK

        start = next((i for i in range(1, len(s)) if working(i)), None)
        if start is None:
            return "CPU: the herd never reached the device"
        a = s[start - 1]
        b = next((x for x in s[start:] if x[0] - a[0] >= self.window), s[-1])
        secs = b[0] - a[0]
        ticks = [y - x for x, y in zip(a[1], b[1], strict=True)]
        ncpu = os.cpu_count() or 1
        busy = ncpu * 100 * (1 - (ticks[3] + ticks[4]) / sum(ticks))  # not idle or iowait
        groups = ", ".join(f"{k} {100 * (b[2][k] - a[2][k]) / secs:.0f} %" for k in self.GROUPS)
        out = (f"CPU over the herd's first {secs:.1f} s: the machine {busy:.0f} % of "
               f"{ncpu * 100} % (softirq {ncpu * 100 * ticks[6] / sum(ticks):.0f} %); {groups}")
        if self.pid:
            run, wait = ((y - x) / 1e7 / secs for x, y in zip(a[3], b[3], strict=True))
            out += (f"; the loop thread on a CPU {run:.0f} % of the time, runnable but "
                    f"waiting for a CPU {wait:.0f} %")  # fmt: skip
        return out


def clear_device(gw: Host, tmp: Path) -> None:
    """All peers off the device in one transaction (wg setconf replaces the peer list)."""
    conf = tmp / "empty.conf"
    conf.write_text(f"[Interface]\nPrivateKey = {gw.key.b64()}\nListenPort = 51820\n")
    gw.wg("setconf", gw.ifname, str(conf))


def preinstall_all(gw: Host, keys_file: Path, tmp: Path) -> float:
    conf = tmp / "add.conf"
    with conf.open("w") as f:
        for i, k in enumerate(read_keys(keys_file)):
            f.write(f"[Peer]\nPublicKey = {k.public_key().b64()}\n"
                    f"AllowedIPs = 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32\n")  # fmt: skip
    t = time.monotonic()
    gw.wg("addconf", gw.ifname, str(conf))
    return time.monotonic() - t


def nfqueue_stats(gw: Host) -> str:
    """The kernel's view of the gateway's queue: total held, dropped (queue full), dropped
    (netlink buffer full). /proc/net/netfilter/nfnetlink_queue, per namespace."""
    text = gw.run("cat", "/proc/net/netfilter/nfnetlink_queue").split()
    if len(text) < 7:
        return "no queue"
    return (f"kernel queue: queued {text[7]}, dropped full {text[5]}, dropped netlink "
            f"{text[6]}; backlog drops (softnet_stat, all CPUs) so far {softnet_drops()}")


def queued(gw: Host) -> int:
    """Packets the gateway's queue has taken so far (the kernel's id sequence); what it did
    not take while full passed to the device (fail-open)."""
    text = gw.run("cat", "/proc/net/netfilter/nfnetlink_queue").split()
    return int(text[7]) if len(text) > 7 else 0


def loop_cpu(pid: int) -> float:
    """Seconds the gateway's loop (main) thread has run on a CPU."""
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) / 1e9


def softnet_drops() -> int:
    """Packets the kernel dropped because a CPU's input backlog was full (veth delivers
    through it): the second column of /proc/net/softnet_stat, summed."""
    return sum(int(line.split()[1], 16)
               for line in Path("/proc/net/softnet_stat").read_text().splitlines())


def pct(n: int, d: int) -> str:
    return f"{100 * n / d:.1f} %" if d else "-"


def herd_row(name: str, r: dict[str, Any], s: dict[str, str] | None) -> str:
    n = r["clients"]
    lat = r["latency"] or {}
    extra = ""
    if s is not None:
        extra = ", ".join(f"{k}={s[k]}" for k in COUNTERS if k in s)
    return (
        f"| {name} | {n} / {r['addresses']} | {pct(r['answered_2s'], n)} | "
        f"{pct(r['answered'], n)} | {lat.get('p50_ms', '-')} / {lat.get('p99_ms', '-')} | "
        f"{r['peers_with_cookie']} | {extra or '(no wgjit)'} |"
    )


def profile(pid: int, out: Path, seconds: int) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(ROOT.parent.parent / "main/.venv/bin/py-spy")
    if not Path(spy).exists():
        spy = "/work/main/.venv/bin/py-spy"
    return subprocess.Popen(
        [spy, "record", "-d", str(seconds), "-f", "raw", "-o", str(out),
         "--pid", str(pid), "--threads", "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--herd", type=int, default=10000)
    ap.add_argument("--crowd", type=int, default=1000)
    ap.add_argument("--crowd-addresses", type=int, default=10)
    ap.add_argument("--flood-rate", type=float, default=50000)
    ap.add_argument("--flood-seconds", type=float, default=8)
    ap.add_argument("--flood-clients", type=int, default=20)
    ap.add_argument("--floods", default="unknown,spoofed,bad_mac1")
    ap.add_argument("--flood-pool", type=int, default=64,
                    help="distinct initiations an unknown or spoofed flood cycles through")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--release-rates", default="default",
                    help="comma-separated --release-rate values: one JIT herd row each per "
                         "round (default: the gateway's default)")  # fmt: skip
    ap.add_argument("--release-windows", default="default",
                    help="comma-separated --release-window values: one JIT herd row each per "
                         "release rate and round (default: the gateway's default)")  # fmt: skip
    ap.add_argument("--variants",
                    help="semicolon-separated `wgjit gateway` pacing arguments, one JIT herd "
                         "row each (instead of --release-rates x --release-windows), e.g. "
                         "';--release-window 0 --release-rate 6000' (the default; the old pace)",
                    )  # fmt: skip
    ap.add_argument("--gateway-args", default="",
                    help="more `wgjit gateway` arguments for every JIT herd and flood row, e.g. "
                         "'--load-delay 1' (shell words)")  # fmt: skip
    ap.add_argument("--skip", default="", help="comma-separated: herd,plain,crowd,flood")
    ap.add_argument("--profile", type=Path, help="write py-spy raw stacks here")
    ap.add_argument("--logs", type=Path, help="write each gateway's log here")
    args = ap.parse_args()
    args.notes = []
    skip = set(args.skip.split(","))
    herd_rows: list[str] = []
    flood_rows: list[str] = []
    notes: list[str] = args.notes
    with tempfile.TemporaryDirectory() as tmpd, Lab() as lab:
        tmp = Path(tmpd)
        gw = lab.add_gateway()
        clients = [lab.add_client() for _ in range(args.flood_clients if "flood" not in skip
                                                    else 0)]  # fmt: skip
        n_keys = max(args.herd, args.crowd, 64)
        keys = tmp / "lg.keys"
        csv = make_keys(n_keys, keys)
        url = f"sqlite:///{tmp / 'peers.db'}"
        subprocess.run([sys.executable, "-m", "wgjit", "--store", url, "peer", "import",
                        str(csv)], check=True, capture_output=True)  # fmt: skip
        for rnd in range(args.rounds):
            paces = [shlex.split(v) for v in args.variants.split(";")] if args.variants else [
                ([] if r == "default" else ["--release-rate", r])
                + ([] if w == "default" else ["--release-window", w])
                for r in args.release_rates.split(",") for w in args.release_windows.split(",")
            ]  # fmt: skip
            for pace in paces:
                if "herd" in skip:
                    break
                clear_device(gw, tmp)
                more = shlex.split(args.gateway_args)
                g = lab.start_gateway(url, "--mode", "hold", *pace, *more)
                tag = f"{rnd}-{'_'.join(pace).replace('--', '') or 'default'}"
                spy = None
                if args.profile:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    spy = profile(g.proc.pid, args.profile / f"herd-{tag}.txt", 15)
                rss0 = rss_mb(g.proc.pid)
                cpu = CpuWatch(gw.ifname, g.proc.pid)
                r = loadgen(gw, tmp, "--keys", str(keys), "--clients", str(args.herd),
                            "--spread", "1")  # fmt: skip
                s = stats(g)
                notes.append(f"herd JIT {tag}: {cpu.summary()}")
                notes.append(f"herd JIT {tag}: gateway RSS "
                             f"{rss0:.0f} -> {rss_mb(g.proc.pid):.0f} MB; {nfqueue_stats(gw)}; "
                             f"loadgen sent {r['sent']}, received {r['received']}, answered by "
                             f"attempt {r['answered_by_attempt']}")  # fmt: skip
                if spy is not None:
                    spy.wait(30)
                g.stop()
                if args.logs:
                    args.logs.mkdir(parents=True, exist_ok=True)
                    (args.logs / f"herd-{tag}.log").write_text("\n".join(g.lines))
                label = f", {shlex.join(pace)}" if pace else ""
                label += f", {args.gateway_args}" if more else ""
                herd_rows.append(herd_row(f"JIT gateway{label}, empty device (round {rnd})", r, s))
                print(herd_rows[-1], flush=True)
            if "plain" not in skip:
                clear_device(gw, tmp)
                took = preinstall_all(gw, keys, tmp)
                cpu = CpuWatch(gw.ifname, None)
                r = loadgen(gw, tmp, "--keys", str(keys), "--clients", str(args.herd),
                            "--spread", "1")  # fmt: skip
                notes.append(f"plain round {rnd}: {cpu.summary()}")
                notes.append(f"plain round {rnd}: pre-installing took {took:.1f} s; "
                             f"loadgen received {r['received']}, answered by attempt "
                             f"{r['answered_by_attempt']}")  # fmt: skip
                herd_rows.append(herd_row(f"plain wireguard-go, all pre-installed (round {rnd})",
                                          r, None))  # fmt: skip
                print(herd_rows[-1], flush=True)
                clear_device(gw, tmp)
            if "crowd" not in skip:
                clear_device(gw, tmp)
                g = lab.start_gateway(url, "--mode", "hold")
                r = loadgen(gw, tmp, "--keys", str(keys), "--clients", str(args.crowd),
                            "--addresses", str(args.crowd_addresses), "--spread", "1")
                s = stats(g)
                notes.append(f"crowd round {rnd}: {nfqueue_stats(gw)}; loadgen received "
                             f"{r['received']}")  # fmt: skip
                g.stop()
                if args.logs:
                    args.logs.mkdir(parents=True, exist_ok=True)
                    (args.logs / f"crowd-{rnd}.log").write_text("\n".join(g.lines))
                herd_rows.append(herd_row(f"crowd, JIT gateway (round {rnd})", r, s))
                print(herd_rows[-1], flush=True)
            if "flood" not in skip:
                for kind in args.floods.split(","):
                    flood_rows.append(flood(lab, gw, clients, url, tmp, keys, kind, args, rnd))
                    print(flood_rows[-1], flush=True)
    print("\n| herd / crowd | peers / addresses | answered within 2 s | answered at all "
          "| p50 / p99 ms | got a cookie | gateway counters |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(herd_rows))
    if flood_rows:
        print("\n| flood | asked / sent pkt/s | clients connected | first ping p50 / p99 ms "
              "| gateway RSS before / after | gateway counters |")
        print("|---|---|---|---|---|---|")
        print("\n".join(flood_rows))
    print()
    for n in notes:
        print(f"- {n}")


def flood(lab: Lab, gw: Host, clients: list[Any], url: str, tmp: Path, keys: Path, kind: str,
          args: argparse.Namespace, rnd: int) -> str:  # fmt: skip
    clear_device(gw, tmp)
    with open_store(url) as store:
        for c in clients:
            k = PrivateKey.generate()
            with contextlib.suppress(UnknownPeer):  # the previous flood row's client
                store.remove(f"fl-{c.tunnel_ip}")
            store.add_peer(f"fl-{c.tunnel_ip}", k.public_key(), parse_networks(c.tunnel_ip))
            c.set_private_key(k)
            c.connect_to(gw)
    g = lab.start_gateway(url, "--mode", "hold", *shlex.split(args.gateway_args))
    pid = g.proc.pid
    rss0 = rss_mb(pid)
    spy = None
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        spy = profile(pid, args.profile / f"flood-{kind}-{rnd}.txt", int(args.flood_seconds))
    result: dict[str, Any] = {}
    # the spoofed kind forges keys 0..63 of the key file (stored, never knocking here)
    th = threading.Thread(target=lambda: result.update(loadgen(
        gw, tmp, "--keys", str(keys), "--flood", kind, "--flood-rate", str(args.flood_rate),
        "--flood-seconds", str(args.flood_seconds), "--flood-pool", str(args.flood_pool),
        "--max-seconds", str(args.flood_seconds + 5))))  # fmt: skip
    th.start()
    # the clients start 1 s into the flood (the loadgen first makes its pool)
    wait_for("the flood to reach the gateway", lambda: sum(
        int(stats(g).get(k, 0)) for k in ("bad_mac1", "unknown", "forged", "replay")
    ) > 0, timeout=120, interval=0.1)  # fmt: skip
    busy0, queued0, t0 = loop_cpu(pid), queued(gw), time.monotonic()
    time.sleep(1.0)
    rtts: dict[int, float | None] = {}

    def connect(i: int) -> None:
        rtts[i] = clients[i].ping(gw.tunnel_ip, timeout=12)

    threads = []
    for i in range(len(clients)):
        t = threading.Thread(target=connect, args=(i,))
        t.start()
        threads.append(t)
        time.sleep(0.2)
    for t in threads:
        t.join()
    busy, n, took = loop_cpu(pid) - busy0, queued(gw) - queued0, time.monotonic() - t0
    th.join()
    rss1 = rss_mb(pid)
    args.notes.append(f"flood {kind} round {rnd}: while clients connected ({took:.1f} s), the "
                      f"loop thread ran {busy:.2f} s on a CPU for {n} queued packets "
                      f"({n / took:.0f}/s, {1e6 * busy / max(n, 1):.1f} µs each)")  # fmt: skip
    s = stats(g)
    args.notes.append(f"flood {kind} round {rnd}: {nfqueue_stats(gw)}; loadgen sent "
                      f"{result.get('sent')}, received {result.get('received')}")  # fmt: skip
    if spy is not None:
        spy.wait(30)
    g.stop()
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
        (args.logs / f"flood-{kind}-{rnd}.log").write_text("\n".join(g.lines))
    ok = [v for v in rtts.values() if v is not None]
    # a client that never connected counts as 12 s in the percentiles
    allv = [v if v is not None else 12000.0 for v in rtts.values()]
    p50 = statistics.median(allv) if allv else float("nan")
    p99 = percentile(allv, 99) if allv else float("nan")
    ctr = ", ".join(f"{k}={s[k]}" for k in COUNTERS if k in s)
    return (
        f"| {kind} (round {rnd}) | {args.flood_rate:g} / {result.get('flood_rate_sent')} | "
        f"{len(ok)} of {len(clients)} | {p50:.0f} / {p99:.0f} | {rss0:.0f} / {rss1:.0f} MB | "
        f"{ctr} |"
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
