"""The gateway with verify worker processes (`--workers 2`, issue 10 item 3): stock wireguard-go
clients and a herd of stored peers are admitted, a flood of unknown keys and spoofed forgeries
installs nobody, a killed worker is replaced while the gateway keeps admitting, and a clean stop
leaves no worker behind. Correctness, not timing: real wireguard-go gateway in hold mode,
SQLite store, `benchmarks/loadgen.py`."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_load import add_client, gw_host, loadgen, public_keys, stats, stored_keys
from wgjit.lab import Client, GatewayProcess, Lab, wait_for

pytestmark = pytest.mark.netns

N_CLIENTS = 3


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lb:
        lb.add_gateway()
        for _ in range(N_CLIENTS):
            lb.add_client()
        yield lb


@pytest.fixture
def store_url(tmp_path: Path, lab: Lab) -> str:
    lab.reset()
    return f"sqlite:///{tmp_path / 'peers.db'}"


def workers_of(g: GatewayProcess) -> list[int]:
    """The pids of the gateway's verify workers (its children running wgjit.gateway.pool)."""
    out = []
    for child in Path(f"/proc/{g.proc.pid}/task/{g.proc.pid}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"wgjit.gateway.pool" in cmdline:
            out.append(int(child))
    return out


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_two_workers_admit_clients_and_herd_and_install_nobody_unknown(
    lab: Lab, store_url: str, tmp_path: Path
) -> None:
    keys = stored_keys(store_url, tmp_path, 200)
    for i, c in enumerate(lab.clients):
        add_client(store_url, c, f"client-{i}")
    g = lab.start_gateway(store_url, "--mode", "hold", "--workers", "2")
    try:
        assert g.events("ready")[-1]["verify_workers"] == "2"
        wait_for("two verify workers", lambda: len(workers_of(g)) == 2)
        gw = gw_host(lab)
        rtts: dict[int, float | None] = {}

        def connect(i: int, c: Client) -> None:
            rtts[i] = c.ping(gw.tunnel_ip, timeout=12)

        flood: dict[str, object] = {}

        def run_flood() -> None:
            flood.update(loadgen(lab, tmp_path, "--keys", str(keys), "--flood",
                                 "unknown,spoofed,bad_mac1", "--flood-rate", "1500",
                                 "--flood-seconds", "3"))  # fmt: skip

        f = threading.Thread(target=run_flood)
        f.start()
        wait_for("the flood to begin", lambda: stats(g).get("bad_mac1"), timeout=15)
        threads = [threading.Thread(target=connect, args=(i, c))
                   for i, c in enumerate(lab.clients)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        f.join()
        assert all(rtts[i] is not None for i in range(N_CLIENTS)), rtts
        clients = {c.public_key.b64() for c in lab.clients}
        assert set(gw.peers()) == clients, "only the clients installed during the flood"
        s = stats(g)
        assert int(s["unknown"]) + int(s.get("negative_cached", 0)) > 0, s
        assert "verify_inflight" in s, s

        # the herd, through the workers
        r = loadgen(lab, tmp_path, "--keys", str(keys), "--clients", "200", "--spread", "1")
        assert r["answered"] == 200, r
        assert set(gw.peers()) == clients | public_keys(keys)  # nobody unknown

        # a worker killed mid-run is replaced; admissions go on
        victim = workers_of(g)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for("the worker replaced", lambda: g.events("verify_worker_replaced"), timeout=10)
        wait_for("two verify workers again",
                 lambda: len(workers_of(g)) == 2 and victim not in workers_of(g))  # fmt: skip
        lab.reset()
        rtt = lab.clients[0].ping(gw.tunnel_ip, timeout=12)
        assert rtt is not None, "\n".join(g.lines[-30:])
        pids = workers_of(g)
    except BaseException:
        print("\n".join(g.lines[-40:]))
        raise
    finally:
        code = g.stop()
    assert code == 0, "\n".join(g.lines[-20:])
    assert not any(alive(p) for p in pids), "a verify worker outlived the gateway"


def test_workers_0_verifies_in_the_gateways_own_process(lab: Lab, store_url: str) -> None:
    """`--workers 0` (and 1): no worker processes; a stock client is admitted as before."""
    c = lab.clients[0]
    add_client(store_url, c, "solo")
    g = lab.start_gateway(store_url, "--mode", "hold", "--workers", "0")
    try:
        assert g.events("ready")[-1]["verify_workers"] == "0"
        assert workers_of(g) == []
        assert c.ping(gw_host(lab).tunnel_ip, timeout=12) is not None, "\n".join(g.lines[-30:])
        assert "verify_inflight" not in stats(g)
    finally:
        assert g.stop() == 0
