"""The web page's sans-IO parts: sessions and CSRF tokens (wgjit/web/session.py) and how
values are shown, escaped (wgjit/web/render.py). The page itself runs in Chromium: tests/web."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from wgjit.web.render import cell, human_bytes
from wgjit.web.session import SESSION_TTL_S, Sessions


def test_a_session_is_signed_with_the_token_and_expires() -> None:
    s = Sessions("tok")
    v = s.issue(now=1000.0)
    assert "tok" not in v
    assert s.valid(v, now=1000.0) and s.valid(v, now=1000.0 + SESSION_TTL_S)
    assert not s.valid(v, now=1001.0 + SESSION_TTL_S)
    assert not Sessions("other").valid(v, now=1000.0)  # another token: every session ends
    issued, nonce, mac = v.split(".")
    assert not s.valid(f"{int(issued) + 9999}.{nonce}.{mac}", now=1000.0)  # tampered
    for junk in ("", "x", "a.b.c", "..", None):
        assert not s.valid(junk, now=1000.0)


def test_signing_out_ends_that_session_only() -> None:
    s = Sessions("tok")
    a, b = s.issue(), s.issue()
    s.end(a)
    assert not s.valid(a) and s.valid(b)


def test_csrf_token_is_bound_to_the_session() -> None:
    s = Sessions("tok")
    a, b = s.issue(), s.issue()
    assert s.check_csrf(a, s.csrf(a))
    assert not s.check_csrf(a, s.csrf(b)) and not s.check_csrf(a, "")


def test_token_check_ignores_a_trailing_newline_only() -> None:
    s = Sessions("tok")
    assert s.check_token("tok") and s.check_token("tok\n")
    assert not s.check_token("to") and not s.check_token("tokk") and not s.check_token("")


def test_cells_escape_every_value() -> None:
    evil = "<script>alert(1)</script>"
    assert "<script>" not in cell("name", evil)
    assert "&lt;script&gt;" in cell("endpoint", evil)
    assert "<script>" not in cell("rejects", {evil: 3, "unknown": evil})
    assert "<script>" not in cell("allowed_ips", [evil, "10.0.0.1/32"])


def test_cells_show_times_bytes_and_counts() -> None:
    now = 1_764_561_600.0  # 2025-12-01T04:00:00Z
    assert ">2 min ago</time>" in cell("last_handshake", "2025-12-01T03:58:00Z", now=now)
    assert 'title="2025-12-01T03:58:00Z"' in cell("last_handshake", "2025-12-01T03:58:00Z", now)
    assert ">1.5 KiB<" in cell("rx_bytes", 1536)
    assert human_bytes(5) == "5 B" and human_bytes(3 * 1024**3) == "3.0 GiB"
    assert cell("installed", 3) == "3"
    assert "—" in cell("holder", None)
    assert cell("revoked", True) == "yes"
    shown = cell("rejects", {"unknown": 3, "disabled": 1})
    assert "unknown <b>3</b>" in shown and "disabled <b>1</b>" in shown


# -- the page mounted by create_app, over a real SQLite store (no browser: cookies, headers) --


def _client(tmp_path: Path, scheme: str) -> TestClient:
    from wgjit.api.app import create_app
    from wgjit.service import PeerService
    from wgjit.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'peers.db'}")
    app = create_app(PeerService(store), "unit-test-token-0123456789")
    return TestClient(app, base_url=f"{scheme}://testserver")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_session_cookie_is_secure_over_https(tmp_path: Path, scheme: str) -> None:
    with _client(tmp_path, scheme) as c:
        r = c.post(
            "/ui/login", data={"token": "unit-test-token-0123456789"}, follow_redirects=False
        )
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert ("secure" in cookie.split("; ")) == (scheme == "https")
        page = c.get("/")
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["cache-control"] == "no-store"


def test_pages_need_a_session_and_are_not_in_the_api_document(tmp_path: Path) -> None:
    with _client(tmp_path, "http") as c:
        assert c.get("/", follow_redirects=False).headers["location"] == "/ui/login"
        assert c.get("/ui/live").status_code == 401
        assert c.get("/ui/peers/x", follow_redirects=False).status_code == 303
        r = c.post("/ui/peers", data={"name": "x"}, follow_redirects=False)
        assert r.status_code == 403
        paths = c.get("/openapi.json").json()["paths"]
        assert not [p for p in paths if not p.startswith("/api/")]


def test_package_data_covers_every_template_and_static_file() -> None:
    """pyproject's package-data globs match every file the page serves, so an install (not
    only this checkout) has them."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["wgjit.web"]
    web = root / "wgjit" / "web"
    files = [p.relative_to(web).as_posix() for d in ("templates", "static")
             for p in (web / d).rglob("*") if p.is_file()]  # fmt: skip
    assert files
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []


def test_a_form_returns_only_to_a_path_on_this_site() -> None:
    from wgjit.web import safe_back

    for ok in ("/", "/?prefix=pho&limit=2", "/ui/peers/phone", "/?cursor=a%40b"):
        assert safe_back(ok) == ok
    for bad in ("", "https://evil.example/", "//evil.example", "/\\evil.example",
                "/\t/evil.example", "/\n/evil.example", "\\\\evil", "javascript:alert(1)",
                " /", "/ /x"):  # fmt: skip
        assert safe_back(bad) == "/", bad


def test_without_chromium_the_browser_tests_fail_naming_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import tests.browser

    monkeypatch.setattr(tests.browser, "CHROMIUM", tmp_path / "no-chromium")
    with pytest.raises(pytest.fail.Exception) as e:  # a failure, never a skip
        tests.browser.require_chromium()
    assert "apt-get install --no-install-recommends chromium" in str(e.value)
