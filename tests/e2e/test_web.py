"""The web page end to end (issue 13): in a real headless Chromium, sign in to `wgjit serve`,
add the peer of a stock wireguard-go client, see it connect through a running gateway and show
in the live view, disable it on the page: the gateway removes it and the client is cut off
within about a second; enable it: it connects again.

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
from wgjit.lab import Lab, first_ping, time_factor, wait_for
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
        with serve(store, tmp_path) as server:
            page = browser.new_page(viewport={"width": 1180, "height": 900})
            page.set_default_timeout(10_000)
            sign_in(page, server.url)
            page.fill("#add-name", "laptop")
            page.fill("#add-ips", f"{client.tunnel_ip}/32")
            page.fill("#add-key", client.public_key.b64())
            page.uncheck("#add-psk")  # the lab's client has no preshared key
            page.click("#add button[type=submit]")
            page.wait_for_selector("#config-text")
            key = client.public_key.b64()

            g = lab.start_gateway(store, "--gateway-id", "gw-web")
            try:
                assert first_ping(client, gw) < 1000
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
                assert first_ping(client, gw) < 1000
            except BaseException:
                print("\n".join(g.lines[-30:]))
                raise
            finally:
                assert g.stop() == 0, "\n".join(g.lines[-20:])


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
