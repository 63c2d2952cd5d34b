"""A throwaway WireGuard lab in network namespaces: one gateway, stock clients, a LAN between.

Used by `wgjit demo` and by the end-to-end tests. It creates only namespaces, veths, bridges and
WireGuard interfaces whose names carry its own tag, runs wireguard-go (never wgjit logic) on
them, and removes everything it made, by name and pid, on close. Needs root.

Two flavours of WireGuard interface: `go` (wireguard-go processes, the default) and `kernel`
(`ip link add NAME type wireguard`, e.g. inside the qemu guest of tests/kernel), chosen by the
`wg` argument or else the environment variable WGJIT_LAB_WG. On a slow machine (qemu TCG),
WGJIT_LAB_TIME_FACTOR (default 1) stretches every timeout the lab waits with.

Layout (TAG is short and unique per lab):

    ns wjl-TAG-gw : bridge br0 198.18.0.1/24 fd18::1/64, wireguard-go wjTAGg 100.65.0.1/24 :51820
    ns wjl-TAG-cN : eth0 198.18.0.(10+N)/24 fd18::(10+N)/64 (veth into br0),
                    wireguard-go wjTAGcN 100.65.0.(10+N)/32, gateway as its only peer

More gateways (add_gateway() again; floating peers, one shared store): gateway N >= 2 is

    ns wjl-TAG-gN : eth0 198.18.0.N/24 fd18::N/64 (veth into br0), wireguard-go wjTAGgN
                    100.65.0.1/24 :51820 with the first gateway's key by default

so a client moves between gateways by changing only its endpoint (`connect_to(gw)`). Traffic
to gateway N crosses br0 in the first gateway's namespace: run the first gateway in hold mode
(NFQUEUE sees only its own packets) or with `--capture-interface br0`.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from wgjit.addr import parse_networks
from wgjit.gateway.lock import LOCK_DIR
from wgjit.keys import PrivateKey, PublicKey
from wgjit.store import open_store

UAPI_DIR = Path("/var/run/wireguard")
GATEWAY_PORT = 51820
UNDERLAY_V4 = "198.18.0"  # RFC 2544 benchmarking range: never routed anywhere
BRIDGE_MAC = "02:77:6a:00:00:01"  # locally administered, fixed (see add_gateway)
UNDERLAY_V6 = "fd18:"
TUNNEL_V4 = "100.65.0"
CONNECT_SPACING = 0.1  # seconds between measured connects of one client
LAB_WG_ENV = "WGJIT_LAB_WG"
FLAVOURS = ("go", "kernel")
TIME_FACTOR_ENV = "WGJIT_LAB_TIME_FACTOR"
REQUIRED_TOOLS = {
    "ip": "iproute2",
    "wireguard-go": "wireguard-go",
    "wg": "wireguard-tools",
    "ping": "iputils-ping",
}


class LabError(RuntimeError):
    pass


def lab_flavour(wg: str | None = None) -> str:
    """`wg`, else $WGJIT_LAB_WG, else `go`; LabError for anything but go or kernel."""
    flavour = wg or os.environ.get(LAB_WG_ENV) or "go"
    if flavour not in FLAVOURS:
        raise LabError(f"{LAB_WG_ENV}={flavour!r}: choose one of {', '.join(FLAVOURS)}")
    return flavour


def check_prerequisites(wg: str = "go") -> None:
    """Raise LabError naming what is missing (root, tools, module) and how to install it."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, TUN devices); run it with sudo")
    tools = {t: p for t, p in REQUIRED_TOOLS.items() if wg == "go" or t != "wireguard-go"}
    missing = [pkg for tool, pkg in tools.items() if shutil.which(tool) is None]
    if missing:
        raise LabError(
            "missing tools; install them with: apt-get install -y --no-install-recommends "
            + " ".join(sorted(set(missing)))
        )
    if wg == "kernel":
        if not Path("/sys/module/wireguard").exists():
            p = subprocess.run(["modprobe", "wireguard"], capture_output=True, text=True)
            if p.returncode != 0:
                raise LabError(
                    "kernel WireGuard is not available (modprobe wireguard: "
                    f"{p.stderr.strip() or p.returncode}); run the kernel lab in a kernel that "
                    "has it (tests/kernel boots Debian's linux-image-amd64 under qemu)"
                )
    elif not Path("/dev/net/tun").exists():
        raise LabError("/dev/net/tun is missing: wireguard-go needs the tun module (modprobe tun)")


def run(*argv: str, ns: str | None = None, check: bool = True, input: str | None = None) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    p = subprocess.run(cmd, input=input, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def time_factor() -> float:
    """How much slower than this project's machines the lab runs ($WGJIT_LAB_TIME_FACTOR)."""
    text = os.environ.get(TIME_FACTOR_ENV, "1")
    try:
        factor = float(text)
    except ValueError:
        factor = 0.0
    if not 1 <= factor <= 100:
        raise LabError(f"{TIME_FACTOR_ENV}={text!r}: expected a number from 1 to 100")
    return factor


def wait_for(
    what: str, predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01
) -> Any:
    """Poll `predicate` until it returns something truthy; LabError after `timeout` seconds
    (times the lab's time factor)."""
    timeout *= time_factor()
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


_PING_TIME = re.compile(r"time=([\d.]+) ms")


@dataclass
class Host:
    """A namespace with a WireGuard interface (wireguard-go or kernel)."""

    lab: Lab
    ns: str
    ifname: str
    key: PrivateKey
    tunnel_ip: str
    underlay_v4: str
    underlay_v6: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def public_key(self) -> PublicKey:
        return self.key.public_key()

    def run(self, *argv: str, check: bool = True, input: str | None = None) -> str:
        return run(*argv, ns=self.ns, check=check, input=input)

    def wg(self, *args: str, input: str | None = None) -> str:
        return self.run("wg", *args, input=input)

    def set_private_key(self, key: PrivateKey) -> None:
        self.key = key
        self.wg("set", self.ifname, "private-key", "/dev/stdin", input=key.b64())

    def remove_all_peers(self) -> None:
        """Empty this host's WireGuard device of peers."""
        for key in self.peers():
            self.wg("set", self.ifname, "peer", key, "remove")

    def peers(self) -> dict[str, dict[str, str]]:
        """`wg show IF dump` as {public_key_b64: {endpoint, latest_handshake, keepalive, ...}}."""
        out: dict[str, dict[str, str]] = {}
        for line in self.wg("show", self.ifname, "dump").splitlines()[1:]:
            f = line.split("\t")
            out[f[0]] = {
                "endpoint": f[2],
                "allowed_ips": f[3],
                "latest_handshake": f[4],
                "rx": f[5],
                "tx": f[6],
                "keepalive": f[7],
            }
        return out

    def ping(self, dest: str, timeout: float = 3.0) -> float | None:
        """One ICMP echo through the tunnel; the reply's round trip in ms, None if none came.

        A first ping waits in the client's WireGuard queue while the handshake happens, so its
        round trip is exactly 'time from first packet to first reply'. The timeout is
        stretched by the lab's time factor."""
        timeout *= time_factor()
        p = subprocess.run(
            ["ip", "netns", "exec", self.ns, "ping", "-n", "-c1", "-W", f"{timeout:g}", dest],
            capture_output=True,
            text=True,
        )
        m = _PING_TIME.search(p.stdout)
        return float(m.group(1)) if p.returncode == 0 and m else None


@dataclass
class Client(Host):
    use_v6: bool = False

    def connect_to(self, gw: Host, *, v6: bool | None = None) -> None:
        """(Re)configure the gateway as the only peer. Dropping and re-adding the peer also
        discards any session, as if the old one had expired: the next packet knocks again."""
        if v6 is not None:
            self.use_v6 = v6
        endpoint = (
            f"[{gw.underlay_v6}]:{GATEWAY_PORT}"
            if self.use_v6
            else f"{gw.underlay_v4}:{GATEWAY_PORT}"
        )
        gwkey = gw.public_key.b64()
        if gwkey in self.peers():
            self.wg("set", self.ifname, "peer", gwkey, "remove")
        self.wg(
            "set", self.ifname, "peer", gwkey, "endpoint", endpoint,
            "allowed-ips", f"{TUNNEL_V4}.0/24",
        )  # fmt: skip


@dataclass
class GatewayProcess:
    """A `wgjit gateway` running in the gateway namespace; its log lines are collected."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    echo: Callable[[str], None] | None = None

    def start_reader(self) -> None:
        def pump(stream: IO[str]) -> None:
            for line in stream:
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
                if self.echo:
                    self.echo(line.rstrip("\n"))

        assert self.proc.stdout is not None
        threading.Thread(target=pump, args=(self.proc.stdout,), daemon=True).start()

    def events(self, event: str | None = None, **match: str) -> list[dict[str, str]]:
        from wgjit.events import parse_logfmt

        with self._cond:
            lines = list(self.lines)
        out = []
        for line in lines:
            ev = parse_logfmt(line)
            if event and ev.get("event") != event:
                continue
            if all(ev.get(k) == v for k, v in match.items()):
                out.append(ev)
        return out

    def wait_event(self, event: str, timeout: float = 5.0, **match: str) -> dict[str, str]:
        def found() -> dict[str, str] | None:
            evs = self.events(event, **match)
            if evs:
                return evs[-1]
            if self.proc.poll() is not None:
                raise LabError(
                    f"gateway exited with {self.proc.returncode}; last lines:\n"
                    + "\n".join(self.lines[-20:])
                )
            return None

        desc = f"gateway event {event} {match}"
        result: dict[str, str] = wait_for(desc, found, timeout)
        return result

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout * time_factor())
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Lab:
    """Owns every namespace and process it creates; `close()` removes them all."""

    def __init__(self, tag: str | None = None, wg: str | None = None) -> None:
        self.wg = lab_flavour(wg)
        check_prerequisites(self.wg)
        self.tag = tag or f"{os.getpid() % 100000:x}{int(time.time() * 1000) % 4096:x}"[:7]
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.gateway: Host | None = None
        self.gateways: list[Host] = []
        self.clients: list[Client] = []
        self._gw_ns = f"wjl-{self.tag}-gw"

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building ---------------------------------------------------------------------------

    def _add_ns(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "link", "set", "lo", "up", ns=name)

    def _add_wireguard(self, ns: str, ifname: str) -> subprocess.Popen[bytes] | None:
        """A WireGuard interface of the lab's flavour; the wireguard-go process, if any."""
        if self.wg == "kernel":
            run("ip", "link", "add", ifname, "type", "wireguard", ns=ns)
            return None
        return self._start_wireguard_go(ns, ifname)

    def _start_wireguard_go(self, ns: str, ifname: str) -> subprocess.Popen[bytes]:
        sock = UAPI_DIR / f"{ifname}.sock"
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "wireguard-go", "-f", ifname],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "LOG_LEVEL": "error"},
        )
        self.procs.append(proc)
        wait_for(f"wireguard-go socket {sock}", sock.exists, timeout=10)
        return proc

    def add_gateway(self, key: PrivateKey | None = None) -> Host:
        """The first call makes the gateway namespace with the LAN bridge; later calls add
        gateways in namespaces of their own on that LAN (see the module docstring)."""
        if self.gateway is not None:
            return self._add_more_gateway(key or self.gateway.key)
        ns = self._gw_ns
        self._add_ns(ns)
        # A bridge without an address of its own takes its lowest port's MAC, and changes it
        # when ports come and go (a load generator's veth): clients' ARP entries would then
        # point at a MAC nobody has, and their packets vanish until the entries expire.
        run("ip", "link", "add", "br0", "address", BRIDGE_MAC, "type", "bridge", ns=ns)
        run("ip", "addr", "add", f"{UNDERLAY_V4}.1/24", "dev", "br0", ns=ns)
        run("ip", "addr", "add", f"{UNDERLAY_V6}:1/64", "dev", "br0", "nodad", ns=ns)
        run("ip", "link", "set", "br0", "up", ns=ns)
        ifname = f"wj{self.tag}g"
        gw = Host(
            self, ns, ifname, key or PrivateKey.generate(), f"{TUNNEL_V4}.1",
            f"{UNDERLAY_V4}.1", f"{UNDERLAY_V6}:1",
        )  # fmt: skip
        gw.proc = self._add_wireguard(ns, ifname)
        gw.wg("set", ifname, "listen-port", str(GATEWAY_PORT), "private-key", "/dev/stdin",
              input=gw.key.b64())  # fmt: skip
        run("ip", "addr", "add", f"{gw.tunnel_ip}/24", "dev", ifname, ns=ns)
        run("ip", "link", "set", ifname, "up", ns=ns)
        self.gateway = gw
        self.gateways.append(gw)
        return gw

    def _add_more_gateway(self, key: PrivateKey) -> Host:
        n = len(self.gateways) + 1
        ns = f"wjl-{self.tag}-g{n}"
        self._add_ns(ns)
        outer = f"v{self.tag}g{n}"
        run("ip", "link", "add", outer, "netns", self._gw_ns, "type", "veth", "peer", "name",
            "eth0", "netns", ns)  # fmt: skip
        run("ip", "link", "set", outer, "master", "br0", "up", ns=self._gw_ns)
        v4, v6 = f"{UNDERLAY_V4}.{n}", f"{UNDERLAY_V6}:{n:x}"
        run("ip", "addr", "add", f"{v4}/24", "dev", "eth0", ns=ns)
        run("ip", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad", ns=ns)
        run("ip", "link", "set", "eth0", "up", ns=ns)
        ifname = f"wj{self.tag}g{n}"
        gw = Host(self, ns, ifname, key, f"{TUNNEL_V4}.1", v4, v6)
        gw.proc = self._add_wireguard(ns, ifname)
        gw.wg("set", ifname, "listen-port", str(GATEWAY_PORT), "private-key", "/dev/stdin",
              input=key.b64())  # fmt: skip
        run("ip", "addr", "add", f"{gw.tunnel_ip}/24", "dev", ifname, ns=ns)
        run("ip", "link", "set", ifname, "up", ns=ns)
        self.gateways.append(gw)
        return gw

    def add_client(self, key: PrivateKey | None = None, *, v6: bool = False) -> Client:
        if self.gateway is None:
            raise LabError("add_gateway() first")
        n = len(self.clients) + 1
        ns = f"wjl-{self.tag}-c{n}"
        self._add_ns(ns)
        outer, inner = f"v{self.tag}c{n}", "eth0"
        run("ip", "link", "add", outer, "netns", self._gw_ns, "type", "veth", "peer", "name",
            inner, "netns", ns)  # fmt: skip
        run("ip", "link", "set", outer, "master", "br0", "up", ns=self._gw_ns)
        v4, v6addr = f"{UNDERLAY_V4}.{10 + n}", f"{UNDERLAY_V6}:{10 + n:x}"
        run("ip", "addr", "add", f"{v4}/24", "dev", inner, ns=ns)
        run("ip", "addr", "add", f"{v6addr}/64", "dev", inner, "nodad", ns=ns)
        run("ip", "link", "set", inner, "up", ns=ns)
        ifname = f"wj{self.tag}c{n}"
        c = Client(self, ns, ifname, key or PrivateKey.generate(), f"{TUNNEL_V4}.{10 + n}",
                   v4, v6addr, use_v6=v6)  # fmt: skip
        c.proc = self._add_wireguard(ns, ifname)
        c.wg("set", ifname, "private-key", "/dev/stdin", input=c.key.b64())
        run("ip", "addr", "add", f"{c.tunnel_ip}/32", "dev", ifname, ns=ns)
        run("ip", "link", "set", ifname, "up", ns=ns)
        run("ip", "route", "add", f"{TUNNEL_V4}.0/24", "dev", ifname, ns=ns)
        c.connect_to(self.gateway)
        self.clients.append(c)
        return c

    def start_gateway(
        self,
        store_url: str,
        *args: str,
        echo: Callable[[str], None] | None = None,
        gateway: Host | None = None,
        until: str = "ready",
    ) -> GatewayProcess:
        """Run `wgjit gateway` (this Python's wgjit) in a gateway's namespace (the first's
        unless `gateway` says which), and wait for its event `until`."""
        gw = gateway or self.gateway
        if gw is None:
            raise LabError("add_gateway() first")
        open_store(store_url).close()  # the gateway never creates its store (`store init`)
        cmd = [
            "ip", "netns", "exec", gw.ns, sys.executable, "-m", "wgjit",
            "--store", store_url, "gateway", "--interface", gw.ifname, *args,
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.procs.append(proc)
        g = GatewayProcess(proc, echo=echo)
        g.start_reader()
        # a deadline, not a wait: under qemu TCG (tests/kernel) a start takes 15-25 s
        g.wait_event(until, timeout=60)
        return g

    def reset(self) -> Host:
        """What a test starts from: every gateway's device without peers, every client
        reconnected to the first gateway with no session. Returns the first gateway."""
        if self.gateway is None:
            raise LabError("add_gateway() first")
        for gw in self.gateways:
            gw.remove_all_peers()
        for c in self.clients:
            c.connect_to(self.gateway)
        return self.gateway

    # -- tearing down -----------------------------------------------------------------------

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            if p.poll() is None:
                p.kill()
                p.wait()
        self.procs.clear()
        for ns in reversed(self.namespaces):
            run("ip", "netns", "delete", ns, check=False)
        self.namespaces.clear()
        for sock in UAPI_DIR.glob(f"wj{self.tag}*.sock"):
            sock.unlink(missing_ok=True)
        # the interface locks of the gateways it ran (their processes are gone by now)
        for lock in LOCK_DIR.glob(f"wj{self.tag}*.lock"):
            lock.unlink(missing_ok=True)


@contextlib.contextmanager
def lab(tag: str | None = None, wg: str | None = None) -> Iterator[Lab]:
    with Lab(tag, wg) as lb:
        yield lb


# -- measuring -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def measure_connects(
    client: Client, gw: Host, store_url: str, n: int, jit: bool, prefix: str
) -> list[float]:
    """First-ping latency (ms) over `n` fresh connects. JIT: a new stored key each time, so
    the gateway installs it on the knock. Pre-installed: one stored key already on the device,
    the client's session dropped before each connect."""
    results: list[float] = []
    store = open_store(store_url)
    try:
        if not jit:
            key = PrivateKey.generate()
            # the same client under many keys, one at a time: overlapping on purpose
            store.add_peer(
                f"{prefix}-pre",
                key.public_key(),
                parse_networks(client.tunnel_ip),
                allow_overlap=True,
            )
            gw.wg("set", gw.ifname, "peer", key.public_key().b64(), "allowed-ips",
                  f"{client.tunnel_ip}/32")  # fmt: skip
            client.set_private_key(key)
        for i in range(n):
            if jit:
                key = PrivateKey.generate()
                store.add_peer(
                    f"{prefix}-{i}",
                    key.public_key(),
                    parse_networks(client.tunnel_ip),
                    allow_overlap=True,
                )
                client.set_private_key(key)
            results.append(
                first_ping(client, gw, what=f"connect {i} ({'JIT' if jit else 'pre-installed'})")
            )
    finally:
        store.close()
    return results


def preinstall(client: Client, gw: Host, store_url: str, name: str) -> None:
    """Give `client` a new key that is in the store and already on the gateway's device."""
    key = PrivateKey.generate()
    with open_store(store_url) as store:
        # the client may be in the store under its own key too: overlapping on purpose
        store.add_peer(name, key.public_key(), parse_networks(client.tunnel_ip), allow_overlap=True)
    gw.wg("set", gw.ifname, "peer", key.public_key().b64(), "allowed-ips",
          f"{client.tunnel_ip}/32")  # fmt: skip
    client.set_private_key(key)


def first_ping(client: Client, gw: Host, what: str = "connect", timeout: float = 7) -> float:
    """One fresh connect of `client` (its session dropped) with its current key: the first
    ping's round trip in ms."""
    # WireGuard refuses a peer's initiations closer than 20 ms apart (the kernel's and
    # wireguard-go's flood limit); real clients never reconnect that fast
    time.sleep(CONNECT_SPACING)
    client.connect_to(gw)
    rtt = client.ping(gw.tunnel_ip, timeout=timeout)
    if rtt is None:
        raise LabError(f"{what} got no reply")
    return rtt


def summary(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):6.1f} ms   p99 {percentile(values, 99):6.1f} ms"
        f"   (n={len(values)})"
    )
