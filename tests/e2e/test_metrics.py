"""Prometheus metrics and the health check of a real gateway (issue 13): a JIT connect shows in
/metrics, the installed-peers gauge equals what `wg show` lists, and /healthz follows the
store: 503 while PostgreSQL is stopped, 200 once it is back."""

from __future__ import annotations

import json

import pytest

from tests.pgserver import PostgresServer
from wgjit.addr import parse_networks
from wgjit.lab import Host, Lab, LabError, first_ping, wait_for
from wgjit.store import open_store

pytestmark = pytest.mark.netns

PORT = 9586
_FETCH = """
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=3)
    print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"""


def fetch(gw: Host, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:PORT/path from inside the gateway's namespace."""
    import sys

    out = gw.run(sys.executable, "-c", _FETCH, f"http://127.0.0.1:{PORT}{path}")
    code, _, body = out.partition("\n")
    return int(code), body


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_show_a_jit_connect_and_healthz_follows_the_store(pg: PostgresServer) -> None:
    with Lab() as lab:
        gw = lab.add_gateway()
        client = lab.add_client()
        url = pg.create_database()
        with open_store(url) as store:
            store.add_peer("laptop", client.public_key, parse_networks(client.tunnel_ip))
        g = lab.start_gateway(
            url, "--mode", "hold", "--metrics-listen", f"127.0.0.1:{PORT}"
        )
        try:
            code, body = fetch(gw, "/healthz")
            assert (code, json.loads(body)["ok"]) == (200, True)
            assert first_ping(client, gw) < 1000
            _, text = fetch(gw, "/metrics")
            assert metric(text, 'wgjit_knocks_total{outcome="installed"}') == 1
            assert metric(text, "wgjit_installs_total") == 1
            assert metric(text, "wgjit_peers_installed") == len(gw.peers()) == 1
            assert metric(text, "wgjit_install_duration_seconds_count") == 1
            assert f'interface="{gw.ifname}"' in text and "wgjit_build{" in text

            pg.stop("immediate")
            try:
                def unhealthy() -> str | None:
                    code, body = fetch(gw, "/healthz")
                    return body if code == 503 else None

                why = wait_for(
                    "/healthz 503 with the database stopped", unhealthy, timeout=20, interval=0.2
                )
                assert "store" in json.loads(why)["status"]
            finally:
                pg.start()

            def healthy() -> bool:
                return fetch(gw, "/healthz")[0] == 200

            wait_for("/healthz 200 once the database is back", healthy, timeout=30, interval=0.2)
            # serving metrics never held the packet path: the client reconnects at once
            assert first_ping(client, gw) < 1000
        except LabError as e:
            pytest.fail(f"{e}\n" + "\n".join(g.lines[-30:]))
        finally:
            assert g.stop() == 0
