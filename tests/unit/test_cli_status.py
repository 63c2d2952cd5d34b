"""`wgjit status` and the status columns of `peer list/show` (SQLite store)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.unit.test_cli import run
from wgjit.addr import parse_networks
from wgjit.keys import PrivateKey
from wgjit.status import ago, human_bytes
from wgjit.store import Traffic, open_store


@pytest.fixture
def url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    u = f"sqlite:///{tmp_path / 'peers.db'}"
    monkeypatch.setenv("WGJIT_STORE", u)
    now = time.time()
    with open_store(u) as s:
        keys = []
        for i, name in enumerate(("alice", "bob", "carol")):
            k = PrivateKey.generate().public_key()
            keys.append(k)
            s.add_peer(name, k, parse_networks(f"100.65.0.{i + 2}/32"))
        s.heartbeat("gw-a", installed=2, rejects={"unknown": 4, "replay": 1})
        s.heartbeat("gw-b", installed=0, rejects={})
        s.claim_many(keys[:2], "gw-a")
        s.record_traffic(
            [
                Traffic(keys[0], 1_500_000, 3000, now - 75, "198.18.0.11:40000"),
                Traffic(keys[1], 10, 20, now - 5, "198.18.0.12:40001"),
            ]
        )
        s.record_traffic([Traffic(keys[0], 500_000, 0)])  # a second install's bytes
    return u


def test_status_table(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "status")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].endswith(": 3 peers, 2 gateways")
    gw = {ln.split()[0]: ln.split() for ln in lines if ln.startswith("gw-")}
    # installed (its device) vs held (the store's claims), then drops, most first
    assert gw["gw-a"][-4:] == ["2", "2", "unknown=4", "replay=1"]
    assert gw["gw-b"][-3:] == ["0", "0", "-"]
    busiest = lines[lines.index(next(ln for ln in lines if ln.startswith("BUSIEST"))) + 1 :]
    assert [ln.split()[0] for ln in busiest] == ["alice", "bob"]  # carol has no traffic
    assert busiest[0].split()[1:5] == ["1.9", "MiB", "2.9", "KiB"]
    assert busiest[0].split()[5:] == ["1m", "ago", "gw-a", "198.18.0.11:40000"]


def test_status_json_and_top(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "status", "--json", "--top", "1")
    assert rc == 0
    d = json.loads(out)
    assert d["peers"] == 3
    assert [(g["gateway_id"], g["installed"], g["claimed"], g["drops"]) for g in d["gateways"]] == [
        ("gw-a", 2, 2, {"replay": 1, "unknown": 4}),
        ("gw-b", 0, 0, {}),
    ]
    (alice,) = d["busiest"]
    assert (alice["name"], alice["rx_bytes"], alice["tx_bytes"], alice["holder"]) == (
        "alice", 2_000_000, 3000, "gw-a"
    )  # fmt: skip
    assert alice["endpoint"] == "198.18.0.11:40000" and alice["last_handshake"].endswith("Z")
    rc, out, _ = run(capsys, "status", "--top", "0")
    assert rc == 0 and "BUSIEST" not in out


def test_status_bad_input_is_one_line(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "status", "--top", "-3")
    assert (rc, out) == (1, "") and err.count("\n") == 1 and "--top must be 0 or more" in err
    rc, out, err = run(capsys, "--store", url + ".missing", "status")
    assert (rc, out) == (1, "") and err.count("\n") == 1 and "wgjit store init" in err


def test_status_of_an_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    u = f"sqlite:///{tmp_path / 'empty.db'}"
    open_store(u).close()
    rc, out, _ = run(capsys, "--store", u, "status")
    assert rc == 0 and out.splitlines() == [f"store {u}: 0 peers, 0 gateways"]


def test_peer_list_and_show_have_holder_handshake_and_traffic(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(capsys, "peer", "list")
    assert rc == 0
    header, *rows = out.splitlines()
    assert header.split()[5:9] == ["HOLDER", "HANDSHAKE", "RX", "TX"]
    by_name = {r.split()[0]: r.split() for r in rows}
    assert by_name["alice"][4:11] == ["gw-a", "1m", "ago", "1.9", "MiB", "2.9", "KiB"]
    assert by_name["carol"][4:9] == ["-", "-", "0", "B", "0"]
    rc, out, _ = run(capsys, "peer", "show", "alice", "--json")
    d = json.loads(out)
    assert (d["holder"], d["rx_bytes"], d["tx_bytes"], d["endpoint"]) == (
        "gw-a", 2_000_000, 3000, "198.18.0.11:40000"
    )  # fmt: skip
    rc, out, _ = run(capsys, "peer", "show", "carol")
    assert "rx_bytes: 0" in out and "last_handshake: None" in out


def test_formatting_helpers() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 5 * 2**30)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 GiB"
    ]  # fmt: skip
    assert [ago(t, 1000.0) for t in (None, 999.5, 940, 1000 - 7200, 1000 - 3 * 86400)] == [
        "-", "0s ago", "1m ago", "2h ago", "3d ago"
    ]  # fmt: skip
