"""Hooks, a config file, sd_notify and no root, on a real wireguard-go gateway.

A gateway started from a TOML file (plus a flag) tells $NOTIFY_SOCKET it is ready; its
install hook writes its environment, adds routes (contrib/hooks/wgjit-routes) and then hangs
for 30 s: the next peer's first ping is as fast as ever, the hook is killed (its whole process
group) at --hook-timeout and logged; the evict hook gets the same peer and removes the routes.
As the systemd unit runs it, a gateway with only CAP_NET_ADMIN and CAP_NET_RAW admits peers in
hold mode (iptables, NFQUEUE) and its hooks change routes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgjit.addr import parse_networks
from wgjit.lab import (
    Client,
    GatewayProcess,
    Host,
    Lab,
    first_ping,
    time_factor,
    wait_for,
)
from wgjit.store import open_store

pytestmark = pytest.mark.netns

ROUTES_HOOK = Path(__file__).resolve().parents[2] / "contrib" / "hooks" / "wgjit-routes"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lb:
        lb.add_gateway()
        lb.add_client()
        lb.add_client()
        yield lb


@pytest.fixture
def gw(lab: Lab) -> Host:
    """The gateway's device with no peers and no hook routes; clients with no session."""
    g = lab.reset()
    g.run("ip", "route", "flush", "proto", "250")
    return g


def _env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _routes(gw: Host) -> str:
    return gw.run("ip", "route", "show", "proto", "250")


def test_slow_hooks_never_delay_a_connect_and_see_the_peer(
    lab: Lab, gw: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = lab.clients
    url = f"sqlite:///{tmp_path / 'peers.db'}"
    with open_store(url) as store:
        for name, c in (("alice", alice), ("bob", bob)):
            store.add_peer(name, c.public_key, parse_networks(f"{c.tunnel_ip}/32"))
    out = tmp_path / "hooks"
    out.mkdir()

    def dump(tag: str) -> str:  # the environment, written whole (rename) before anything else
        f = f'"{out}/{tag}-$WGJIT_PEER"'
        return f"env > {f}.tmp && mv {f}.tmp {f}.env && echo $$ > {f}.pid"

    on_install = f"sh -c '{dump('install')} && {ROUTES_HOOK} && sleep 30'"
    on_evict = f"sh -c '{dump('evict')} && exec {ROUTES_HOOK}'"
    conf = tmp_path / "gateway.toml"
    conf.write_text(f"hook_timeout = 3\non_evict = {json.dumps(on_evict)}\nlog_format = 'text'\n"
                    f"on_install = 'false'  # overridden on the command line\n")  # fmt: skip

    notify = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ready:
        ready.bind(str(notify))
        ready.settimeout(60)
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify))
        g = lab.start_gateway(url, "--config", str(conf), "--on-install", on_install)
        try:
            assert ready.recv(4096).startswith(b"READY=1\nSTATUS=serving ")
            _connects_and_hooks(gw, alice, bob, g, out, url)
        finally:
            assert g.stop() == 0, "\n".join(g.lines[-30:])


def _connects_and_hooks(
    gw: Host, alice: Client, bob: Client, g: GatewayProcess, out: Path, url: str
) -> None:
    limit_ms = 1000 * time_factor()
    rtt = first_ping(alice, gw, "alice's first connect")
    assert rtt < limit_ms, rtt
    installed = g.wait_event("install", peer="alice")
    wait_for("alice's install hook", (out / "install-alice.pid").exists)
    env = _env(out / "install-alice.env")
    assert env["WGJIT_EVENT"] == "install" and env["WGJIT_PEER"] == "alice"
    assert env["WGJIT_ENDPOINT"] == installed["endpoint"]
    assert env["WGJIT_ENDPOINT"].startswith(f"{alice.underlay_v4}:")
    assert env["WGJIT_KEY"] == alice.public_key.b64()
    assert env["WGJIT_ALLOWED_IPS"] == f"{alice.tunnel_ip}/32"
    assert env["WGJIT_INTERFACE"] == gw.ifname
    assert "WGJIT_STORE" not in env
    wait_for("alice's route", lambda: f"{alice.tunnel_ip} dev {gw.ifname}" in _routes(gw))

    # alice's hook now sleeps (30 s): bob connects as fast as ever, and his hook runs too
    hung = int((out / "install-alice.pid").read_text())
    assert _alive(hung)
    rtt = first_ping(bob, gw, "bob's first connect while alice's hook hangs")
    assert rtt < limit_ms, rtt
    assert _alive(hung)
    wait_for("bob's install hook", (out / "install-bob.pid").exists)
    assert _env(out / "install-bob.env")["WGJIT_ALLOWED_IPS"] == f"{bob.tunnel_ip}/32"

    # at --hook-timeout (3 s, from the file) the hook's process group is killed and logged
    failed = g.wait_event("hook_failed", peer="alice", timeout=10)
    assert failed["hook"] == "install" and failed["timeout_s"] == "3"
    wait_for("the hung hook to be killed", lambda: not _alive(hung), timeout=2)
    assert alice.ping(gw.tunnel_ip, timeout=2) is not None  # the peer itself is untouched

    # revoked: evicted within seconds; the evict hook is told what the install hook was
    with open_store(url) as store:
        store.revoke("alice")
    g.wait_event("evict", peer="alice", reason="revoked", timeout=10)
    wait_for("alice's evict hook", (out / "evict-alice.pid").exists, timeout=10)
    env = _env(out / "evict-alice.env")
    assert env["WGJIT_EVENT"] == "evict" and env["WGJIT_REASON"] == "revoked"
    assert env["WGJIT_KEY"] == alice.public_key.b64()
    assert env["WGJIT_ALLOWED_IPS"] == f"{alice.tunnel_ip}/32"
    assert env["WGJIT_ENDPOINT"] == installed["endpoint"]
    wait_for("alice's route to go", lambda: alice.tunnel_ip not in _routes(gw))
    assert f"{bob.tunnel_ip} dev {gw.ifname}" in _routes(gw)


CAPS = "-all,+net_admin,+net_raw"


def test_only_two_capabilities_like_the_unit(lab: Lab, gw: Host, tmp_path: Path) -> None:
    """uid 0 (wireguard-go's UAPI socket is root's, and it exits if the socket's owner
    changes) but only CAP_NET_ADMIN and CAP_NET_RAW, as the unit with `User=root`."""
    alice = lab.clients[0]
    url = f"sqlite:///{tmp_path / 'peers.db'}"
    with open_store(url) as store:
        store.add_peer("alice", alice.public_key, parse_networks(f"{alice.tunnel_ip}/32"))
    cmd = [
        "ip", "netns", "exec", gw.ns,
        "setpriv", f"--inh-caps={CAPS}", f"--ambient-caps={CAPS}", f"--bounding-set={CAPS}",
        sys.executable, "-m", "wgjit", "--store", url, "gateway", "--interface", gw.ifname,
        "--mode", "hold", "--on-install", str(ROUTES_HOOK), "--on-evict", str(ROUTES_HOOK),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    lab.procs.append(proc)
    g = GatewayProcess(proc)
    g.start_reader()
    try:
        g.wait_event("ready", timeout=60, mode="hold")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        for line in ("CapEff:\t0000000000003000", "CapBnd:\t0000000000003000"):
            assert line in status, status  # CAP_NET_ADMIN (12) and CAP_NET_RAW (13) only
        assert "NFQUEUE" in gw.run("iptables", "-S")
        rtt = first_ping(alice, gw, "a connect through a gateway with two capabilities")
        assert rtt < 1000 * time_factor(), rtt
        g.wait_event("install", peer="alice")
        # its hook, with the same two capabilities, added the route
        wait_for("alice's route", lambda: f"{alice.tunnel_ip} dev {gw.ifname}" in _routes(gw))
    finally:
        assert g.stop() == 0, "\n".join(g.lines[-30:])
    assert not g.events("hook_failed"), g.lines
    assert "NFQUEUE" not in gw.run("iptables", "-S")  # removed on the way out
