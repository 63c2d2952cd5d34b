"""The web page end to end (issue 13): in a real headless Chromium, sign in to `wgjit serve`,
add a peer and see its QR code; a stock wireguard-go client takes the config shown (key pair
and preshared key made by wgjit), connects through a running gateway, the live view shows the
gateway; disable the peer on the page: the gateway removes it and the client is cut off within
about a second; enable it: it connects again.

`WGJIT_WEB_SCREENSHOT=docs/img/web.png` also saves the page as the README shows it (the
screenshot there is made this way)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.browser import chromium, require_chromium, serve, sign_in
from wgjit.keys import PrivateKey
from wgjit.lab import CONNECT_SPACING, Lab, time_factor, wait_for
from wgjit.service import PeerService
from wgjit.store import open_store

pytestmark = pytest.mark.netns

# disable on the page -> the client's pings go unanswered: the SQLite change feed is polled
# every 0.5 s, the removal takes milliseconds (issue 13: "cut off within ~1 s")
CUT_OFF_S = 1.5


def test_disable_on_the_page_cuts_the_client_off(tmp_path: Path) -> None:
    require_chromium()
    shot = os.environ.get("WGJIT_WEB_SCREENSHOT")
    with Lab() as lab, chromium() as browser:
        gw = lab.add_gateway()
        client = lab.add_client()
        store = f"sqlite:///{tmp_path / 'peers.db'}"
        with open_store(store) as st:
            st.set_defaults({"pool": "100.65.0.0/24", "endpoint": f"{gw.underlay_v4}:51820"})
        gw_key = gw.public_key.b64()
        with serve(store, tmp_path, "--gateway-public-key", gw_key) as server:
            page = browser.new_page(viewport={"width": 1180, "height": 900})
            page.set_default_timeout(10_000)
            sign_in(page, server.url)
            # add the peer as a phone's owner would: wgjit makes the key pair and a preshared
            # key, the page shows the config and its QR code once
            page.fill("#add-name", "laptop")
            page.fill("#add-ips", f"{client.tunnel_ip}/32")
            page.click("#add button[type=submit]")
            page.wait_for_selector("#qr")
            assert page.evaluate("document.getElementById('qr').naturalWidth") > 100
            conf = parse_config(page.inner_text("#config-text"))
            assert conf["PublicKey"] == gw_key and conf["Address"] == f"{client.tunnel_ip}/32"
            assert conf["Endpoint"] == f"{gw.underlay_v4}:51820"
            # the client takes the config (what scanning the QR code does on a phone)
            client.set_private_key(PrivateKey.from_b64(conf["PrivateKey"]))
            key = client.public_key.b64()

            def connect() -> float | None:
                """A fresh session to the gateway with the config's preshared key."""
                time.sleep(CONNECT_SPACING)
                client.connect_to(gw)
                client.wg("set", client.ifname, "peer", gw_key, "preshared-key", "/dev/stdin",
                          input=conf["PresharedKey"])  # fmt: skip
                return client.ping(gw.tunnel_ip, timeout=7)

            g = lab.start_gateway(store, "--gateway-id", "gw-web")
            try:
                rtt = connect()
                assert rtt is not None and rtt < 1000
                # the live view shows the gateway (its heartbeat) without a reload
                page.goto(f"{server.url}/")
                page.wait_for_selector("#live table.gateways td:text-is('gw-web')")
                if shot:
                    screenshot(page, lab, store, Path(shot))

                row = page.locator("table.peers tr[data-peer='laptop']")
                start = time.monotonic()
                row.locator("button.disable").click()
                page.wait_for_selector("table.peers tr[data-peer='laptop'] .state.disabled")
                wait_for("the gateway to remove the disabled peer",
                         lambda: key not in gw.peers(), timeout=CUT_OFF_S)  # fmt: skip
                gone_s = time.monotonic() - start
                assert client.ping(gw.tunnel_ip, timeout=0.5) is None
                print(f"disable on the page -> peer removed from the device: {gone_s:.2f} s")
                assert gone_s < CUT_OFF_S * time_factor()
                g.wait_event("evict", reason="disabled", peer="laptop")

                page.locator("table.peers tr[data-peer='laptop'] button.enable").click()
                page.wait_for_selector("table.peers tr[data-peer='laptop'] .state.active")
                rtt = connect()
                assert rtt is not None and rtt < 1000
            except BaseException:
                print("\n".join(g.lines[-30:]))
                raise
            finally:
                assert g.stop() == 0, "\n".join(g.lines[-20:])


def parse_config(text: str) -> dict[str, str]:
    """`Key = value` lines of a wg-quick config (keys are unique in a one-peer config)."""
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition(" = ")
        if sep:
            out[k.strip()] = v.strip()
    return out


def screenshot(page: Any, lab: Lab, store: str, path: Path) -> None:
    """The page as the README shows it: a few more peers (one disabled), a stranger knocking
    (a reject), and the connected client's traffic once a sweep has recorded it."""
    client, gw = lab.clients[0], lab.gateway
    assert gw is not None
    with open_store(store) as st:
        service = PeerService(st)
        for name in ("phone", "tablet", "nas"):
            service.add(name, public_key=PrivateKey.generate().public_key())
        service.disable("tablet")
    stranger = lab.add_client()  # a key the store does not know: rejected, "unknown"
    stranger.ping(gw.tunnel_ip, timeout=0.5)
    # traffic totals reach the store at the gateway's sweeps: ping until the live view has them
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and not page.locator("#live table.busiest").count():
        client.ping(gw.tunnel_ip, timeout=1)
        time.sleep(0.5)
    page.reload()
    page.wait_for_selector("#live table.gateways")
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
