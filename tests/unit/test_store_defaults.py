"""Store-wide defaults (`wgjit store set-defaults`/`show-defaults`) and `peer add --allowed-ips
auto` from the address pool: the store part on both backends (also concurrent adds never share
an address), the pool arithmetic, and the CLI (flags win; every bad input one line, exit 1,
store unchanged)."""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgjit.addr import parse_networks
from wgjit.cli import main
from wgjit.keys import PrivateKey, PublicKey
from wgjit.store import PeerRefused, Store, open_store
from wgjit.store.pool import Pool, PoolError, add_with_auto_address, next_free, parse_pool


def key() -> PublicKey:
    return PrivateKey.generate().public_key()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite://{tmp_path}/peers.db"


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    with open_store(url) as s:
        yield s


# -- the store -------------------------------------------------------------------------------


def test_defaults_set_clear_and_persist(url: str, store: Store) -> None:
    assert store.get_defaults() == {}
    assert store.set_defaults({"mtu": "1380", "dns": "10.8.0.1"}) == {
        "dns": "10.8.0.1", "mtu": "1380"}  # fmt: skip
    assert store.set_defaults({"mtu": "1400", "dns": None, "pool": "10.8.0.0/24"}) == {
        "mtu": "1400", "pool": "10.8.0.0/24"}  # fmt: skip
    cursor = store.change_cursor()
    store.set_defaults({"endpoint": "vpn.example.net"})
    assert store.changes_since(cursor)[0] == []  # not a change gateways care about
    with open_store(url, create=False) as again:
        assert again.get_defaults() == {
            "endpoint": "vpn.example.net", "mtu": "1400", "pool": "10.8.0.0/24"}  # fmt: skip


def pool_add(store: Store, name: str) -> tuple[str, ...]:
    k = key()
    peer = add_with_auto_address(store, lambda nets: store.add_peer(name, k, nets))
    return tuple(str(n) for n in peer.allowed_ips)


def test_auto_skips_network_first_and_taken_addresses(store: Store) -> None:
    with pytest.raises(PoolError, match="store set-defaults --pool"):
        pool_add(store, "a")
    store.set_defaults({"pool": "10.8.0.0/29,fd00:8::/125"})
    assert pool_add(store, "a") == ("10.8.0.2/32", "fd00:8::2/128")
    # another peer's prefix covering pool addresses (also a wider one) is skipped
    store.add_peer("site", key(), parse_networks("10.8.0.4/31"))
    assert pool_add(store, "b") == ("10.8.0.3/32", "fd00:8::3/128")
    assert pool_add(store, "c") == ("10.8.0.6/32", "fd00:8::4/128")
    with pytest.raises(PoolError, match=r"pool 10\.8\.0\.0/29 is full.*set-defaults --pool"):
        pool_add(store, "d")  # .7 is the broadcast address
    assert store.get_peer("d") is None
    store.remove("b")  # a freed address is handed out again
    assert pool_add(store, "e") == ("10.8.0.3/32", "fd00:8::3/128")


def test_auto_refused_for_another_reason_is_not_retried(store: Store) -> None:
    store.set_defaults({"pool": "10.9.0.0/24"})
    k = key()
    store.add_peer("a", k, parse_networks("100.65.0.2/32"))
    with pytest.raises(PeerRefused):  # the same key: not a taken address, no retry loop
        add_with_auto_address(store, lambda nets: store.add_peer("b", PublicKey(bytes(32)), nets))


def test_concurrent_auto_adds_never_share_an_address(url: str, store: Store) -> None:
    store.set_defaults({"pool": "10.7.0.0/24"})
    got: list[tuple[str, ...]] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with open_store(url) as s:  # one connection each, as separate CLI processes
                for j in range(5):
                    got.append(pool_add(s, f"w{i}-{j}"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(got) == 20 and len(set(got)) == 20
    assert sorted(ipaddress.ip_network(g[0]) for g in got) == [
        ipaddress.ip_network(f"10.7.0.{i}/32") for i in range(2, 22)
    ]


# -- the pool arithmetic ---------------------------------------------------------------------


def test_parse_pool() -> None:
    assert parse_pool(" 10.8.0.0/24 , fd00::/64 ") == Pool(
        ipaddress.IPv4Network("10.8.0.0/24"), ipaddress.IPv6Network("fd00::/64"))  # fmt: skip
    assert str(parse_pool("fd00::/64")) == "fd00::/64"
    for bad, why in [
        ("10.8.0.0/24,10.9.0.0/24", "at most one IPv4 and one IPv6"),
        ("10.8.0.0/31", "too small"),
        ("fd00::/127", "too small"),
        ("10.8.0.1/24", "host bits"),
        ("127.0.0.0/8", "loopback"),
        ("0.0.0.0/0", "whole address family"),
        ("nonsense", "not a valid CIDR"),
    ]:
        with pytest.raises(PoolError, match=why):
            parse_pool(bad)


def test_next_free_jumps_over_nested_and_wide_prefixes() -> None:
    pool = parse_pool("10.0.0.0/16")
    taken = parse_networks("10.0.0.2/32,10.0.0.0/30,10.0.0.3/32,10.0.0.8/29,10.0.0.4/32")
    assert next_free(pool, taken) == parse_networks("10.0.0.5/32")
    assert next_free(pool, parse_networks("10.0.0.0/24")) == parse_networks("10.0.1.0/32")
    with pytest.raises(PoolError, match="full"):
        next_free(pool, parse_networks("10.0.0.0/8"))
    # a /30 pool has exactly one address for peers
    assert next_free(parse_pool("10.1.0.0/30"), ()) == parse_networks("10.1.0.2/32")
    with pytest.raises(PoolError):
        next_free(parse_pool("10.1.0.0/30"), parse_networks("10.1.0.2/32"))


# -- the command line ------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_defaults_fill_configs_and_flags_win(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "--store", url, "store", "init")[0] == 0
    rc, out, err = run(capsys, "--store", url, "store", "set-defaults", "--endpoint",
                       "vpn.example.net", "--dns", "10.8.0.1", "--mtu", "1380",
                       "--persistent-keepalive", "25", "--client-allowed-ips", "10.8.0.0/24",
                       "--pool", "10.8.0.0/24,fd00:8::/64")  # fmt: skip
    assert rc == 0, err
    assert "pool = 10.8.0.0/24,fd00:8::/64" in out and "mtu = 1380" in out
    rc, out, err = run(capsys, "--store", url, "peer", "add", "phone", "--allowed-ips", "auto")
    assert rc == 0, err
    assert "Address = 10.8.0.2/32, fd00:8::2/128" in out
    assert "Endpoint = vpn.example.net:51820" in out and "DNS = 10.8.0.1" in out
    assert "MTU = 1380" in out and "PersistentKeepalive = 25" in out
    assert "AllowedIPs = 10.8.0.0/24" in out
    rc, out, err = run(capsys, "--store", url, "peer", "config", "phone", "--mtu", "1280",
                       "--endpoint", "192.0.2.1:443")  # fmt: skip
    assert rc == 0, err
    assert "MTU = 1280" in out and "Endpoint = 192.0.2.1:443" in out and "DNS = 10.8.0.1" in out
    rc, out, _ = run(capsys, "--store", url, "store", "set-defaults", "--clear", "mtu",
                     "--clear", "dns")  # fmt: skip
    assert rc == 0 and "mtu" not in out and "dns" not in out
    rc, out, _ = run(capsys, "--store", url, "store", "show-defaults", "--json")
    assert rc == 0 and json.loads(out) == {
        "client-allowed-ips": "10.8.0.0/24", "endpoint": "vpn.example.net",
        "persistent-keepalive": "25", "pool": "10.8.0.0/24,fd00:8::/64"}  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["store", "set-defaults"], "nothing to set; give --endpoint"),
        (["store", "set-defaults", "--mtu", "5"], "--mtu 5 is out of range; use 576-65535"),
        (["store", "set-defaults", "--mtu", "x"], "--mtu 'x' is not a whole number"),
        (["store", "set-defaults", "--persistent-keepalive", "0"], "out of range"),
        (["store", "set-defaults", "--endpoint", "a b:1"], "--endpoint 'a b:1' is not HOST:PORT"),
        (["store", "set-defaults", "--dns", "bad_name!"], "--dns 'bad_name!' is neither"),
        (["store", "set-defaults", "--client-allowed-ips", "10.0.0.1/8"], "host bits"),
        (["store", "set-defaults", "--pool", "10.0.0.0/31"], "too small"),
        (["store", "set-defaults", "--pool", "10.0.0.0/8,10.1.0.0/16"], "at most one IPv4"),
        (["store", "set-defaults", "--mtu", "1400", "--clear", "mtu"], "contradict"),
        (
            ["peer", "add", "p", "--allowed-ips", "auto"],
            "needs an address pool; set one with `wgjit store set-defaults --pool",
        ),
        (["peer", "add", "p", "--allowed-ips", "auto", "--allow-overlap"], "drop --allow-overlap"),
    ],
)
def test_cli_bad_input_is_one_line_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    url = f"sqlite://{tmp_path}/peers.db"
    with open_store(url) as s:
        s.set_defaults({"endpoint": "vpn.example.net:51820"})
        s.add_peer("a", key(), parse_networks("10.8.0.9/32"))
        before = (s.get_defaults(), s.list_peers())
    rc, out, err = run(capsys, "--store", url, *argv)
    assert (rc, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith("wgjit: error: ") and message in err, err
    with open_store(url) as s:
        assert (s.get_defaults(), s.list_peers()) == before


def test_cli_full_pool_and_missing_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite://{tmp_path}/peers.db"
    assert run(capsys, "--store", url, "store", "init")[0] == 0
    assert run(capsys, "--store", url, "store", "set-defaults", "--pool", "10.3.0.0/30")[0] == 0
    assert run(capsys, "--store", url, "peer", "add", "a", "--allowed-ips", "auto")[0] == 0
    rc, out, err = run(capsys, "--store", url, "peer", "add", "b", "--allowed-ips", "auto")
    assert (rc, out) == (1, "") and err.count("\n") == 1
    assert "pool 10.3.0.0/30 is full; widen it with `wgjit store set-defaults --pool" in err
    missing = tmp_path / "typo.db"
    rc, out, err = run(capsys, "--store", str(missing), "store", "set-defaults", "--mtu", "1400")
    assert rc == 1 and "does not exist" in err and not missing.exists()
    rc, out, err = run(capsys, "--store", str(missing), "store", "show-defaults")
    assert rc == 1 and "does not exist" in err and not missing.exists()


def test_a_store_made_before_defaults_upgrades(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The defaults step comes after every older step (SQLite 6 after 1-5, PostgreSQL 5 after
    1-4): an older store upgrades in place, keeps its peers and starts with no defaults."""
    from wgjit.store import postgres as pg_mod
    from wgjit.store import sqlite as sqlite_mod

    for mod, url, before in (
        (sqlite_mod, f"sqlite://{tmp_path}/old.db", 5),
        (pg_mod, request.getfixturevalue("pg_url"), 4),
    ):
        full = mod.MIGRATIONS
        assert "CREATE TABLE defaults" in str(full[before][0])
        monkeypatch.setattr(mod, "MIGRATIONS", full[:before])
        with open_store(url) as old:
            old.add_peer("alice", key(), parse_networks("10.8.0.2/32"))
        monkeypatch.setattr(mod, "MIGRATIONS", full)
        with open_store(url, create=False) as new:
            assert new.get_defaults() == {} and new.get_peer("alice") is not None
            new.set_defaults({"pool": "10.8.0.0/24"})
            assert pool_add(new, "bob") == ("10.8.0.3/32",)


def test_cli_auto_never_creates_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "typo.db"
    rc, out, err = run(capsys, "--store", str(missing), "peer", "add", "p", "--allowed-ips", "auto")
    assert (rc, out) == (1, "") and err.count("\n") == 1
    assert "does not exist; create it with `wgjit store init" in err and not missing.exists()


def test_cli_set_auto_moves_a_peer_into_the_pool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite://{tmp_path}/peers.db"
    with open_store(url) as s:
        s.add_peer("a", key(), parse_networks("10.9.9.9/32"))
        s.set_defaults({"pool": "10.4.0.0/24"})
    rc, out, err = run(capsys, "--store", url, "peer", "set", "a", "--allowed-ips", "auto")
    assert rc == 0 and "allowed-ips 10.4.0.2/32" in out, err
    rc, out, err = run(capsys, "--store", url, "peer", "set", "nobody", "--allowed-ips", "auto")
    assert rc == 1 and err.startswith("wgjit: error: no peer named 'nobody'")
