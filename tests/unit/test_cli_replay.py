"""Anti-replay as an operator meets it, on both stores: backups carry each peer's replay mark,
a key added back keeps its mark (and the CLI says so), `peer show` shows it, `peer
reset-replay` clears it only when confirmed, `gateway --max-clock-skew` is checked."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from wgjit.addr import parse_networks
from wgjit.cli import main
from wgjit.keys import PrivateKey, PublicKey
from wgjit.store import Handshake, open_store

# 2026-11-24T07:30:01.204Z as a client's TAI64N timestamp (2^62 + 10 + unix seconds)
WHEN = "2026-11-24T07:30:01.204Z"
MARK = struct.pack(">QI", 2**62 + 10 + 1795505401, 204_000_000)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    u = f"sqlite://{tmp_path}/peers.db" if request.param == "sqlite" else None
    if u is None:
        u = request.getfixturevalue("pg_url")
    monkeypatch.setenv("WGJIT_STORE", u)
    return u


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def add_seen(url: str, name: str, mark: bytes = MARK) -> PublicKey:
    """A peer whose client has handshaken (its mark set, as a gateway would)."""
    key = PrivateKey.generate().public_key()
    with open_store(url) as s:
        s.add_peer(name, key, parse_networks("100.65.0.2/32"))
        assert s.advance_handshake(Handshake(key, mark, 1.0))
    return key


def mark_of(url: str, name: str) -> bytes | None:
    with open_store(url) as s:
        p = s.get_peer(name)
    assert p is not None
    return p.handshake_hwm


def test_export_import_carries_the_mark(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_seen(url, "alice")
    rc, out, _ = run(capsys, "peer", "export")
    assert rc == 0 and json.loads(out)["handshake_mark"] == MARK.hex()
    rc, out, _ = run(capsys, "peer", "export", "--format", "csv")
    assert out.splitlines()[1].endswith(f",false,false,,{MARK.hex()}")
    backup = tmp_path / "backup.jsonl"
    assert run(capsys, "peer", "export", str(backup))[0] == 0
    fresh = f"sqlite://{tmp_path}/fresh.db"
    rc, out, err = run(capsys, "--store", fresh, "peer", "import", str(backup))
    assert (rc, err) == (0, "") and "1 added" in out
    assert mark_of(fresh, "alice") == MARK
    # an older backup never moves the mark back; a newer one moves it forward
    rec = json.loads(backup.read_text())
    older, newer = bytearray(MARK), bytearray(MARK)
    older[7] -= 1
    newer[7] += 1
    for mark, expect, counts in ((older, MARK, "1 unchanged"), (newer, newer, "1 updated")):
        backup.write_text(json.dumps({**rec, "handshake_mark": mark.hex()}) + "\n")
        rc, out, _ = run(capsys, "--store", fresh, "peer", "import", str(backup))
        assert rc == 0 and counts in out
        assert mark_of(fresh, "alice") == bytes(expect)


def test_a_bad_mark_is_a_bad_row(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = PrivateKey.generate().public_key().b64()
    src = tmp_path / "in.csv"
    src.write_text(
        "name,public_key,allowed_ips,handshake_mark\n"
        f"a,{key},100.65.0.2/32,{MARK.hex()[:-2]}\n"
        f"b,{PrivateKey.generate().public_key().b64()},100.65.0.3/32,{'zz' * 12}\n"
    )
    rc, out, err = run(capsys, "peer", "import", str(src))
    assert rc == 1 and "0 added" in out
    assert err.count("field handshake_mark:") == 2 and f"{src}:2:" in err and f"{src}:3:" in err


def test_a_key_added_back_keeps_its_mark_and_says_so(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = add_seen(url, "alice")
    assert run(capsys, "peer", "remove", "alice")[0] == 0
    rc, out, err = run(capsys, "peer", "add", "alice", "--allowed-ips", "100.65.0.2/32",
                       "--public-key", key.b64())  # fmt: skip
    assert rc == 0 and out.startswith("added peer alice")
    assert err.startswith(
        f"wgjit: note: key was used before; its replay mark from {WHEN} is kept (initiations"
        " up to then stay refused; `wgjit peer reset-replay` clears it)\n"
    )
    assert mark_of(url, "alice") == MARK
    # a rotation to a key used before says so too, and retires the old key with its mark
    other = PrivateKey.generate().public_key()
    with open_store(url) as s:
        s.add_peer("bob", other, parse_networks("100.65.0.3/32"))
        assert s.advance_handshake(Handshake(other, MARK, 1.0))
        s.remove("bob")
    rc, out, err = run(capsys, "peer", "rotate", "alice", "--public-key", other.b64())
    assert rc == 0 and f"key was used before; its replay mark from {WHEN} is kept" in err
    assert mark_of(url, "alice") == MARK
    rc, out, err = run(capsys, "peer", "rotate", "alice", "--public-key", key.b64())
    assert rc == 0 and "key was used before" in err  # the first key: retired, not forgotten
    # through an import too
    assert run(capsys, "peer", "remove", "alice")[0] == 0
    src = tmp_path / "in.csv"
    src.write_text(f"name,public_key,allowed_ips\nalice,{key.b64()},100.65.0.2/32\n")
    rc, out, err = run(capsys, "peer", "import", str(src))
    assert rc == 0 and "1 added" in out and "1 added peers have keys used before" in err
    assert mark_of(url, "alice") == MARK


def test_show_displays_the_mark_and_the_holder(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = add_seen(url, "alice")
    with open_store(url) as s:
        s.heartbeat("gw-a")
        s.claim(key, "gw-a")
    rc, out, _ = run(capsys, "peer", "show", "alice")
    assert rc == 0 and f"handshake_mark: {WHEN}\n" in out and "holder: gw-a\n" in out
    rc, out, _ = run(capsys, "peer", "show", "alice", "--json")
    shown = json.loads(out)
    assert (shown["handshake_mark"], shown["holder"]) == (WHEN, "gw-a")
    with open_store(url) as s:
        s.add_peer("bob", PrivateKey.generate().public_key(), ())
    shown = json.loads(run(capsys, "peer", "show", "bob", "--json")[1])
    assert (shown["handshake_mark"], shown["holder"]) == (None, None)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_reset_replay_asks_on_a_terminal(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = add_seen(url, "alice")
    monkeypatch.setattr("sys.stdin", _Terminal("alice-typo\n"))
    rc, out, err = run(capsys, "peer", "reset-replay", "alice")
    assert rc == 1 and "type the peer name to confirm: " in err
    assert err.endswith("wgjit: error: not confirmed; the replay mark of peer alice is unchanged\n")
    assert WHEN in err and mark_of(url, "alice") == MARK
    monkeypatch.setattr("sys.stdin", _Terminal("alice\n"))
    rc, out, err = run(capsys, "peer", "reset-replay", "alice")
    assert rc == 0 and mark_of(url, "alice") is None
    # (on a terminal the answer typed, and echoed, ends the prompt's line)
    assert err.splitlines()[-1].endswith(
        f"wgjit: reset-replay: cleared the replay mark of peer alice (key {key.short()}...,"
        f" was {WHEN})"
    )


def test_reset_replay_without_a_terminal_needs_yes(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = add_seen(url, "alice")
    with open_store(url) as s:
        s.heartbeat("gw-a")
        s.claim(key, "gw-a")
    monkeypatch.setattr("sys.stdin", io.StringIO("alice\n"))  # piped: not a confirmation
    rc, out, err = run(capsys, "peer", "reset-replay", "alice")
    assert (rc, out) == (1, "") and err.count("\n") == 1 and "pass --yes" in err
    assert mark_of(url, "alice") == MARK
    rc, out, err = run(capsys, "peer", "reset-replay", "alice", "--yes")
    assert rc == 0 and mark_of(url, "alice") is None
    # one line on stderr says what was done, with the old mark
    assert err == (
        f"wgjit: reset-replay: cleared the replay mark of peer alice (key {key.short()}...,"
        f" was {WHEN}, installed on gateway gw-a)\n"
    )
    assert "gateway gw-a has the peer installed" in out
    rc, out, err = run(capsys, "peer", "reset-replay", "alice", "--yes")
    assert (rc, out, err) == (0, "peer alice has no replay mark; nothing to reset\n", "")
    rc, _, err = run(capsys, "peer", "reset-replay", "ghost", "--yes")
    assert rc == 1 and "ghost" in err and err.count("\n") == 1


@pytest.mark.parametrize("value", ["59", "nan", "inf", "-1"])
def test_max_clock_skew_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    rc, _, err = run(capsys, "--store", f"sqlite://{tmp_path}/p.db", "gateway", "--interface",
                     "wg0", "--max-clock-skew", value)  # fmt: skip
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith("wgjit: error: --max-clock-skew") and ">= 60" in err


def test_max_clock_skew_reaches_the_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from wgjit import cli
    from wgjit.gateway.core import ConfigError

    seen: list[Any] = []

    class Config(cli.GatewayConfig):
        def validate(self) -> list[str]:
            seen.append(self)
            raise ConfigError("stop here")

    monkeypatch.setattr(cli, "GatewayConfig", Config)
    argv = ["--store", f"sqlite://{tmp_path}/p.db", "gateway", "--interface", "wg0"]
    assert run(capsys, *argv, "--max-clock-skew", "60")[0] == 1
    assert run(capsys, *argv)[0] == 1
    assert [c.max_clock_skew for c in seen] == [60.0, 3600.0]
