"""Kernel-only gateway scenarios; runs INSIDE the qemu guest (tests/kernel), next to
tests/e2e/test_gateway.py which the guest runs on kernel WireGuard as it is.

The gateway's interface vanishes while it runs: it logs, keeps running, and serves again once
the interface is back. Hold mode's release window sees kernel WireGuard's answers leave (they
come from the kernel, not from a process's socket). Not collected on the host (the name does
not start with test_).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_gateway import add
from tests.e2e.test_load import loadgen, public_keys, stats, stored_keys
from wgjit.lab import GATEWAY_PORT, Host, Lab, wait_for


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(wg="kernel") as lb:
        lb.add_gateway()
        lb.add_client()
        yield lb


def recreate(gw: Host) -> None:
    gw.run("ip", "link", "add", gw.ifname, "type", "wireguard")
    gw.wg("set", gw.ifname, "listen-port", str(GATEWAY_PORT), "private-key", "/dev/stdin",
          input=gw.key.b64())  # fmt: skip
    gw.run("ip", "addr", "add", f"{gw.tunnel_ip}/24", "dev", gw.ifname)
    gw.run("ip", "link", "set", gw.ifname, "up")


def test_gateway_survives_interface_vanishing(lab: Lab, tmp_path: Path) -> None:
    gw = lab.gateway
    assert gw is not None
    alice = lab.clients[0]
    store_url = f"sqlite:///{tmp_path / 'peers.db'}"
    add(store_url, "alice", alice)
    g = lab.start_gateway(
        store_url, "--backend", "netlink", "--sweep-interval", "0.3", "--testing-short-timers",
        "--idle-timeout", "600",
    )  # fmt: skip
    try:
        assert alice.ping(gw.tunnel_ip, timeout=4) is not None
        g.wait_event("install", peer="alice")
        gw.run("ip", "link", "del", gw.ifname)
        ev = g.wait_event("sweep_failed", timeout=10)
        assert f"interface {gw.ifname!r} does not exist" in ev["error"], ev
        assert g.proc.poll() is None, "the gateway must keep running"
        recreate(gw)
        # the next sweep (0.3 s) sees alice gone; her next knock installs her again (if she
        # knocks before that sweep, her own 5 s retry does)
        alice.connect_to(gw)
        rtt = alice.ping(gw.tunnel_ip, timeout=8)
        assert rtt is not None, "\n".join(g.lines[-20:])
        wait_for("a second install", lambda: len(g.events("install", peer="alice")) == 2)
        assert alice.public_key.b64() in gw.peers()
    finally:
        assert g.stop() == 0


def test_hold_window_sees_kernel_answers(lab: Lab, tmp_path: Path) -> None:
    """A small herd through a window of 2 on kernel WireGuard: every stored peer answered and
    installed, nobody else, each kernel response matched to its release, the window kept."""
    gw = lab.reset()
    store_url = f"sqlite:///{tmp_path / 'peers.db'}"
    keys = stored_keys(store_url, tmp_path, 40)
    g = lab.start_gateway(store_url, "--backend", "netlink", "--mode", "hold",
                          "--release-window", "2")  # fmt: skip
    try:
        assert not g.events("release_window_unavailable"), g.lines
        r = loadgen(lab, tmp_path, "--keys", str(keys), "--clients", "40", "--spread", "0.2",
                    timeout=300)  # fmt: skip
        assert r["answered"] == 40, r
        assert set(gw.peers()) == public_keys(keys)
        s = stats(g)
        print(s)
        assert 0 < int(s["release_inflight_max"]) <= 2, s
        assert 40 <= int(s["device_answers"]) <= int(s["queue_accepted"]), s
    finally:
        assert g.stop() == 0
