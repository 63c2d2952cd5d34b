"""End to end on real wireguard-go: a `wgjit gateway` process in a namespace, stock clients.

One lab (namespaces, wireguard-go processes) per module; each test starts its own gateway
process on its own SQLite store and begins with an empty device.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.mode_checks import MODES, check_first_contact, check_refusals
from wgjit.addr import Endpoint
from wgjit.lab import Client, GatewayProcess, Host, Lab, wait_for

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lb:
        lb.add_gateway()
        for _ in range(3):
            lb.add_client()
        lb.add_client(v6=True)
        yield lb


@pytest.fixture
def store_url(tmp_path: Path, lab: Lab) -> Iterator[str]:
    lab.reset()  # every test starts with an empty device
    yield f"sqlite:///{tmp_path / 'peers.db'}"


def wgjit(store_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wgjit", "--store", store_url, *args],
        capture_output=True,
        text=True,
    )


def add(store_url: str, name: str, c: Client) -> None:
    r = wgjit(store_url, "peer", "add", name, "--allowed-ips", f"{c.tunnel_ip}/32",
              "--public-key", c.public_key.b64())  # fmt: skip
    assert r.returncode == 0, r.stderr


def gw_host(lab: Lab) -> Host:
    assert lab.gateway is not None
    return lab.gateway


def client_endpoint(c: Client) -> str:
    port = c.wg("show", c.ifname, "listen-port").strip()
    return f"[{c.underlay_v6}]:{port}" if c.use_v6 else f"{c.underlay_v4}:{port}"


@pytest.fixture
def gateway(lab: Lab, store_url: str) -> Iterator[GatewayProcess]:
    g = lab.start_gateway(store_url)
    yield g
    assert g.stop() == 0, "gateway did not stop cleanly:\n" + "\n".join(g.lines[-20:])


def test_unknown_until_knock(lab: Lab, store_url: str, gateway: GatewayProcess) -> None:
    gw = gw_host(lab)
    alice = lab.clients[0]
    add(store_url, "alice", alice)
    assert gw.peers() == {}, "the gateway must start with no peers"
    rtt = alice.ping(gw.tunnel_ip, timeout=4)
    print(f"\nfirst ping to first reply through a JIT-installed peer: {rtt} ms")
    assert rtt is not None and rtt < 1000, f"first ping took {rtt} ms (client retry is 5 s)"
    peers = gw.peers()
    assert alice.public_key.b64() in peers
    assert peers[alice.public_key.b64()]["endpoint"] == client_endpoint(alice)
    wait_for(
        "role inversion to leave no keepalive",
        lambda: gw.peers()[alice.public_key.b64()]["keepalive"] == "off",
        timeout=2,
    )
    ev = gateway.wait_event("install", peer="alice")
    assert ev["endpoint"] == client_endpoint(alice)


def test_ipv6_client_installed_same_way(lab: Lab, store_url: str, gateway: GatewayProcess) -> None:
    gw = gw_host(lab)
    dave = lab.clients[3]
    assert dave.use_v6
    add(store_url, "dave", dave)
    rtt = dave.ping(gw.tunnel_ip, timeout=4)
    assert rtt is not None and rtt < 1000
    endpoint = gw.peers()[dave.public_key.b64()]["endpoint"]
    assert Endpoint.parse(endpoint).host.version == 6
    assert endpoint == client_endpoint(dave)
    if gateway.events("ready")[-1]["mode"] == "hold":
        # hold mode's release window saw the device answer over IPv6 and matched it
        before = len(gateway.events("stats"))
        gateway.proc.send_signal(signal.SIGUSR1)
        wait_for("stats line", lambda: len(gateway.events("stats")) > before)
        stats = gateway.events("stats")[-1]
        assert int(stats["device_answers"]) >= 1 and stats["device_cookies"] == "0", stats


def test_unknown_never_installed_revoked_evicted(
    lab: Lab, store_url: str, gateway: GatewayProcess
) -> None:
    gw = gw_host(lab)
    alice, bob = lab.clients[0], lab.clients[1]
    add(store_url, "alice", alice)
    # bob is not in the store
    assert bob.ping(gw.tunnel_ip, timeout=1) is None
    gateway.wait_event("reject", reason="unknown", key=bob.public_key.short())
    assert bob.public_key.b64() not in gw.peers()

    assert alice.ping(gw.tunnel_ip, timeout=4) is not None
    r = wgjit(store_url, "peer", "revoke", "alice")
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    wait_for("alice evicted", lambda: alice.public_key.b64() not in gw.peers(), timeout=2.0)
    print(f"\nrevocation reached the device after {(time.monotonic() - t0) * 1000:.0f} ms")
    gateway.wait_event("evict", peer="alice", reason="revoked")
    # alice knocks again with a fresh session: refused, never reinstalled
    alice.connect_to(gw)
    assert alice.ping(gw.tunnel_ip, timeout=1) is None
    gateway.wait_event("reject", reason="revoked", peer="alice")
    assert alice.public_key.b64() not in gw.peers()


def test_idle_eviction_and_reinstall(lab: Lab, store_url: str) -> None:
    gw = gw_host(lab)
    alice = lab.clients[0]
    add(store_url, "alice", alice)
    g = lab.start_gateway(
        store_url, "--idle-timeout", "2", "--sweep-interval", "0.3", "--testing-short-timers"
    )
    try:
        assert any("never use in production" in line for line in g.lines)
        assert alice.ping(gw.tunnel_ip, timeout=4) is not None
        assert alice.public_key.b64() in gw.peers()
        g.wait_event("evict", timeout=6, peer="alice", reason="idle")
        assert alice.public_key.b64() not in gw.peers()
        alice.connect_to(gw)  # the client's session has expired by the time it is evicted
        rtt = alice.ping(gw.tunnel_ip, timeout=4)
        assert rtt is not None and rtt < 1000
        # (the install's line may reach us just after the ping's answer)
        wait_for("a second install", lambda: len(g.events("install", peer="alice")) == 2)
    finally:
        assert g.stop() == 0


CAPTURE_ONE = """
import sys
from wgjit.capture.afpacket import PacketCapture
import select
with PacketCapture(51820) as cap:
    print("ready", flush=True)
    while True:
        select.select([cap], [], [], 5)
        for k in cap.recv_batch():
            print(k.payload.hex(), flush=True)
            sys.exit(0)
"""

SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], 51820))
"""


@contextlib.contextmanager
def sniffing(host: Host) -> Iterator[Callable[[], str]]:
    """Capture initiations to port 51820 in `host`'s namespace (AF_PACKET, beside whatever
    the gateway does); the callable waits for the first and returns it as hex (for SEND)."""
    sniffer = subprocess.Popen(
        ["ip", "netns", "exec", host.ns, sys.executable, "-c", CAPTURE_ONE],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out = sniffer.stdout
        assert out is not None
        assert out.readline().strip() == "ready"

        def first() -> str:
            captured = out.readline().strip()
            assert len(bytes.fromhex(captured)) == 148
            return captured

        yield first
    finally:
        sniffer.kill()
        sniffer.wait()


def test_replayed_initiation_after_eviction_is_refused(lab: Lab, store_url: str) -> None:
    gw = gw_host(lab)
    alice, mallory = lab.clients[0], lab.clients[2]
    add(store_url, "alice", alice)
    g = lab.start_gateway(
        store_url, "--idle-timeout", "1", "--sweep-interval", "0.3", "--testing-short-timers"
    )
    try:
        with sniffing(gw) as first:
            assert alice.ping(gw.tunnel_ip, timeout=4) is not None
            captured = first()
        g.wait_event("evict", timeout=6, peer="alice", reason="idle")

        # the attacker re-sends alice's captured initiation from another address (again and
        # again: copies within the gateway's 2 s duplicate window are dropped as duplicates);
        # a copy of a body the gateway has seen is a replay, named by the key it opened to
        def replayed() -> dict[str, str] | None:
            mallory.run(sys.executable, "-c", SEND, captured, gw.underlay_v4)
            evs = g.events("reject", reason="replay", key=alice.public_key.short())
            return evs[-1] if evs else None

        ev = wait_for("the replay to be refused", replayed, timeout=8, interval=0.3)
        assert ev["source"].startswith(mallory.underlay_v4 + ":")
        assert alice.public_key.b64() not in gw.peers()
    finally:
        assert g.stop() == 0


def test_old_initiation_of_an_installed_peer_is_refused_after_a_restart(
    lab: Lab, store_url: str
) -> None:
    """The copy is new to the restarted gateway (its filter of seen bodies starts empty), and
    the peer stays installed across the restart: only the timestamp mark the gateway took
    back from the store at reconcile can refuse it, from memory, before the device."""
    gw = gw_host(lab)
    alice, mallory = lab.clients[0], lab.clients[2]
    add(store_url, "alice", alice)
    g = lab.start_gateway(store_url)
    try:
        with sniffing(gw) as first:
            assert alice.ping(gw.tunnel_ip, timeout=4) is not None
            captured = first()
    finally:
        assert g.stop() == 0  # writes the marks it has not written yet
    endpoint = client_endpoint(alice)
    assert gw.peers()[alice.public_key.b64()]["endpoint"] == endpoint
    g = lab.start_gateway(store_url)
    try:
        ev = g.wait_event("reconcile")
        assert ev["kept"] == "1"
        # one copy, once: the first is what must be refused (a second copy would be refused
        # as a body the gateway has just seen, whatever it did with the first)
        mallory.run(sys.executable, "-c", SEND, captured, gw.underlay_v4)
        ev = g.wait_event("reject", timeout=5, reason="replay", peer="alice")
        assert ev["source"].startswith(mallory.underlay_v4 + ":")
        assert not g.events("reject", reason="replay", source=endpoint)
        # it never reached the device: alice's endpoint is hers, and her tunnel still works
        assert gw.peers()[alice.public_key.b64()]["endpoint"] == endpoint
        assert alice.ping(gw.tunnel_ip, timeout=2) is not None
    finally:
        assert g.stop() == 0


def test_reconcile_on_restart(lab: Lab, store_url: str) -> None:
    gw = gw_host(lab)
    alice, bob = lab.clients[0], lab.clients[1]
    add(store_url, "alice", alice)
    add(store_url, "bob", bob)
    g = lab.start_gateway(store_url)
    assert alice.ping(gw.tunnel_ip, timeout=4) is not None
    assert bob.ping(gw.tunnel_ip, timeout=4) is not None
    assert g.stop() == 0
    # while the gateway is down: bob is revoked, and someone adds a peer by hand
    assert wgjit(store_url, "peer", "revoke", "bob").returncode == 0
    stranger = "8Yb6mTzXbbo6ReSCzJCVrPDkB4SWDHlg5wmGsZMBhUg="
    gw.wg("set", gw.ifname, "peer", stranger, "allowed-ips", "100.65.0.99/32")
    assert {alice.public_key.b64(), bob.public_key.b64(), stranger} <= set(gw.peers())
    g = lab.start_gateway(store_url)
    try:
        ev = g.wait_event("reconcile")
        assert (ev["kept"], ev["removed"]) == ("1", "2")
        assert set(gw.peers()) == {alice.public_key.b64()}
        assert alice.ping(gw.tunnel_ip, timeout=2) is not None  # kept peer undisturbed
    finally:
        assert g.stop() == 0


JUNK = """
import os, socket, sys
dst = (sys.argv[1], 51820)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t1 = b"\\x01\\x00\\x00\\x00"
junk = [b"", b"\\x01", t1 + bytes(144), t1 + os.urandom(144), t1 + os.urandom(143),
        b"\\x02" + bytes(91), os.urandom(1400)]
for i in range(200):
    s.sendto(junk[i % len(junk)], dst)
"""


def test_malformed_packets_do_not_disturb(
    lab: Lab, store_url: str, gateway: GatewayProcess
) -> None:
    gw = gw_host(lab)
    alice, mallory = lab.clients[0], lab.clients[2]
    add(store_url, "alice", alice)
    mallory.run(sys.executable, "-c", JUNK, gw.underlay_v4)
    assert gateway.proc.poll() is None
    rtt = alice.ping(gw.tunnel_ip, timeout=4)
    assert rtt is not None and rtt < 1000
    assert set(gw.peers()) == {alice.public_key.b64()}
    gateway.proc.send_signal(signal.SIGUSR1)
    stats = gateway.wait_event("stats")
    # 2 of the 7 junk shapes pass the capture filter: 57 datagrams, identical ones deduplicated
    assert int(stats.get("bad_mac1", "0")) + int(stats.get("duplicate", "0")) >= 57, stats


def test_cookie_round_with_a_stock_client(lab: Lab, store_url: str) -> None:
    """Under load the gateway answers an initiation without mac2 with a cookie reply and does
    no Diffie-Hellman; the stock client (wireguard-go here, kernel WireGuard in the qemu
    guest) puts the cookie into mac2 of its retry ~5 s later and is admitted."""
    gw = gw_host(lab)
    alice = lab.clients[0]
    add(store_url, "alice", alice)
    g = lab.start_gateway(store_url, "--mode", "hold", "--testing-always-under-load")
    try:
        rtt = alice.ping(gw.tunnel_ip, timeout=20)
        assert rtt is not None, "no reply: the client did not complete the cookie round"
        # the first initiation got a cookie, the retry (with mac2) installed the peer
        assert rtt > 4000, f"answered after {rtt} ms: no cookie round happened"
        g.wait_event("install", peer="alice")
        g.proc.send_signal(signal.SIGUSR1)
        stats = g.wait_event("stats")
        assert int(stats.get("cookie", "0")) >= 1 and stats.get("installed") == "1", stats
    finally:
        assert g.stop() == 0, "gateway did not stop cleanly:\n" + "\n".join(g.lines[-20:])


WRITE_LOCK_S = 2.0  # past the knock budget (0.8 s), within busy_timeout and max_install_age
RETRY_MS = 5000  # a client's own next initiation


@contextlib.contextmanager
def store_write_locked(store_url: str, seconds: float) -> Iterator[float]:
    """Another process's write transaction on the SQLite store (an import, a long `sqlite3`
    session) for `seconds` from when it got the lock (yielded: time.monotonic()), or until
    the block ends: reads go on, writes wait for it."""
    locked, stop = threading.Event(), threading.Event()
    error: list[BaseException] = []
    locked_at: list[float] = []

    def hold() -> None:
        try:
            conn = sqlite3.connect(store_url.removeprefix("sqlite:///"), isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                locked_at.append(time.monotonic())
                locked.set()
                stop.wait(seconds)
                conn.execute("ROLLBACK")
            finally:
                conn.close()
        except BaseException as e:
            error.append(e)
            locked.set()

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    locked.wait(10)
    try:
        assert not error, f"could not take the store's write lock: {error[0]!r}"
        yield locked_at[0]
    finally:
        stop.set()
        t.join(10)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_peer_installed_after_its_hold_is_answered_then(lab: Lab, store_url: str,
                                                          v6: bool) -> None:  # fmt: skip
    """The store is slow to admit bob (its write lock is busy for 2 s): his held initiation
    goes on to the device at the knock budget, and the device ignores it (no such peer yet).
    Once bob is installed the gateway sends that initiation to the device again, as replay
    mode does, so his first ping is answered then, not at his client's 5 s retry."""
    gw = gw_host(lab)
    bob = lab.clients[3] if v6 else lab.clients[1]
    add(store_url, "bob", bob)
    g = lab.start_gateway(store_url, "--mode", "hold")
    try:
        bob.connect_to(gw, v6=v6)
        with store_write_locked(store_url, WRITE_LOCK_S) as locked_at:
            rtt = bob.ping(gw.tunnel_ip, timeout=RETRY_MS / 1000)
            answered_s = time.monotonic() - locked_at
        g.wait_event("install", peer="bob")
        g.proc.send_signal(signal.SIGUSR1)
        stats = g.wait_event("stats")
    finally:
        assert g.stop() == 0, "gateway did not stop cleanly:\n" + "\n".join(g.lines[-20:])
    print(f"\nbob's first ping across a {WRITE_LOCK_S:g} s store write lock: {rtt} ms")
    assert [e for e in g.events("fail_open") if e.get("key") == bob.public_key.short()], (
        "bob's initiation did not go on to the device before his install"
    )
    assert (stats.get("reinjected"), stats.get("reinject_missed")) == ("1", "0"), stats
    # answered once the lock was gone (the gateway waited for it), before any retry. Counted
    # from when the lock was taken: starting ping takes a while under qemu, so its own rtt
    # starts late (1475 ms there once)
    assert rtt is not None and rtt < RETRY_MS - 500, f"bob's first ping: {rtt} ms"
    assert answered_s >= WRITE_LOCK_S * 0.95, f"answered {answered_s:.2f} s into the lock"


# -- completion modes ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_mode_first_contact(lab: Lab, store_url: str, mode: str, v6: bool) -> None:
    client = lab.clients[3] if v6 else lab.clients[0]
    rtt = check_first_contact(lab, store_url, mode, client)
    print(f"\n{mode} {'IPv6' if v6 else 'IPv4'}: first reply after {rtt} ms")


@pytest.mark.parametrize("mode", MODES)
def test_mode_refusals(lab: Lab, store_url: str, mode: str) -> None:
    check_refusals(lab, store_url, mode, lab.clients[0], lab.clients[1])


def test_auto_mode_prefers_hold(lab: Lab, store_url: str, gateway: GatewayProcess) -> None:
    assert gateway.events("ready")[-1]["mode"] == "hold"


def own_rules(gw: Host) -> list[str]:
    return [
        line
        for tool in ("iptables", "ip6tables")
        for line in gw.run(tool, "-w", "-S", "INPUT").splitlines()
        if f"wgjit-hold {gw.ifname}" in line
    ]


def test_stopped_while_starting_leaves_nothing_behind(lab: Lab, store_url: str) -> None:
    # a supervisor's SIGTERM that lands between reconcile and the loop (while the capture is
    # set up): a clean stop, not the signal's default death with the queue rules left live
    gw = gw_host(lab)
    g = lab.start_gateway(store_url, "--mode", "hold", until="reconcile")
    assert g.stop() == 0, "\n".join(g.lines[-20:])
    assert g.events("stopping")[-1]["reason"] == "SIGTERM"
    assert own_rules(gw) == []


def test_hold_rules_survive_crash_without_duplicates(lab: Lab, store_url: str) -> None:
    gw = gw_host(lab)
    alice = lab.clients[0]
    add(store_url, "alice", alice)
    assert own_rules(gw) == []
    g = lab.start_gateway(store_url, "--mode", "hold")
    rules = own_rules(gw)
    # per family: the per-source limit (--source-limit, on by default) above the queue rule
    assert [r.split()[-1] for r in rules] == ["DROP", "--queue-bypass"] * 2, rules
    assert all("--hashlimit-above 1000/sec" in r for r in rules[::2]), rules
    assert alice.ping(gw.tunnel_ip, timeout=4) is not None
    g.proc.kill()  # a crash: no cleanup
    g.proc.wait()
    assert len(own_rules(gw)) == 4

    # --queue-bypass: with nobody on the queue an installed peer still handshakes (a fresh
    # session per try: a lost first initiation would otherwise wait for the 5 s retry)
    def reconnects() -> float | None:
        alice.connect_to(gw)
        return alice.ping(gw.tunnel_ip, timeout=1)

    wait_for("a handshake through the bypassed queue", reconnects, timeout=10, interval=0.05)
    g = lab.start_gateway(store_url, "--mode", "hold")
    try:
        assert g.wait_event("stale_rules_removed")["count"] == "4"
        assert len(own_rules(gw)) == 4, own_rules(gw)
        alice.connect_to(gw)
        assert alice.ping(gw.tunnel_ip, timeout=4) is not None
    finally:
        assert g.stop() == 0
    assert own_rules(gw) == [], "rules left after a clean stop"
