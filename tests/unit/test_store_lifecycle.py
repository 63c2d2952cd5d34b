"""The peer lifecycle on both backends: disable/enable, expiry, rename, new allowed IPs, key
rotation; each change reaches gateways through the change feed."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgjit.addr import parse_networks
from wgjit.keys import PresharedKey, PrivateKey, PublicKey
from wgjit.store import (
    DuplicatePeer,
    Handshake,
    InvalidPeerName,
    Peer,
    PeerRefused,
    Store,
    UnknownPeer,
    open_store,
)


def key() -> PublicKey:
    return PrivateKey.generate().public_key()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = f"sqlite://{tmp_path}/peers.db"
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    with open_store(url) as s:
        yield s


def test_refusal() -> None:
    p = Peer("a", key(), ())
    assert p.refusal(0) is None and p.state == "active"
    assert Peer("a", key(), (), expires_at=100.0).refusal(99.9) is None
    assert Peer("a", key(), (), expires_at=100.0).refusal(100.0) == "expired"
    assert Peer("a", key(), (), disabled=True, expires_at=1.0).refusal(5) == "disabled"
    assert Peer("a", key(), (), revoked=True, disabled=True).refusal(5) == "revoked"
    assert Peer("a", key(), (), expires_at=1.0).state == "expired"


def test_disable_enable_and_expiry_are_announced(store: Store) -> None:
    k = key()
    at = time.time() + 3600
    added = store.add_peer("a", k, parse_networks("100.65.0.2/32"), expires_at=at)
    assert added.expires_at == at and store.lookup(k) == added
    cursor = store.change_cursor()
    p = store.update_peer("a", disabled=True)
    assert p.disabled and p.refusal(time.time()) == "disabled"
    keys, cursor = store.changes_since(cursor)
    assert keys == [k]
    assert store.update_peer("a", disabled=True).disabled  # again: nothing new announced
    assert store.changes_since(cursor) == ([], cursor)
    p = store.update_peer("a", disabled=False)
    assert not p.disabled and p.refusal(time.time()) is None
    p = store.update_peer("a", expires_at=None)
    assert p.expires_at is None
    keys, cursor = store.changes_since(cursor)
    assert keys == [k]
    lookup = store.lookup(k)
    assert lookup is not None and lookup.expires_at is None and not lookup.disabled
    with pytest.raises(UnknownPeer):
        store.update_peer("ghost", disabled=True)


def test_rename_and_new_allowed_ips(store: Store) -> None:
    k = key()
    store.add_peer("a", k, parse_networks("100.65.0.2/32"))
    store.add_peer("b", key(), parse_networks("100.65.0.3/32"))
    cursor = store.change_cursor()
    with pytest.raises(DuplicatePeer):
        store.update_peer("a", new_name="b")
    with pytest.raises(InvalidPeerName):
        store.update_peer("a", new_name="no way")
    p = store.update_peer("a", new_name="laptop")
    assert p.name == "laptop" and store.get_peer("a") is None
    assert store.changes_since(cursor)[0] == [k]
    with pytest.raises(PeerRefused, match="of peer 'b'"):
        store.update_peer("laptop", allowed_ips=parse_networks("100.65.0.0/24"))
    with pytest.raises(PeerRefused, match="loopback"):
        store.update_peer("laptop", allowed_ips=parse_networks("127.0.0.1/32"))
    # its own prefix is no conflict; the old one is freed
    p = store.update_peer("laptop", allowed_ips=parse_networks("100.65.0.2/32,100.65.1.0/24"))
    assert [str(n) for n in p.allowed_ips] == ["100.65.0.2/32", "100.65.1.0/24"]
    p = store.update_peer("laptop", allowed_ips=parse_networks("100.65.9.0/24"))
    store.add_peer("c", key(), parse_networks("100.65.0.2/32"))
    with pytest.raises(PeerRefused, match="of peer 'laptop'"):
        store.add_peer("d", key(), parse_networks("100.65.9.9/32"))
    store.update_peer("laptop", allowed_ips=parse_networks("100.65.0.0/16"), allow_overlap=True)


def test_rotation_refuses_the_old_key_at_once(store: Store) -> None:
    old, new = key(), key()
    psk = PresharedKey.generate()
    store.add_peer("a", old, parse_networks("100.65.0.2/32"), psk)
    ts = struct.pack(">QI", 2**62 + 100, 0)
    assert store.advance_handshake(Handshake(old, ts, time.time()))
    store.claim(old, "gw-a")
    cursor = store.change_cursor()
    new_psk = PresharedKey.generate()
    p = store.update_peer("a", public_key=new, preshared_key=new_psk)
    assert p.public_key == new and p.preshared_key == new_psk
    assert p.handshake_hwm is None and p.last_seen is None and p.holder is None
    assert store.lookup(old) is None
    assert set(store.changes_since(cursor)[0]) == {old, new}
    b = key()
    store.add_peer("b", b, parse_networks("100.65.0.3/32"))
    with pytest.raises(DuplicatePeer, match="'b'"):
        store.update_peer("a", public_key=b)
    with pytest.raises(PeerRefused, match="low-order"):
        store.update_peer("a", public_key=PublicKey(bytes(32)))
    p = store.update_peer("a", preshared_key=None)
    assert p.preshared_key is None and p.public_key == new
