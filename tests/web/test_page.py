"""The web page of `wgjit serve` in a real headless Chromium (issue 13 item 5): sign in, add a
peer and see its config and QR code, search and pages, disable/enable/revoke; the session
cookie is out of the page's reach (HttpOnly, SameSite=Strict) and a change without the page's
CSRF token, or from another origin, is refused. The end-to-end flow with a running gateway
(disable on the page: the client is cut off) is tests/e2e/test_web.py."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser import TOKEN, Serve, chromium, serve, sign_in
from wgjit.service import PeerService
from wgjit.store import open_store


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("web")
    store = f"sqlite:///{tmp / 'peers.db'}"
    with open_store(store) as st:
        st.set_defaults(
            {"pool": "100.65.0.0/24", "endpoint": "vpn.example.net:51820", "dns": "100.65.0.1"}
        )
        service = PeerService(st)
        for i in range(5):
            service.add(f"bulk{i}", public_key=_key(i))
    with serve(store, tmp) as s:
        yield s


def _key(i: int) -> str:
    from wgjit.keys import PrivateKey

    return PrivateKey(bytes([i + 1]) * 32).public_key().b64()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # script errors; not "Failed to load resource" (a refused sign-in is a 401, on purpose)
    page.on(
        "console",
        lambda m: (
            m.type == "error"
            and not m.text.startswith("Failed to load resource")
            and errors.append(m.text)
        ),
    )
    page.set_default_timeout(10_000)
    yield page
    context.close()
    assert not errors, f"the page logged errors: {errors}"


def api_peer(server: Serve, name: str) -> dict[str, Any]:
    """The peer as the admin API has it (bearer token): what the store now says."""
    req = urllib.request.Request(
        f"{server.url}/api/v1/peers/{name}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        data: dict[str, Any] = json.loads(r.read())
        return data


def row(page: Any, name: str) -> Any:
    return page.locator(f"table.peers tr[data-peer='{name}']")


def test_sign_in_add_see_qr_disable_enable_revoke(server: Serve, page: Any) -> None:
    page.goto(f"{server.url}/")
    assert page.url.endswith("/ui/login")
    page.fill("#token", "wrong")
    page.click("#login button[type=submit]")
    assert "not the token" in page.inner_text(".flash.error")
    sign_in(page, server.url)

    cookie = next(c for c in page.context.cookies() if c["name"] == "wgjit_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert TOKEN not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # out of reach of any script on the page

    page.fill("#add-name", "phone")
    page.click("#add button[type=submit]")
    page.wait_for_selector("#qr")
    config = page.inner_text("#config-text")
    assert "PrivateKey = " in config and "<fill in" not in config.split("PrivateKey")[1][:20]
    assert "Address = 100.65.0.7/32" in config and "Endpoint = vpn.example.net:51820" in config
    # the QR code image loaded and decoded: a PNG, from no URL of its own
    qr = page.locator("#qr")
    assert qr.get_attribute("src").startswith("data:image/png;base64,")
    assert page.evaluate("document.getElementById('qr').naturalWidth") > 100
    assert page.inner_text("#peer-state") == "active"

    # disable from the peer's page, enable and revoke from the list
    page.click("form[action='/ui/peers/phone/disable'] button")
    page.wait_for_selector("#peer-state.disabled")
    assert "Peer phone disabled." in page.inner_text(".flash")
    assert api_peer(server, "phone")["disabled"] is True
    page.goto(f"{server.url}/?prefix=pho")
    assert row(page, "phone").locator(".state").inner_text() == "disabled"
    row(page, "phone").locator("button.enable").click()
    page.wait_for_selector("table.peers tr[data-peer='phone'] .state.active")
    assert api_peer(server, "phone")["disabled"] is False
    assert "prefix=pho" in page.url  # back where it was

    page.once("dialog", lambda d: d.accept())
    row(page, "phone").locator("button.revoke").click()
    page.wait_for_selector("table.peers tr[data-peer='phone'] .state.revoked")
    assert api_peer(server, "phone")["revoked"] is True


def test_search_and_pages(server: Serve, page: Any) -> None:
    sign_in(page, server.url)
    page.fill("#search-prefix", "bulk")
    page.click("#search button[type=submit]")
    names = page.locator("table.peers tr[data-peer]").evaluate_all(
        "rows => rows.map(r => r.dataset.peer)"
    )
    assert names == [f"bulk{i}" for i in range(5)]
    # two a page: a keyset cursor walks them in order
    page.goto(f"{server.url}/?prefix=bulk&limit=2")
    seen: list[str] = []
    for _ in range(5):
        seen += page.locator("table.peers tr[data-peer]").evaluate_all(
            "rows => rows.map(r => r.dataset.peer)"
        )
        if page.locator("#next-page").count() == 0:
            break
        page.click("#next-page")
    assert seen == [f"bulk{i}" for i in range(5)]
    page.click("#first-page")
    assert page.locator("table.peers tr[data-peer]").count() == 2


def test_add_refused_names_the_problem(server: Serve, page: Any) -> None:
    sign_in(page, server.url)
    page.fill("#add-name", "bulk0")
    page.click("#add button[type=submit]")
    assert "Not added:" in page.inner_text(".flash.error")
    assert "bulk0" in page.inner_text(".flash.error")


def test_a_peer_whose_key_its_owner_has_gets_no_qr(server: Serve, page: Any) -> None:
    sign_in(page, server.url)
    page.fill("#add-name", "laptop")
    page.fill("#add-key", _key(40))
    page.click("#add button[type=submit]")
    page.wait_for_selector("#config-text")
    assert "PrivateKey = <fill in" in page.inner_text("#config-text")
    assert page.locator("#qr").count() == 0


def test_changes_need_the_csrf_token_and_this_origin(server: Serve, page: Any) -> None:
    sign_in(page, server.url)
    req = page.context.request  # shares the browser's cookies: a signed-in session
    good = page.locator("#add input[name=csrf]").get_attribute("value")
    r = req.post(f"{server.url}/ui/peers/bulk1/disable", form={"csrf": "forged"})
    assert r.status == 403
    r = req.post(f"{server.url}/ui/peers/bulk1/disable", form={"csrf": good},
                 headers={"Origin": "https://evil.example"})  # fmt: skip
    assert r.status == 403
    r = req.get(f"{server.url}/ui/peers/bulk1/disable")
    assert r.status == 405  # a change is never a GET
    assert api_peer(server, "bulk1")["disabled"] is False
    # a page of another origin posting a form: the cookie does not go along (SameSite=Strict)
    other = page.context.new_page()
    other.set_content(
        f"<form method=post action='{server.url}/ui/peers/bulk1/disable'>"
        f"<input name=csrf value='{good}'><button>go</button></form>"
    )
    other.click("button")
    other.wait_for_load_state()
    assert api_peer(server, "bulk1")["disabled"] is False


def test_values_are_escaped(server: Serve, page: Any) -> None:
    sign_in(page, server.url)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{server.url}/?prefix=%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
    assert "<img src=x onerror=alert(1)>" in page.inner_text(".flash.error")
    assert page.locator("main img").count() == 0 and not dialogs
    page.goto(f"{server.url}/ui/peers/nobody")
    assert "no peer named 'nobody'" in page.inner_text(".flash.error")


def test_live_view_refreshes_and_signing_out_ends_the_session(server: Serve, page: Any) -> None:
    sign_in(page, server.url)
    live = page.locator("#live")
    first = live.get_attribute("data-updated")
    page.wait_for_function(
        "prev => document.getElementById('live').dataset.updated !== prev", arg=first
    )
    old = next(c for c in page.context.cookies() if c["name"] == "wgjit_session")
    page.click("header button")
    assert page.url.endswith("/ui/login")
    # the ended session is refused even if its cookie was kept
    page.context.add_cookies([old])
    page.goto(f"{server.url}/")
    assert page.url.endswith("/ui/login")
