"""The CLI as an operator meets it: outputs, and one clear error line for every bad input."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from wgjit.cli import main
from wgjit.keys import PrivateKey, PublicKey


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "peers.db"
    monkeypatch.setenv("WGJIT_STORE", f"sqlite:///{path}")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def listing(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    rc, out, _ = run(capsys, "peer", "list", "--json")
    assert rc == 0
    result: list[dict[str, object]] = json.loads(out)
    return result


def test_add_with_key_list_show_revoke_remove(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = PrivateKey.generate().public_key().b64()
    rc, out, _ = run(capsys, "peer", "add", "laptop", "--allowed-ips", "100.65.0.2/32,fd65::2/128",
                     "--public-key", key)  # fmt: skip
    assert rc == 0 and "laptop" in out
    peers = listing(capsys)
    assert peers == [
        {
            **peers[0],
            "name": "laptop",
            "public_key": key,
            "allowed_ips": ["100.65.0.2/32", "fd65::2/128"],
            "revoked": False,
        }
    ]
    rc, out, _ = run(capsys, "peer", "show", "laptop")
    assert rc == 0 and key in out
    assert run(capsys, "peer", "revoke", "laptop")[0] == 0
    assert listing(capsys)[0]["revoked"] is True
    assert run(capsys, "peer", "remove", "laptop")[0] == 0
    assert listing(capsys) == []


def test_add_without_key_prints_a_client_config(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = PrivateKey.generate().public_key().b64()
    rc, out, err = run(capsys, "peer", "add", "phone", "--allowed-ips", "100.65.0.3/32",
                       "--gateway-public-key", gw, "--endpoint", "vpn.example.net:51820",
                       "--preshared-key", "--qr")  # fmt: skip
    assert rc == 0
    conf = dict(
        line.split(" = ", 1) for line in out.splitlines() if " = " in line and line[0] != "#"
    )
    priv = PrivateKey.from_b64(conf["PrivateKey"])
    assert conf["Address"] == "100.65.0.3/32"
    assert conf["PublicKey"] == gw
    assert conf["Endpoint"] == "vpn.example.net:51820"
    assert "PresharedKey" in conf
    assert listing(capsys)[0]["public_key"] == priv.public_key().b64()
    assert "█" in err or "▀" in err  # the QR code: on stderr, `> phone.conf` stays a config
    assert "█" not in out and "▀" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["peer", "add", "x", "--allowed-ips", "100.65.0.2/32", "--public-key", "nope"],
         "public key"),
        (["peer", "add", "x", "--allowed-ips", "100.65.0.1/24"], "did you mean 100.65.0.0/24"),
        (["peer", "add", "x", "--allowed-ips", "banana"], "not a valid CIDR"),
        (["peer", "add", "bad name!", "--allowed-ips", "100.65.0.9/32"], "name"),
        (["peer", "add", "a", "--allowed-ips", "100.65.0.9/32"], "already exists"),
        (["peer", "revoke", "ghost"], "ghost"),
        (["peer", "remove", "ghost"], "ghost"),
        (["peer", "show", "ghost"], "ghost"),
        (["gateway", "--interface", "wjnosuchif0"], "wjnosuchif0"),
        (["gateway", "--interface", "wg0", "--idle-timeout", "60"], "--idle-timeout"),
        (["gateway", "--interface", "wg0", "--queue-num", "70000"],
         "--queue-num 70000 is out of range; use 0-65535"),
        (["gateway", "--interface", "wg0", "--queue-num", "-1"], "--queue-num -1 is out of range"),
        (["gateway", "--interface", "wg0", "--queue-num", "x"], "is not a whole number"),
        (["gateway", "--interface", "wg0", "--idle-timeout", "nan"],
         "--idle-timeout nan is not a finite positive number"),
        (["gateway", "--interface", "wg0", "--idle-timeout", "inf"], "--idle-timeout inf"),
        (["gateway", "--interface", "wg0", "--sweep-interval", "nan"], "--sweep-interval nan"),
        (["gateway", "--interface", "wg0", "--sweep-interval", "-5"], "--sweep-interval -5"),
        (["gateway", "--interface", "wg0", "--admission-rate", "-1"], "--admission-rate -1 must"),
        (["gateway", "--interface", "wg0", "--admission-rate", "lots"],
         "--admission-rate 'lots' is not a number"),
        (["gateway", "--interface", "wg0", "--source-limit", "2000000"],
         "--source-limit 2000000 is out of range; use 0-1000000"),
        (["gateway", "--interface", "wg0", "--source-limit", "1e3"],
         "--source-limit '1e3' is not a whole number"),
        (["gateway", "--interface", "lo"], "'lo' is the loopback interface, not a WireGuard"),
        (["demo", "--connects", "0"], "--connects 0 is out of range"),
        (["--store", "::::", "peer", "list"], "is not a URL wgjit knows"),
        (["peer", "list", "--store", "mysql://u:hunter22@db/x"], "mysql://u:***@db/x"),
    ],
)  # fmt: skip
def test_bad_input_one_line_error_store_unchanged(
    store: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    key = PrivateKey.generate().public_key().b64()
    assert run(capsys, "peer", "add", "a", "--allowed-ips", "100.65.0.8/32",
               "--public-key", key)[0] == 0  # fmt: skip
    before = listing(capsys)
    rc, out, err = run(capsys, *argv)
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("wgjit: error: "), err
    assert message in err
    assert listing(capsys) == before


def test_unwritable_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, _, err = run(capsys, "--store", f"sqlite:///{blocker}/sub/peers.db", "store", "init")
    assert rc == 1
    assert err.count("\n") == 1 and "not writable" in err and "--store" in err


def test_duplicate_key_names_the_owner(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = PrivateKey.generate().public_key().b64()
    assert run(capsys, "peer", "add", "a", "--allowed-ips", "100.65.0.8/32",
               "--public-key", key)[0] == 0  # fmt: skip
    rc, _, err = run(capsys, "peer", "add", "b", "--allowed-ips", "100.65.0.9/32",
                     "--public-key", key)  # fmt: skip
    assert rc == 1 and "'a'" in err


def test_store_flag_before_or_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    key = PrivateKey.generate().public_key().b64()
    assert run(capsys, "peer", "add", "x", "--allowed-ips", "100.65.0.2/32",
               "--public-key", key, "--store", str(a))[0] == 0  # fmt: skip
    rc, out, _ = run(capsys, "peer", "list", "--store", str(a))
    assert rc == 0 and "x" in out
    rc, out, _ = run(capsys, "--store", str(a), "peer", "list")
    assert rc == 0 and "x" in out
    # after the command wins over before it
    rc, out, err = run(capsys, "--store", str(a), "peer", "list", "--store", str(b))
    assert rc == 1 and str(b) in err


def test_usage_errors_are_one_line(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["gateway", "--mode", "fast", "--interface", "wg0"])
    assert e.value.code == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("wgjit: error: argument --mode")
    assert "wgjit gateway --help" in err


def test_csv_with_a_byte_order_mark(store: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    key = PrivateKey.generate().public_key().b64()
    src = tmp_path / "sheet.csv"
    src.write_bytes(f"\ufeffname,public_key,allowed_ips\r\nx,{key},100.65.0.2/32\r\n".encode())
    rc, out, err = run(capsys, "peer", "import", str(src))
    assert (rc, err) == (0, "") and out.startswith("1 rows: 1 added")
    assert listing(capsys)[0]["name"] == "x"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://wgjit:se#cr?et@127.0.0.1:1/wgjit",
        "postgresql://wgjit:p%zzsecret@127.0.0.1:1/wgjit",
        "postgresql://wgjit:p%40ssword@127.0.0.1:1/wgjit",
        "postgresql:///wgjit?host=127.0.0.1&port=1&password=hunter22",
        "host=127.0.0.1 port=1 dbname=wgjit password=hunter22",
        "host=127.0.0.1 port=1 dbname=wgjit password='hunter 22'",
    ],
)
def test_postgres_passwords_never_shown(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "--store", url, "peer", "list")
    assert rc == 1 and err.count("\n") == 1 and err.startswith("wgjit: error: store ")
    for secret in ("se#cr?et", "zzsecret", "p%40ssword", "p@ssword", "hunter"):
        assert secret not in err + out


@pytest.mark.parametrize(
    "argv",
    [
        ["peer", "list"],
        ["peer", "show", "x"],
        ["peer", "export"],
        ["peer", "revoke", "x"],
        ["peer", "remove", "x"],
        ["gateway", "--interface", "lo"],
    ],
)
def test_missing_store_is_never_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    path = tmp_path / "typo.db"
    rc, out, err = run(capsys, *argv, "--store", str(path))
    assert rc == 1 and err.count("\n") == 1
    assert err == (
        f"wgjit: error: store {path} does not exist; create it with `wgjit store init --store"
        f" {path}`, or choose another with --store or WGJIT_STORE\n"
    )
    assert not path.exists()


def test_empty_file_is_not_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "empty.db"
    path.write_bytes(b"")
    rc, _, err = run(capsys, "peer", "list", "--store", str(path))
    assert rc == 1 and "is not an initialised wgjit store (empty or foreign)" in err
    assert path.stat().st_size == 0


def test_store_init_then_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "new" / "peers.db"
    rc, out, _ = run(capsys, "store", "init", "--store", str(path))
    assert rc == 0 and out.startswith(f"created store {path} (schema version ")
    rc, out, _ = run(capsys, "store", "init", "--store", str(path))
    assert rc == 0 and out.startswith(f"store {path} already exists")
    assert run(capsys, "peer", "list", "--store", str(path))[1] == "no peers\n"


def test_gateway_refuses_an_empty_store_while_the_device_has_peers(tmp_path: Path) -> None:
    from wgjit.cli import CLIError, _refuse_empty_store
    from wgjit.store import open_store

    key = PrivateKey.generate().public_key()

    class Dev:
        name = "wg0"

        def __init__(self, n: int) -> None:
            self.n = n

        def handshakes(self) -> dict[PublicKey, float]:
            return {key: 0.0} if self.n else {}

    with open_store(str(tmp_path / "p.db")) as store:
        with pytest.raises(CLIError, match=r"has no peers but interface wg0 has 1:.*adopt-empty"):
            _refuse_empty_store(store, Dev(1), "p.db")
        _refuse_empty_store(store, Dev(0), "p.db")  # nothing to lose: fine
        store.add_peer("a", key, ())
        _refuse_empty_store(store, Dev(1), "p.db")  # a store with peers: reconcile decides


def test_overlapping_add_refused_naming_the_peer(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    k = [PrivateKey.generate().public_key().b64() for _ in range(3)]
    assert run(capsys, "peer", "add", "a", "--allowed-ips", "100.65.0.0/24",
               "--public-key", k[0])[0] == 0  # fmt: skip
    before = listing(capsys)
    rc, out, err = run(capsys, "peer", "add", "b", "--allowed-ips", "100.65.0.9/32",
                       "--public-key", k[1])  # fmt: skip
    assert rc == 1 and err.count("\n") == 1 and out == ""
    assert "100.65.0.9/32 overlaps 100.65.0.0/24 of peer 'a'" in err and "--allow-overlap" in err
    assert listing(capsys) == before
    for bad in ("127.0.0.1/32", "224.0.0.0/4", "0.0.0.0/0"):
        rc, _, err = run(capsys, "peer", "add", "c", "--allowed-ips", bad, "--public-key", k[2])
        assert rc == 1 and err.count("\n") == 1, err
    rc, _, err = run(capsys, "peer", "add", "c", "--allowed-ips", "1.2.3.4/32",
                     "--public-key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")  # fmt: skip
    assert rc == 1 and "low-order" in err
    assert listing(capsys) == before
    rc, _, _ = run(capsys, "peer", "add", "b", "--allowed-ips", "0.0.0.0/0,100.65.0.9/32",
                   "--public-key", k[1], "--allow-overlap")  # fmt: skip
    assert rc == 0


def test_lifecycle_commands(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = PrivateKey.generate().public_key().b64()
    rc, _, _ = run(capsys, "peer", "add", "a", "--allowed-ips", "100.65.0.2/32",
                   "--public-key", key, "--expires", "30d")  # fmt: skip
    assert rc == 0
    p = listing(capsys)[0]
    assert p["state"] == "active" and str(p["expires_at"]).endswith("Z")
    assert str(p["created_at"]).startswith("20") and "T" in str(p["created_at"])
    rc, out, _ = run(capsys, "peer", "list")
    assert "active" in out and "EXPIRES" in out
    assert run(capsys, "peer", "disable", "a")[0] == 0
    assert listing(capsys)[0]["state"] == "disabled"
    rc, out, _ = run(capsys, "peer", "show", "a")
    assert "state: disabled" in out and "expires_at: 20" in out
    assert run(capsys, "peer", "enable", "a")[0] == 0
    assert listing(capsys)[0]["state"] == "active"
    rc, out, _ = run(capsys, "peer", "set", "a", "--rename", "laptop", "--allowed-ips",
                     "100.65.0.9/32", "--expires", "never")  # fmt: skip
    assert rc == 0 and "expires never" in out
    p = listing(capsys)[0]
    assert (p["name"], p["allowed_ips"], p["expires_at"]) == ("laptop", ["100.65.0.9/32"], None)
    rc, out, err = run(capsys, "peer", "rotate", "laptop", "--gateway-public-key", key)
    assert rc == 0 and f"{key} is refused from now on" in err
    conf = dict(ln.split(" = ", 1) for ln in out.splitlines() if " = " in ln and ln[0] != "#")
    new = PrivateKey.from_b64(conf["PrivateKey"]).public_key().b64()
    assert listing(capsys)[0]["public_key"] == new != key


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["peer", "set", "a"], "nothing to change"),
        (["peer", "set", "a", "--expires", "yesterday"], "--expires 'yesterday' is neither"),
        (["peer", "set", "a", "--expires", "2001-01-01"], "is not in the future"),
        (["peer", "set", "a", "--rename", "b c"], "invalid peer name"),
        (["peer", "set", "a", "--allowed-ips", "127.0.0.1/32"], "loopback"),
        (["peer", "add", "b", "--allowed-ips", "100.65.0.3/32", "--expires", "never"],
         "--expires 'never' is neither"),
        (["peer", "disable", "ghost"], "ghost"),
        (["peer", "rotate", "a", "--public-key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="],
         "low-order"),
    ],
)  # fmt: skip
def test_lifecycle_bad_input(
    store: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    key = PrivateKey.generate().public_key().b64()
    assert run(capsys, "peer", "add", "a", "--allowed-ips", "100.65.0.2/32",
               "--public-key", key)[0] == 0  # fmt: skip
    before = listing(capsys)
    rc, out, err = run(capsys, *argv)
    assert rc == 1 and err.count("\n") == 1 and err.startswith("wgjit: error: "), err
    assert message in err
    assert listing(capsys) == before


def conf_of(text: str) -> dict[str, str]:
    return dict(ln.split(" = ", 1) for ln in text.splitlines() if " = " in ln and ln[0] != "#")


def test_peer_config_for_a_peer_whose_key_wgjit_never_had(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = PrivateKey.generate().public_key().b64()
    key = PrivateKey.generate().public_key().b64()
    rc, out, err = run(capsys, "peer", "add", "laptop", "--allowed-ips", "100.65.0.2/32",
                       "--public-key", key, "--preshared-key")  # fmt: skip
    assert rc == 0 and "wgjit peer config laptop" in err
    rc, out, err = run(capsys, "peer", "config", "laptop", "--gateway-public-key", gw,
                       "--endpoint", "vpn.example.net", "--dns", "100.65.0.1,corp.example",
                       "--mtu", "1380", "--persistent-keepalive", "25")  # fmt: skip
    assert rc == 0
    conf = conf_of(out)
    assert conf["PrivateKey"] == "<fill in: this peer's private key>"
    assert conf["Endpoint"] == "vpn.example.net:51820"  # the default port
    assert conf["PublicKey"] == gw and len(conf["PresharedKey"]) == 44
    assert (conf["DNS"], conf["MTU"]) == ("100.65.0.1, corp.example", "1380")
    assert conf["PersistentKeepalive"] == "25" and conf["Address"] == "100.65.0.2/32"
    assert "lacks the private key" in err
    target = tmp_path / "laptop.conf"
    rc, out, err = run(capsys, "peer", "config", "laptop", "--gateway-public-key", gw,
                       "--endpoint", "[fd00::1]:443", "-o", str(target))  # fmt: skip
    assert rc == 0 and out == "" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert conf_of(target.read_text())["Endpoint"] == "[fd00::1]:443"
    rc, _, err = run(capsys, "peer", "config", "laptop", "-o", str(target))
    assert rc == 1 and "pass --force" in err


def test_generated_peer_config_to_files_with_a_png_qr(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = PrivateKey.generate().public_key().b64()
    conf, png = tmp_path / "phone.conf", tmp_path / "phone.png"
    rc, out, err = run(capsys, "peer", "add", "phone", "--allowed-ips", "100.65.0.3/32",
                       "--gateway-public-key", gw, "--endpoint", "198.51.100.1:51820",
                       "-o", str(conf), "--qr", str(png))  # fmt: skip
    assert rc == 0 and out == ""
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for f in (conf, png):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    priv = PrivateKey.from_b64(conf_of(conf.read_text())["PrivateKey"])
    assert listing(capsys)[0]["public_key"] == priv.public_key().b64()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--endpoint", "vpn.example.net:51820\nPostUp = rm -rf /"], "--endpoint"),
        (["--endpoint", "vpn.example.net:0"], "--endpoint"),
        (["--endpoint", "vpn.example.net:99999"], "--endpoint"),
        (["--endpoint", "fd00::1:51820"], "in brackets"),
        (["--endpoint", "bad_host!:51820"], "--endpoint"),
        (["--dns", "1.1.1.1\nPostUp = x"], "--dns"),
        (["--client-allowed-ips", "0.0.0.0/0\nPostUp = x"], "--client-allowed-ips"),
        (["--mtu", "100"], "--mtu 100 is out of range"),
        (["--persistent-keepalive", "nan"], "--persistent-keepalive 'nan' is not a whole"),
        (["--qr"], "--qr needs the peer's private key"),
        (["--qr", "x.jpg"], "--qr needs"),
    ],
)
def test_config_inputs_are_validated_before_anything_is_written(
    store: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    key = PrivateKey.generate().public_key().b64()
    assert run(capsys, "peer", "add", "a", "--allowed-ips", "100.65.0.2/32",
               "--public-key", key)[0] == 0  # fmt: skip
    before = listing(capsys)
    rc, out, err = run(capsys, "peer", "config", "a", *argv)
    assert rc == 1 and out == "" and err.count("\n") == 1, err
    assert message in err
    if argv != ["--qr"]:  # the same on add (a generated key: --qr works), before any write
        rc, out, err = run(capsys, "peer", "add", "b", "--allowed-ips", "100.65.0.3/32", *argv)
        assert rc == 1 and err.count("\n") == 1, err
        assert message in err or "give FILE.png" in err
    assert listing(capsys) == before


def test_peer_list_filters_by_prefix_and_state(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, ip in (("ab1", "10.0.0.1/32"), ("ab2", "10.0.0.2/32"), ("cd", "10.0.0.3/32")):
        key = PrivateKey.generate().public_key().b64()
        run(capsys, "peer", "add", name, "--allowed-ips", ip, "--public-key", key)
    run(capsys, "peer", "disable", "ab2")
    rc, out, _ = run(capsys, "peer", "list", "--json", "--prefix", "ab")
    assert rc == 0 and [p["name"] for p in json.loads(out)] == ["ab1", "ab2"]
    rc, out, _ = run(capsys, "peer", "list", "--json", "--state", "active")
    assert [p["name"] for p in json.loads(out)] == ["ab1", "cd"]
    rc, out, _ = run(capsys, "peer", "list", "--prefix", "ab", "--state", "disabled")
    assert rc == 0 and out.splitlines()[1].startswith("ab2 ") and len(out.splitlines()) == 2
    rc, _, err = run(capsys, "peer", "list", "--prefix", "a b")
    assert rc == 1 and err == (
        "wgjit: error: prefix 'a b' cannot be (part of) a peer name: use at most 64 of"
        " letters, digits, '.', '_', '@' and '-'\n"
    )
