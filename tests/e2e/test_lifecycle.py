"""The peer lifecycle on real wireguard-go, driven through the CLI as an operator would.

Overlapping add refused (store unchanged); disable → evicted from the device within 1 s and
refused, enable → connects again; rotate → the old key is refused, the new one connects;
expiry → evicted when it passes, and refused.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgjit.keys import PrivateKey
from wgjit.lab import Client, GatewayProcess, Host, Lab, first_ping, wait_for

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lb:
        lb.add_gateway()
        lb.add_client()
        lb.add_client()
        yield lb


@pytest.fixture
def gw(lab: Lab) -> Host:
    return lab.reset()  # every test starts with an empty device


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'peers.db'}"


@pytest.fixture
def gateway(lab: Lab, gw: Host, store: str) -> Iterator[GatewayProcess]:
    # the store must exist before the gateway starts: the peers are added by the tests
    assert wgjit(store, "store", "init").returncode == 0
    g = lab.start_gateway(store, "--mode", "hold")
    yield g
    assert g.stop() == 0, "gateway did not stop cleanly:\n" + "\n".join(g.lines[-20:])


def wgjit(store: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wgjit", "--store", store, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(store: str, *args: str) -> str:
    r = wgjit(store, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def add(store: str, name: str, c: Client, *more: str) -> None:
    ok(store, "peer", "add", name, "--allowed-ips", f"{c.tunnel_ip}/32",
       "--public-key", c.public_key.b64(), *more)  # fmt: skip


def evicted_within(gw: Host, key: str, seconds: float) -> float:
    """Poll the device until `key` is gone; the time it took (s). Fails past `seconds`."""
    t0 = time.monotonic()
    wait_for(f"{key[:8]} evicted", lambda: key not in gw.peers(), timeout=seconds)
    return time.monotonic() - t0


def test_overlapping_add_refused_store_unchanged(lab: Lab, store: str) -> None:
    alice, bob = lab.clients
    add(store, "alice", alice)
    before = ok(store, "peer", "list", "--json")
    r = wgjit(store, "peer", "add", "bob", "--allowed-ips", f"{alice.tunnel_ip}/32",
              "--public-key", bob.public_key.b64())  # fmt: skip
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("wgjit: error: "), r.stderr
    assert "alice" in r.stderr and "--allow-overlap" in r.stderr, r.stderr
    assert ok(store, "peer", "list", "--json") == before


def test_disable_evicts_and_refuses_enable_connects(
    lab: Lab, gw: Host, store: str, gateway: GatewayProcess
) -> None:
    alice = lab.clients[0]
    key = alice.public_key.b64()
    add(store, "alice", alice)
    first_ping(alice, gw, "alice's first connect")
    assert key in gw.peers()

    ok(store, "peer", "disable", "alice")
    took = evicted_within(gw, key, 1.0)
    print(f"\ndisable reached the device after {took * 1000:.0f} ms")
    gateway.wait_event("evict", peer="alice", reason="disabled")
    alice.connect_to(gw)  # a fresh session: it knocks again
    assert alice.ping(gw.tunnel_ip, timeout=1) is None
    gateway.wait_event("reject", reason="disabled", peer="alice")
    assert key not in gw.peers()

    ok(store, "peer", "enable", "alice")
    # the refusal left alice's key in the gateway's negative cache, which the change feed
    # (polled every 0.5 s) clears; a knock before that poll is dropped and costs the client
    # its 5 s retry, so this waits for one poll
    time.sleep(1.0)
    rtt = first_ping(alice, gw, "connect after enable")
    print(f"first ping after enable: {rtt} ms")
    assert rtt < 1000
    assert key in gw.peers()


def test_rotate_refuses_the_old_key_new_key_connects(
    lab: Lab, gw: Host, store: str, gateway: GatewayProcess
) -> None:
    alice = lab.clients[0]
    old_key = alice.public_key
    add(store, "alice", alice)
    first_ping(alice, gw, "alice's first connect")

    new = PrivateKey.generate()
    r = wgjit(store, "peer", "rotate", "alice", "--public-key", new.public_key().b64())
    assert r.returncode == 0, r.stderr
    assert "[Peer]" in r.stdout  # the new config, to hand to the owner
    evicted_within(gw, old_key.b64(), 1.0)
    # the old key knocks again: refused, not reinstalled
    alice.connect_to(gw)
    assert alice.ping(gw.tunnel_ip, timeout=1) is None
    # the store no longer knows the old key (its replay mark is retired with it)
    gateway.wait_event("reject", reason="unknown", key=old_key.short())
    assert old_key.b64() not in gw.peers()

    alice.set_private_key(new)  # the owner installs the new config
    first_ping(alice, gw, "connect with the rotated key")
    assert new.public_key().b64() in gw.peers()
    gateway.wait_event("install", peer="alice")


def test_expiry_evicts_and_refuses(lab: Lab, gw: Host, store: str) -> None:
    bob = lab.clients[1]
    key = bob.public_key.b64()
    assert wgjit(store, "store", "init").returncode == 0
    g = lab.start_gateway(store, "--mode", "hold")
    try:
        add(store, "bob", bob, "--expires", "4s")
        first_ping(bob, gw, "bob's connect before his expiry")
        assert key in gw.peers()
        ev = g.wait_event("evict", timeout=8, peer="bob", reason="expired")
        assert key not in gw.peers(), ev
        bob.connect_to(gw)
        assert bob.ping(gw.tunnel_ip, timeout=1) is None
        g.wait_event("reject", reason="expired", peer="bob")
        assert key not in gw.peers()
    finally:
        assert g.stop() == 0, "\n".join(g.lines[-20:])
