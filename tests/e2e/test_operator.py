"""Operator mistakes on real wireguard-go: each costs an error, never an outage.

A gateway on a missing or empty store refuses and the device keeps its peers; a second gateway
on the same interface is refused (naming the first's PID) while the first keeps admitting.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgjit.lab import Client, Host, Lab

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


def wgjit(store: str, *args: str, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "wgjit", *args, "--store", store],
        capture_output=True,
        text=True,
        timeout=60,
    )


def add(store: str, name: str, c: Client) -> None:
    r = wgjit(store, "peer", "add", name, "--allowed-ips", f"{c.tunnel_ip}/32",
              "--public-key", c.public_key.b64())  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_gateway_on_a_missing_or_empty_store_keeps_the_device(
    lab: Lab, gw: Host, tmp_path: Path
) -> None:
    alice = lab.clients[0]
    gw.wg("set", gw.ifname, "peer", alice.public_key.b64(), "allowed-ips", f"{alice.tunnel_ip}/32")
    missing = tmp_path / "typo.db"
    r = wgjit(str(missing), "gateway", "--interface", gw.ifname, ns=gw.ns)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (
        f"wgjit: error: store {missing} does not exist; create it with `wgjit store init"
        f" --store {missing}`, or choose another with --store or WGJIT_STORE\n"
    )
    assert not missing.exists()
    assert set(gw.peers()) == {alice.public_key.b64()}

    empty = tmp_path / "empty.db"
    assert wgjit(str(empty), "store", "init").returncode == 0
    r = wgjit(str(empty), "gateway", "--interface", gw.ifname, ns=gw.ns)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"has no peers but interface {gw.ifname} has 1" in r.stderr
    assert "--adopt-empty-store" in r.stderr
    assert set(gw.peers()) == {alice.public_key.b64()}


def test_second_gateway_refused_first_keeps_serving(lab: Lab, gw: Host, tmp_path: Path) -> None:
    alice, bob = lab.clients
    store = f"sqlite:///{tmp_path / 'peers.db'}"
    add(store, "alice", alice)
    first = lab.start_gateway(store)
    try:
        assert alice.ping(gw.tunnel_ip, timeout=4) is not None
        r = wgjit(store, "gateway", "--interface", gw.ifname, "--mode", "invert", ns=gw.ns)
        assert r.returncode == 1 and r.stdout == "", r.stdout
        assert r.stderr.count("\n") == 1, r.stderr
        assert f"(PID {first.proc.pid}) is already running on interface {gw.ifname}" in r.stderr
        # the first is untouched: it still admits a new peer, just-in-time
        add(store, "bob", bob)
        assert bob.ping(gw.tunnel_ip, timeout=4) is not None
        first.wait_event("install", peer="bob")
        assert first.proc.poll() is None
    finally:
        assert first.stop() == 0, "\n".join(first.lines[-20:])
