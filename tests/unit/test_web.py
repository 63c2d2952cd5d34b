"""The web page's sans-IO parts: sessions and CSRF tokens (wgjit/web/session.py) and how
values are shown, escaped (wgjit/web/render.py). The page itself runs in Chromium: tests/web."""

from __future__ import annotations

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
