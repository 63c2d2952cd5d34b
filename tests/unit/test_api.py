"""The admin API (`wgjit serve`) and the service layer under it, on real stores (SQLite and
PostgreSQL): every route, the bearer token, keyset pages, and errors as one JSON line naming
the field."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from wgjit.api.app import create_app
from wgjit.api.serve import ServeError, check_transport, parse_listen, read_token
from wgjit.errors import InputError, WgjitError
from wgjit.keys import PrivateKey
from wgjit.service import ConfigOptions, PeerService, peer_dict
from wgjit.store import MAX_PAGE, Peer, Store, UnknownPeer, open_store

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = f"sqlite://{tmp_path}/peers.db"
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    with open_store(url) as s:
        s.set_defaults({"pool": "100.65.0.0/24", "endpoint": "vpn.example.net", "dns": "1.1.1.1"})
        yield s


@pytest.fixture
def gateway_key() -> PrivateKey:
    return PrivateKey.generate()


@pytest.fixture
def service(store: Store, gateway_key: PrivateKey) -> PeerService:
    return PeerService(store, gateway_key=gateway_key.public_key(), listen_port=51999)


@pytest.fixture
def client(service: PeerService) -> TestClient:
    return TestClient(create_app(service, TOKEN))


def call(client: TestClient, method: str, path: str, **kw: Any) -> Any:
    r = client.request(method, f"/api/v1{path}", headers=AUTH, **kw)
    return r.status_code, (r.json() if r.headers.get("content-type") == "application/json" else r)


# -- the service layer ------------------------------------------------------------------------


def test_peer_dict_shows_every_peer_field(service: PeerService) -> None:
    """A field added to Peer shows up in peer_dict (and so in the API) by itself."""
    import dataclasses

    p = service.add("a", allowed_ips="auto", preshared_key=True).peer
    d = peer_dict(p)
    names = {f.name for f in dataclasses.fields(Peer)} - {"handshake_hwm"}
    assert names <= set(d) and {"state", "handshake_mark"} <= set(d)
    assert d["preshared_key"] is True  # whether there is one, never the key
    assert p.preshared_key is not None and p.preshared_key.b64() not in str(d)
    assert d["created_at"].endswith("Z") and d["state"] == "active"


def test_service_add_generates_a_key_pair_and_takes_the_pools_next_address(
    service: PeerService,
) -> None:
    a = service.add("a")
    b = service.add("b", public_key=PrivateKey.generate().public_key().b64())
    assert a.private_key is not None and a.private_key.public_key() == a.peer.public_key
    assert b.private_key is None
    assert [str(n) for n in a.peer.allowed_ips] == ["100.65.0.2/32"]
    assert [str(n) for n in b.peer.allowed_ips] == ["100.65.0.3/32"]
    text = service.client_config(a.peer, service.plan(), a.private_key).render()
    assert a.private_key.b64() in text and "Endpoint = vpn.example.net:51999" in text
    assert "DNS = 1.1.1.1" in text
    # options given win over the store's defaults
    plan = service.plan(ConfigOptions(endpoint="gw.example.org:1234", mtu=1380))
    assert plan.endpoint == "gw.example.org:1234" and plan.mtu == 1380


def test_service_errors_name_the_field(service: PeerService) -> None:
    service.add("a", allowed_ips="10.9.0.0/24")
    cases: list[tuple[Any, str]] = [
        (lambda: service.add("a"), "name"),
        (lambda: service.add("b c"), "name"),
        (lambda: service.add("b", allowed_ips="10.9.0.5/32"), "allowed_ips"),
        (lambda: service.add("b", allowed_ips="nope"), "allowed_ips"),
        (lambda: service.add("b", public_key="short"), "public_key"),
        (lambda: service.add("b", allowed_ips="auto", allow_overlap=True), "allow_overlap"),
        (lambda: service.add("b", expires_at=1.0), "expires_at"),
        (lambda: service.get("ghost"), "name"),
        (lambda: service.revoke("ghost"), "name"),
        (lambda: service.update("a"), None),
        (lambda: service.list_page(limit=0), "limit"),
        (lambda: service.list_page(cursor="a b"), "cursor"),
        (lambda: service.list_page(state="gone"), "state"),
        (lambda: service.plan(ConfigOptions(endpoint="x y")), "endpoint"),
        (lambda: service.plan(ConfigOptions(dns="!")), "dns"),
    ]
    for do, field in cases:
        with pytest.raises(WgjitError) as e:
            do()
        assert e.value.field == field, (str(e.value), field)
        assert "\n" not in str(e.value)
    with pytest.raises(UnknownPeer):
        service.get("ghost")
    with pytest.raises(InputError, match="nothing to change"):
        service.update("a")


def test_service_pages(service: PeerService) -> None:
    for n in ("a1", "a2", "a3", "b1", "b2"):
        service.add(n)
    service.disable("a2")
    page = service.list_page(limit=2)
    assert [p.name for p in page.items] == ["a1", "a2"] and page.next_cursor == "a2"
    page = service.list_page(limit=2, cursor=page.next_cursor)
    assert [p.name for p in page.items] == ["a3", "b1"] and page.next_cursor == "b1"
    page = service.list_page(limit=2, cursor=page.next_cursor)
    assert [p.name for p in page.items] == ["b2"] and page.next_cursor is None
    # an exactly full last page says so: no empty page after it
    assert service.list_page(limit=5).next_cursor is None
    assert [p.name for p in service.list_page(prefix="a", state="active").items] == ["a1", "a3"]
    with pytest.raises(InputError, match="limit"):
        service.list_page(limit=MAX_PAGE)  # the store is asked for one more


# -- the API ----------------------------------------------------------------------------------


def test_every_api_route_needs_the_token(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    routes = [(m, p) for p, ops in spec["paths"].items() for m in ops]
    assert len(routes) >= 11
    for method, path in routes:
        url = path.replace("{name}", "a")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            r = client.request(method, url, headers=headers)
            assert r.status_code == 401, (method, path, headers)
            assert r.json()["field"] == "authorization"
            assert r.headers["WWW-Authenticate"] == "Bearer"
    # the schema itself is public (it has no data), and says how to authenticate
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_add_show_config_and_qr(client: TestClient, gateway_key: PrivateKey) -> None:
    status, body = call(client, "POST", "/peers", json={"name": "phone", "preshared_key": True})
    assert status == 201
    assert body["peer"]["allowed_ips"] == ["100.65.0.2/32"] and body["peer"]["preshared_key"]
    assert "PrivateKey = " in body["config"] and "<fill in" not in body["config"]
    assert f"PublicKey = {gateway_key.public_key().b64()}" in body["config"]
    png = base64.b64decode(body["config_png_base64"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    status, shown = call(client, "GET", "/peers/phone")
    assert status == 200 and shown == body["peer"]
    status, r = call(client, "GET", "/peers/phone/config")
    assert status == 200 and r.headers["content-type"].startswith("text/plain")
    assert "PrivateKey = <fill in" in r.text and "PresharedKey = " in r.text
    # the QR of a config without its private key is refused (wgjit keeps none): rotate
    status, err = call(client, "GET", "/peers/phone/config.png")
    assert status == 409 and "rotate" in err["error"] and err["field"] == "name"
    status, rotated = call(client, "POST", "/peers/phone/rotate")
    assert status == 200 and rotated["peer"]["public_key"] != body["peer"]["public_key"]
    assert base64.b64decode(rotated["config_png_base64"]).startswith(b"\x89PNG")
    # a peer whose key its owner has: no private key, no QR
    key = PrivateKey.generate().public_key().b64()
    status, body = call(client, "POST", "/peers", json={"name": "laptop", "public_key": key})
    assert status == 201 and body["config_png_base64"] is None
    assert "PrivateKey = <fill in" in body["config"]


def test_lifecycle_through_the_api(client: TestClient) -> None:
    call(client, "POST", "/peers", json={"name": "a", "allowed_ips": ["10.1.0.0/24"]})
    status, p = call(client, "POST", "/peers/a/disable")
    assert status == 200 and p["state"] == "disabled"
    status, p = call(client, "POST", "/peers/a/enable")
    assert p["state"] == "active"
    status, p = call(
        client,
        "PATCH",
        "/peers/a",
        json={"name": "b", "allowed_ips": ["10.2.0.0/24"], "expires_at": "2099-01-01T00:00:00Z"},
    )
    assert status == 200, p
    assert (p["name"], p["allowed_ips"], p["expires_at"]) == (
        "b",
        ["10.2.0.0/24"],
        "2099-01-01T00:00:00Z",
    )
    status, p = call(client, "PATCH", "/peers/b", json={"expires_at": None})
    assert p["expires_at"] is None
    status, p = call(client, "PATCH", "/peers/b", json={"disabled": True})
    assert p["state"] == "disabled"
    status, p = call(client, "POST", "/peers/b/revoke")
    assert status == 200 and p["state"] == "revoked"
    status, p = call(client, "DELETE", "/peers/b")
    assert status == 200 and p["name"] == "b"
    status, err = call(client, "GET", "/peers/b")
    assert status == 404 and err["field"] == "name" and "no peer named 'b'" in err["error"]


def test_pages_over_the_api(client: TestClient) -> None:
    names = [f"p{i:02d}" for i in range(7)] + ["q1"]
    for n in names:
        assert call(client, "POST", "/peers", json={"name": n})[0] == 201
    call(client, "POST", "/peers/p03/revoke")
    seen, cursor = [], None
    while True:
        status, page = call(
            client, "GET", "/peers", params={"limit": 3, **({"cursor": cursor} if cursor else {})}
        )
        assert status == 200 and len(page["items"]) <= 3
        seen += [p["name"] for p in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == names
    status, page = call(client, "GET", "/peers", params={"prefix": "p", "state": "revoked"})
    assert [p["name"] for p in page["items"]] == ["p03"] and page["next_cursor"] is None
    status, page = call(client, "GET", "/peers", params={"prefix": "q"})
    assert [p["name"] for p in page["items"]] == ["q1"]


@pytest.mark.parametrize(
    ("method", "path", "kw", "status", "field"),
    [
        ("GET", "/peers", {"params": {"limit": 0}}, 422, "limit"),
        ("GET", "/peers", {"params": {"limit": 100000}}, 422, "limit"),
        ("GET", "/peers", {"params": {"limit": "x"}}, 422, "limit"),
        ("GET", "/peers", {"params": {"state": "gone"}}, 422, "state"),
        ("GET", "/peers", {"params": {"cursor": "a b"}}, 422, "cursor"),
        ("GET", "/peers", {"params": {"prefix": "/"}}, 422, "prefix"),
        ("GET", "/peers", {"params": {"limt": "5"}}, 400, "limt"),
        ("GET", "/peers/taken", {"params": {"x": "1"}}, 400, "x"),
        ("GET", "/peers", {"params": {"limit": ["1", "2"]}}, 400, "limit"),
        ("POST", "/peers", {"json": {}}, 422, "name"),
        ("POST", "/peers", {"json": {"name": "x y"}}, 422, "name"),
        ("POST", "/peers", {"json": {"name": "x", "extra": 1}}, 422, "extra"),
        ("POST", "/peers", {"json": {"name": "x", "allowed_ips": ["nope"]}}, 400, "allowed_ips"),
        (
            "POST",
            "/peers",
            {"json": {"name": "x", "allowed_ips": "10.0.0.0/8"}},
            422,
            "allowed_ips",
        ),
        ("POST", "/peers", {"json": {"name": "x", "public_key": "AAAA"}}, 422, "public_key"),
        (
            "POST",
            "/peers",
            {"json": {"name": "x", "public_key": "A" * 43 + "="}},
            409,
            "public_key",
        ),
        ("POST", "/peers", {"json": {"name": "x", "expires_at": "2001-01-01"}}, 400, "expires_at"),
        ("POST", "/peers", {"json": {"name": "x", "expires_at": "soon"}}, 422, "expires_at"),
        (
            "POST",
            "/peers",
            {"content": b"{", "headers": {"content-type": "application/json"}},
            422,
            "body",
        ),
        ("PATCH", "/peers/taken", {"json": {}}, 400, None),
        ("PATCH", "/peers/taken", {"json": {"name": "other"}}, 409, "name"),
        ("PATCH", "/peers/ghost", {"json": {"disabled": True}}, 404, "name"),
        ("GET", "/peers/bad%20name", {}, 422, "name"),
        ("DELETE", "/peers/ghost", {}, 404, "name"),
        ("POST", "/peers/ghost/revoke", {}, 404, "name"),
        ("GET", "/peers/ghost/config", {}, 404, "name"),
        ("POST", "/peers", {"json": {"name": "taken"}}, 409, "name"),
        (
            "POST",
            "/peers",
            {"json": {"name": "y", "allowed_ips": ["10.7.0.1/32"]}},
            409,
            "allowed_ips",
        ),
    ],
)
def test_bad_input_is_one_json_line_naming_the_field(
    client: TestClient, method: str, path: str, kw: dict[str, Any], status: int, field: str | None
) -> None:
    call(client, "POST", "/peers", json={"name": "taken", "allowed_ips": ["10.7.0.0/24"]})
    call(client, "POST", "/peers", json={"name": "other", "allowed_ips": ["10.8.0.0/24"]})
    headers = {**AUTH, **kw.pop("headers", {})}
    r = client.request(method, f"/api/v1{path}", headers=headers, **kw)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "field"} and body["field"] == field
    assert body["error"] and "\n" not in body["error"] and "Traceback" not in body["error"]


def test_an_unreachable_store_is_503_and_a_bug_is_500_without_a_traceback(
    service: PeerService, store: Store
) -> None:
    client = TestClient(create_app(service, TOKEN), raise_server_exceptions=False)
    store.close()  # every call now raises StoreError
    r = client.get("/api/v1/peers", headers=AUTH)
    assert r.status_code == 503 and r.json()["field"] is None
    service.list_page = None  # type: ignore[assignment,method-assign]  # a bug: not callable
    r = client.get("/api/v1/peers", headers=AUTH)
    assert r.status_code == 500
    assert r.json() == {"error": "internal error; the server's log has the details", "field": None}


def test_gateways(client: TestClient, store: Store, service: PeerService) -> None:
    added = service.add("a").peer
    store.heartbeat("gw-a", installed=1, rejects={"unknown": 3})
    store.claim(added.public_key, "gw-a")
    status, gws = call(client, "GET", "/gateways")
    assert status == 200
    assert [(g["gateway_id"], g["installed"], g["claimed"], g["rejects"]) for g in gws] == [
        ("gw-a", 1, 1, {"unknown": 3})
    ]
    assert gws[0]["heartbeat_at"].endswith("Z")
    assert call(client, "GET", "/peers/a")[1]["holder"] == "gw-a"


def test_the_web_page_hook_is_mounted(
    service: PeerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wgjit.web

    seen = []
    monkeypatch.setattr(wgjit.web, "mount", lambda app, svc, token: seen.append((svc, token)))
    create_app(service, TOKEN)
    assert seen == [(service, TOKEN)]


# -- wgjit serve's settings -------------------------------------------------------------------


def test_token_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    for mode in (0o644, 0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(ServeError, match=f"mode {mode:04o}.*chmod 600"):
            read_token(str(path))
    path.chmod(0o600)
    assert read_token(str(path)) == TOKEN
    path.chmod(0o400)
    assert read_token(str(path)) == TOKEN
    path.chmod(0o600)
    path.write_text("short\n")
    with pytest.raises(ServeError, match="at least 16"):
        read_token(str(path))
    path.write_text("two words-and-more-text\n")
    with pytest.raises(ServeError, match="one line"):
        read_token(str(path))
    with pytest.raises(ServeError, match="cannot open"):
        read_token(str(tmp_path / "missing"))
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(ServeError, match="cannot open"):
        read_token(str(link))  # never through a symbolic link
    if os.geteuid() == 0:
        path.write_text(TOKEN)
        os.chown(path, 65534, -1)
        with pytest.raises(ServeError, match="owned by uid 65534"):
            read_token(str(path))


def test_serve_refuses_a_readable_token_file_in_one_line(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o644)
    store = f"sqlite://{tmp_path}/peers.db"
    open_store(store).close()
    r = subprocess.run(
        [sys.executable, "-m", "wgjit", "--store", store, "serve", "--token-file", str(token)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (
        f"wgjit: error: --token-file {token} is mode 0644: others may read the token; make it"
        f" 0600 (`chmod 600 {token}`) and consider replacing the token\n"
    )


def test_listen_needs_tls_off_loopback(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    assert parse_listen("127.0.0.1:8080").loopback and parse_listen("[::1]:1").loopback
    for ok in ("127.0.0.1:8080", "[::1]:8080"):
        check_transport(parse_listen(ok), None, None, False)
    wide = parse_listen("0.0.0.0:8080")
    with pytest.raises(ServeError, match="--tls-cert FILE --tls-key FILE, or --insecure-http"):
        check_transport(wide, None, None, False)
    check_transport(wide, None, None, True)
    check_transport(wide, str(cert), str(cert), False)
    with pytest.raises(ServeError, match="go together"):
        check_transport(wide, str(cert), None, False)
    with pytest.raises(ServeError, match="cannot read"):
        check_transport(wide, str(cert), str(tmp_path / "missing"), False)
    with pytest.raises(ServeError, match="--listen"):
        parse_listen("localhost:8080")


def test_token_and_body_size_are_checked_before_the_body_is_read(client: TestClient) -> None:
    from wgjit.api.app import MAX_BODY

    big = b'{"name": "x", "pad": "' + b"a" * MAX_BODY + b'"}'
    r = client.post("/api/v1/peers", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["field"] == "authorization"
    r = client.post(
        "/api/v1/peers", content=big, headers={**AUTH, "content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["field"] == "body"


def test_no_error_shows_the_store_password(service: PeerService) -> None:
    from wgjit.store import StoreError

    url = "postgresql://wgjit:hunter22@db.example/wgjit"

    def fail(**kw: object) -> None:
        raise StoreError(f"store {url}: could not list peers: password hunter22 refused")

    service.list_page = fail  # type: ignore[assignment,method-assign]
    client = TestClient(create_app(service, TOKEN, store_url=url))
    r = client.get("/api/v1/peers", headers=AUTH)
    assert r.status_code == 503 and "hunter22" not in r.text and "***" in r.text
