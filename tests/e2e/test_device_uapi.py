"""UAPIDevice against real wireguard-go (Debian's 0.0.20220316) in network namespaces; no mocks.

Also pins down "role inversion": installing a peer with its endpoint and persistent keepalive 1,
then setting keepalive 0 right away, makes the gateway initiate the handshake to the client.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from wgjit.addr import Endpoint, IPNetwork
from wgjit.device import DeviceError, DeviceNotFound, PeerConfig, PeerState
from wgjit.device.uapi import UAPIDevice, UAPIError, uapi_socket_path
from wgjit.keys import PresharedKey, PrivateKey, PublicKey

from .conftest import UAPI_DIR, Netns, WireguardGo, unique_name, wait_until

pytestmark = pytest.mark.netns

GW_PORT = 51820
CLIENT_PORT = 51821


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def ep(text: str) -> Endpoint:
    return Endpoint.parse(text)


def new_key() -> PublicKey:
    return PublicKey(os.urandom(32))


def uapi_raw(ifname: str, request: str) -> str:
    """Send one raw UAPI request on a fresh connection; return the whole response."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(uapi_socket_path(ifname)))
        s.sendall(request.encode())
        buf = b""
        while not buf.endswith(b"\n\n"):
            chunk = s.recv(65536)
            assert chunk, f"connection closed; got {buf!r}"
            buf += chunk
    return buf.decode()


@pytest.fixture
def gw(netns: Callable[[], Netns], wireguard_go: Callable[[Netns], WireguardGo]) -> WireguardGo:
    return wireguard_go(netns())


@pytest.fixture
def dev(gw: WireguardGo) -> Iterator[UAPIDevice]:
    with UAPIDevice(gw.ifname) as d:
        d.configure(PrivateKey.generate(), GW_PORT)
        yield d


# -- reading and writing peers ----------------------------------------------------------------


def test_read_fresh_then_configured_device(gw: WireguardGo) -> None:
    with UAPIDevice(gw.ifname) as d:
        fresh = d.read()
        assert fresh.name == gw.ifname
        assert fresh.private_key is None and fresh.public_key is None
        assert fresh.peers == {}

        key = PrivateKey.generate()
        d.configure(key, GW_PORT)
        state = d.read()
        assert state.private_key == key
        assert state.public_key == key.public_key()
        assert state.listen_port == GW_PORT
        assert state.peers == {}


def test_add_peers_with_every_field(dev: UAPIDevice, gw: WireguardGo) -> None:
    a, b = new_key(), new_key()
    psk = PresharedKey.generate()
    a_ips = (net("100.65.98.2/32"), net("fd65:98::2/128"), net("10.20.0.0/16"))
    dev.set_peer(
        PeerConfig(a, ep("198.18.98.2:51821"), a_ips, preshared_key=psk, persistent_keepalive=25)
    )
    dev.set_peer(PeerConfig(b, ep("[fd18:98::3]:51822"), (net("100.65.98.3/32"),)))

    peers = dev.read().peers
    assert set(peers) == {a, b}
    pa = peers[a]
    assert (pa.endpoint, pa.persistent_keepalive) == (ep("198.18.98.2:51821"), 25)
    assert set(pa.allowed_ips) == set(a_ips)
    assert (pa.last_handshake, pa.rx_bytes, pa.tx_bytes) == (None, 0, 0)
    assert peers[b] == PeerState(b, ep("[fd18:98::3]:51822"), (net("100.65.98.3/32"),))

    # the preshared key is not part of PeerState: check it with the stock tool
    psks = dict(
        line.split("\t")
        for line in gw.ns.run("wg", "show", gw.ifname, "preshared-keys").split("\n")
        if line
    )
    assert psks == {a.b64(): psk.b64(), b.b64(): "(none)"}


def test_update_only_the_endpoint_keeps_the_rest(dev: UAPIDevice) -> None:
    a = new_key()
    ips = (net("100.65.98.2/32"), net("fd65:98::2/128"))
    dev.set_peer(PeerConfig(a, ep("198.18.98.2:51821"), ips, persistent_keepalive=25))
    dev.set_peer(PeerConfig(a, endpoint=ep("[fd18:98::2]:40000")))
    pa = dev.read().peers[a]
    assert pa.endpoint == ep("[fd18:98::2]:40000")
    assert set(pa.allowed_ips) == set(ips)
    assert pa.persistent_keepalive == 25


def test_allowed_ips_are_replaced_not_merged(dev: UAPIDevice) -> None:
    a, other = new_key(), new_key()
    dev.set_peer(PeerConfig(other, allowed_ips=(net("100.65.98.9/32"),)))
    dev.set_peer(PeerConfig(a, allowed_ips=(net("100.65.98.2/32"), net("fd65:98::2/128"))))
    dev.set_peer(PeerConfig(a, allowed_ips=(net("100.65.98.7/32"),)))
    assert dev.read().peers[a].allowed_ips == (net("100.65.98.7/32"),)
    dev.set_peer(PeerConfig(a, allowed_ips=()))
    peers = dev.read().peers
    assert peers[a].allowed_ips == ()
    assert peers[other].allowed_ips == (net("100.65.98.9/32"),)


def test_update_only_never_creates(dev: UAPIDevice) -> None:
    absent, present = new_key(), new_key()
    dev.set_peer(PeerConfig(present, allowed_ips=(net("100.65.98.2/32"),)))
    dev.set_peer(
        PeerConfig(
            absent,
            ep("198.18.98.5:51821"),
            (net("100.65.98.5/32"),),
            preshared_key=PresharedKey.generate(),
            persistent_keepalive=1,
            update_only=True,
        )
    )
    dev.set_peer(PeerConfig(present, persistent_keepalive=7, update_only=True))
    peers = dev.read().peers
    assert set(peers) == {present}
    assert peers[present].persistent_keepalive == 7
    assert peers[present].allowed_ips == (net("100.65.98.2/32"),)


def test_batch_remove_leaves_others_untouched(dev: UAPIDevice) -> None:
    keepers = {new_key(): net(f"100.65.98.{i}/32") for i in (2, 3, 4)}
    for k, n in keepers.items():
        dev.set_peer(PeerConfig(k, ep("198.18.98.2:51821"), (n,), persistent_keepalive=25))
    doomed = [new_key() for _ in range(1000)]
    for i, k in enumerate(doomed):
        dev.set_peer(PeerConfig(k, allowed_ips=(net(f"10.1.{i // 256}.{i % 256}/32"),)))
    assert len(dev.read().peers) == 1003

    t = time.perf_counter()
    dev.remove_peers(doomed)
    elapsed = time.perf_counter() - t
    print(f"\nremove_peers: 1000 peers in one transaction took {elapsed * 1e3:.1f} ms")

    peers = dev.read().peers
    assert set(peers) == set(keepers)
    for k, n in keepers.items():
        assert peers[k] == PeerState(k, ep("198.18.98.2:51821"), (n,), persistent_keepalive=25)


def test_removing_absent_keys_is_fine(dev: UAPIDevice, gw: WireguardGo) -> None:
    present, absent = new_key(), new_key()
    dev.set_peer(PeerConfig(present))
    dev.remove_peers([absent])
    assert set(dev.read().peers) == {present}
    dev.remove_peers([absent, present, absent])
    assert dev.read().peers == {}
    gw.stop()
    dev.remove_peers([])  # nothing to do: no I/O, so no error although the daemon is gone


def test_absent_keys_on_a_full_device(dev: UAPIDevice) -> None:
    """wireguard-go creates a peer for any `public_key=` line, even to remove it or with
    update_only, and refuses that (EINVAL, "too many peers") at its 65 536-peer limit."""
    keys = [new_key() for _ in range(1 << 16)]
    body = "".join(f"public_key={k.hex()}\n" for k in keys)
    assert uapi_raw(dev.name, f"set=1\n{body}\n") == "errno=0\n\n"
    absent = new_key()
    assert uapi_raw(dev.name, f"set=1\npublic_key={absent.hex()}\nremove=true\n\n") == (
        "errno=-22\n\n"
    )

    dev.remove_peers([absent, keys[0]])
    dev.set_peer(PeerConfig(keys[0], persistent_keepalive=3))  # fills the device again
    dev.set_peer(PeerConfig(absent, persistent_keepalive=3, update_only=True))
    t = time.perf_counter()
    peers = dev.read().peers
    read_s = time.perf_counter() - t
    assert len(peers) == 1 << 16 and absent not in peers
    assert peers[keys[0]].persistent_keepalive == 3
    with pytest.raises(UAPIError, match="errno=-22"):
        dev.set_peer(PeerConfig(absent))  # a real add on a full device still fails

    t = time.perf_counter()
    hs = dev.handshakes()
    hs_s = time.perf_counter() - t
    print(f"\n65 536 peers: read() {read_s * 1e3:.0f} ms, handshakes() {hs_s * 1e3:.0f} ms")
    assert hs == dict.fromkeys(peers, 0.0)

    # the same quirk inside a batch: the absent update is dropped, the rest applied
    dev.set_peers(
        [PeerConfig(absent, persistent_keepalive=4, update_only=True),
         PeerConfig(keys[1], persistent_keepalive=4, update_only=True),
         PeerConfig(absent, persistent_keepalive=5, update_only=True),
         PeerConfig(keys[2], persistent_keepalive=5, update_only=True)]
    )  # fmt: skip
    peers = dev.read().peers
    assert absent not in peers
    assert (peers[keys[1]].persistent_keepalive, peers[keys[2]].persistent_keepalive) == (4, 5)
    with pytest.raises(UAPIError, match=r"set_peers \(2 peers\) failed: .*errno=-22"):
        dev.set_peers([PeerConfig(keys[1], persistent_keepalive=6, update_only=True),
                       PeerConfig(absent)])  # fmt: skip


def test_set_peer_latency(dev: UAPIDevice) -> None:
    for _ in range(1000):
        dev.set_peer(PeerConfig(new_key(), allowed_ips=(net("10.9.0.0/24"),)))
    configs = [
        PeerConfig(new_key(), ep("198.18.98.2:51821"), (net(f"10.2.{i // 256}.{i % 256}/32"),))
        for i in range(2000)
    ]
    t = time.perf_counter()
    for c in configs:
        dev.set_peer(c)
    per_call = (time.perf_counter() - t) / len(configs)
    updates = [PeerConfig(c.public_key, persistent_keepalive=0, update_only=True) for c in configs]
    t = time.perf_counter()
    for u in updates:
        dev.set_peer(u)
    per_update = (time.perf_counter() - t) / len(updates)
    print(
        f"\nset_peer: add {per_call * 1e6:.0f} us/call, update_only {per_update * 1e6:.0f} us/call"
    )
    assert per_call < 0.002 and per_update < 0.002


def test_handshakes_of_peers_that_never_shook_hands(dev: UAPIDevice) -> None:
    assert dev.handshakes() == {}
    keys = [new_key() for _ in range(50)]
    dev.set_peers([PeerConfig(k, ep("198.18.98.2:51821"), (net(f"10.3.0.{i}/32"),))
                   for i, k in enumerate(keys)])  # fmt: skip
    assert dev.handshakes() == dict.fromkeys(keys, 0.0)
    dev.remove_peers(keys[:10])
    assert dev.handshakes() == dict.fromkeys(keys[10:], 0.0)


def test_stats_dump_in_chunks_is_stats(dev: UAPIDevice) -> None:
    """What a sweep reads: wireguard-go's answer taken 500 peers at a time, on a connection
    of its own (the device's handle answers meanwhile), is what stats() reads at once."""
    keys = [new_key() for _ in range(3000)]
    dev.set_peers([PeerConfig(k, ep(f"198.18.{i >> 8}.{i & 255}:51821"),
                              (net(f"10.4.{i >> 8}.{i & 255}/32"),))
                   for i, k in enumerate(keys)])  # fmt: skip
    dump = dev.stats_dump()
    chunks = [dump.take(500)]
    assert len(dev.handshakes()) == 3000  # the handle, while the dump is open
    while not dump.done:
        chunks.append(dump.take(500))
    assert dump.complete and all(len(c) >= 500 for c in chunks[:-1]) and len(chunks) >= 4
    merged = {k: v for c in chunks for k, v in c.items()}
    assert sum(map(len, chunks)) == len(merged) == 3000 and merged == dev.stats()
    # an unfinished dump closed early leaves the device as usable as before
    dump = dev.stats_dump()
    dump.take(10)
    dump.close()
    dev.remove_peers(keys[:100])
    assert len(dev.handshakes()) == 2900


def test_set_peers_is_one_transaction_with_every_field(dev: UAPIDevice, gw: WireguardGo) -> None:
    psk = PresharedKey.generate()
    configs = [
        PeerConfig(new_key(), ep(f"198.18.98.2:{1024 + i}"),
                   (net(f"10.2.{i // 256}.{i % 256}/32"), net(f"fd65:98::{i:x}/128")),
                   preshared_key=psk if i % 2 else None, persistent_keepalive=i % 3)
        for i in range(2000)
    ]  # fmt: skip
    t = time.perf_counter()
    dev.set_peers(configs)
    batch_s = time.perf_counter() - t
    peers = dev.read().peers
    assert len(peers) == 2000
    for c in configs:
        assert peers[c.public_key] == PeerState(
            c.public_key, c.endpoint, c.allowed_ips or (),
            persistent_keepalive=c.persistent_keepalive or 0,
        )  # fmt: skip
    psks = dict(
        line.split("\t")
        for line in gw.ns.run("wg", "show", gw.ifname, "preshared-keys").splitlines()
    )
    assert psks == {c.public_key.b64(): psk.b64() if c.preshared_key else "(none)"
                    for c in configs}  # fmt: skip

    ones = [replace(c, public_key=new_key()) for c in configs]
    t = time.perf_counter()
    for c in ones:
        dev.set_peer(c)
    one_s = time.perf_counter() - t
    print(f"\n2000 peers: set_peer one by one {one_s * 1e3:.0f} ms, "
          f"set_peers {batch_s * 1e3:.0f} ms")  # fmt: skip


def test_set_peers_updates_in_order_and_never_creates(dev: UAPIDevice) -> None:
    present, absent, added = new_key(), new_key(), new_key()
    dev.set_peer(PeerConfig(present, ep("198.18.98.2:51821"), (net("100.65.98.2/32"),)))
    dev.set_peers(
        [PeerConfig(absent, ep("198.18.98.5:51821"), (net("100.65.98.5/32"),),
                    persistent_keepalive=1, update_only=True),
         PeerConfig(present, persistent_keepalive=7, update_only=True),
         PeerConfig(added, allowed_ips=(net("100.65.98.3/32"),), persistent_keepalive=9),
         PeerConfig(added, allowed_ips=(net("100.65.98.4/32"),), update_only=True),
         PeerConfig(present, endpoint=ep("[fd18:98::2]:40000"), update_only=True)]
    )  # fmt: skip
    peers = dev.read().peers
    assert set(peers) == {present, added}
    p_ips, a_ips = (net("100.65.98.2/32"),), (net("100.65.98.4/32"),)
    assert peers[present] == PeerState(present, ep("[fd18:98::2]:40000"), p_ips,
                                       persistent_keepalive=7)  # fmt: skip
    assert peers[added] == PeerState(added, None, a_ips, persistent_keepalive=9)
    dev.set_peers([])  # nothing to do


def test_set_peers_error_fails_the_batch_then_device_still_usable(dev: UAPIDevice) -> None:
    configs = [PeerConfig(new_key(), allowed_ips=(net(f"10.4.0.{i}/32"),)) for i in range(20)]
    configs[10] = replace(configs[10], persistent_keepalive=70000)
    with pytest.raises(DeviceError) as e:
        dev.set_peers(configs)
    assert str(e.value).startswith(f"{dev.name}: set_peers (20 peers) failed: ")
    assert "errno=-22" in str(e.value)
    # not atomic: wireguard-go applied the peers before the bad line (and created that one)
    assert set(configs[i].public_key for i in range(10)) <= set(dev.handshakes())
    configs[10] = replace(configs[10], persistent_keepalive=5)
    dev.set_peers(configs)  # the whole batch again: re-applying is harmless
    peers = dev.read().peers
    assert set(peers) == {c.public_key for c in configs}
    assert peers[configs[10].public_key].persistent_keepalive == 5


# -- errors and reconnection -------------------------------------------------------------------


def test_missing_socket_is_device_not_found() -> None:
    name = unique_name("wjn")
    with pytest.raises(DeviceNotFound) as e:
        UAPIDevice(name)
    assert str(e.value) == (
        f"no wireguard-go UAPI socket for interface {name!r} at /var/run/wireguard/{name}.sock; "
        "is wireguard-go running?"
    )


def test_stale_socket_is_device_not_found() -> None:
    name = unique_name("wjs")
    path = UAPI_DIR / f"{name}.sock"
    UAPI_DIR.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))  # bound, never listening: connect() is refused
        with pytest.raises(DeviceNotFound, match="is wireguard-go running"):
            UAPIDevice(name)
    finally:
        s.close()
        path.unlink(missing_ok=True)


def test_refused_operation_names_interface_operation_and_errno(
    netns: Callable[[], Netns], wireguard_go: Callable[[Netns], WireguardGo]
) -> None:
    ns = netns()
    first, second = wireguard_go(ns), wireguard_go(ns)
    with UAPIDevice(first.ifname) as d1, UAPIDevice(second.ifname) as d2:
        d1.configure(listen_port=GW_PORT)
        with pytest.raises(DeviceError) as e:
            d2.configure(PrivateKey.generate(), listen_port=GW_PORT)
        msg = str(e.value)
        assert second.ifname in msg and "configure" in msg
        assert "errno=-98" in msg and os.strerror(98) in msg
        assert d2.read().listen_port != GW_PORT  # still usable afterwards


def test_invalid_value_mid_transaction_then_device_still_usable(dev: UAPIDevice) -> None:
    """wireguard-go stops reading at the bad line and would parse the rest of our request as
    the next operation (then hang up): the backend must start over on a fresh connection."""
    k = new_key()
    bad = PeerConfig(k, persistent_keepalive=70000, allowed_ips=(net("100.65.98.2/32"),))
    with pytest.raises(DeviceError, match=r"set_peer .*errno=-22 \(Invalid argument\)"):
        dev.set_peer(bad)
    dev.set_peer(PeerConfig(k, persistent_keepalive=5, allowed_ips=(net("100.65.98.2/32"),)))
    assert dev.read().peers[k].persistent_keepalive == 5


def test_reconnects_once_after_wireguard_go_restart(
    netns: Callable[[], Netns], wireguard_go: Callable[..., WireguardGo]
) -> None:
    ns = netns()
    first = wireguard_go(ns)
    with UAPIDevice(first.ifname) as d:
        d.configure(PrivateKey.generate(), GW_PORT)
        first.stop()
        wireguard_go(ns, first.ifname)  # same interface name, new process, new socket
        key = PrivateKey.generate()
        d.configure(key, GW_PORT)  # on the old connection: EOF/EPIPE, reconnect, succeed
        assert d.read().private_key == key

        second_pid = d.read()  # and the connection is reused from now on
        assert second_pid.peers == {}


def test_daemon_gone_raises_device_error_quickly(gw: WireguardGo) -> None:
    with UAPIDevice(gw.ifname) as d:
        d.read()
        gw.stop()
        t = time.monotonic()
        with pytest.raises(DeviceNotFound, match="is wireguard-go running"):
            d.set_peer(PeerConfig(new_key()))
        assert time.monotonic() - t < 1.0


# -- role inversion: the gateway initiates the handshake to a stock client ---------------------


@dataclass
class Pair:
    gw: WireguardGo
    client: WireguardGo
    dev: UAPIDevice  # the gateway
    client_dev: UAPIDevice  # only to observe the client
    client_key: PublicKey
    gw_key: PublicKey


@pytest.fixture
def pair(
    netns: Callable[[], Netns],
    wireguard_go: Callable[[Netns], WireguardGo],
    tmp_path: Path,
) -> Iterator[Pair]:
    """Gateway and client namespaces joined by a veth: underlay 198.18.98.0/24, tunnel
    100.65.98.0/24. The client is a stock wireguard-go set up with `wg set` and the gateway
    as its only peer; the gateway device starts with no peers."""
    gns, cns = netns(), netns()
    gns.run(
        "ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", cns.name
    )
    for ns, link, addr in ((gns, "veth0", "198.18.98.1/24"), (cns, "veth1", "198.18.98.2/24")):
        ns.run("ip", "addr", "add", addr, "dev", link)
        ns.run("ip", "link", "set", link, "up")

    gw_priv, client_priv = PrivateKey.generate(), PrivateKey.generate()
    gw = wireguard_go(gns)
    dev = UAPIDevice(gw.ifname)
    dev.configure(gw_priv, GW_PORT)
    gns.run("ip", "addr", "add", "100.65.98.1/24", "dev", gw.ifname)
    gns.run("ip", "link", "set", gw.ifname, "up")

    client = wireguard_go(cns)
    key_file = tmp_path / "client.key"
    key_file.write_text(client_priv.b64())
    key_file.chmod(0o600)
    cns.run(
        "wg", "set", client.ifname, "private-key", str(key_file), "listen-port", str(CLIENT_PORT),
        "peer", gw_priv.public_key().b64(), "endpoint", f"198.18.98.1:{GW_PORT}",
        "allowed-ips", "100.65.98.0/24",
    )  # fmt: skip
    cns.run("ip", "addr", "add", "100.65.98.2/24", "dev", client.ifname)
    cns.run("ip", "link", "set", client.ifname, "up")
    client_dev = UAPIDevice(client.ifname)
    try:
        yield Pair(gw, client, dev, client_dev, client_priv.public_key(), gw_priv.public_key())
    finally:
        dev.close()
        client_dev.close()


def client_config(p: Pair, keepalive: int) -> PeerConfig:
    return PeerConfig(
        p.client_key,
        ep(f"198.18.98.2:{CLIENT_PORT}"),
        (net("100.65.98.2/32"),),
        persistent_keepalive=keepalive,
    )


def test_role_inversion_keepalive_on_then_off(pair: Pair) -> None:
    # the client has sent nothing: any handshake below is initiated by the gateway
    assert pair.client_dev.read().peers[pair.gw_key].tx_bytes == 0

    t0 = time.monotonic()
    pair.dev.set_peer(client_config(pair, keepalive=1))
    pair.dev.set_peer(PeerConfig(pair.client_key, persistent_keepalive=0, update_only=True))
    installed = time.monotonic() - t0

    def handshake() -> bool:
        return pair.dev.read().peers[pair.client_key].last_handshake is not None

    wait_until("the gateway's handshake with the client", handshake, timeout=2.0)
    took = time.monotonic() - t0
    print(
        f"\nrole inversion: install {installed * 1e3:.2f} ms, handshake after {took * 1e3:.1f} ms"
    )

    state = pair.dev.read().peers[pair.client_key]
    assert state.persistent_keepalive == 0
    # the client (responder) counts the handshake once the gateway's confirming keepalive
    # arrives, a moment after the gateway itself does
    wait_until(
        "the client's side of the handshake",
        lambda: pair.client_dev.read().peers[pair.gw_key].last_handshake is not None,
        timeout=2.0,
    )
    # handshakes() says the same as read(), and the time is now
    assert state.last_handshake is not None
    assert pair.dev.handshakes() == {pair.client_key: state.last_handshake}
    assert abs(state.last_handshake - time.time()) < 5

    # no lingering keepalive: once the confirming keepalive is out, the gateway stays silent
    # (a 1 s persistent keepalive would add 32 bytes within this 1.5 s window)
    time.sleep(0.2)
    tx = pair.dev.read().peers[pair.client_key].tx_bytes
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        assert pair.dev.read().peers[pair.client_key].tx_bytes == tx
        time.sleep(0.05)

    # and the session carries the client's traffic
    pair.client.ns.run("ping", "-c", "1", "-W", "2", "100.65.98.1")
    # stats() says what read() does: the handshake, the ping's bytes, the client's endpoint
    state = pair.dev.read().peers[pair.client_key]
    assert state.rx_bytes > 0 and state.tx_bytes > 0
    assert pair.dev.stats() == {pair.client_key: (
        state.last_handshake, state.rx_bytes, state.tx_bytes, str(state.endpoint)
    )}  # fmt: skip


def test_role_inversion_in_one_set_peers_batch(pair: Pair) -> None:
    """Two sections for the same peer in one `set=1` (what set_peers sends for an install and
    its keepalive off): wireguard-go finishes the first section, sending the keepalive that
    starts the handshake, before it reads the second. So installs with role inversion can
    be batched."""
    assert pair.dev.handshakes() == {}
    pair.dev.set_peers(
        [client_config(pair, keepalive=1),
         PeerConfig(pair.client_key, persistent_keepalive=0, update_only=True)]
    )  # fmt: skip
    wait_until("the gateway's handshake with the client",
               lambda: pair.dev.handshakes()[pair.client_key] > 0, timeout=2.0)  # fmt: skip
    assert pair.dev.read().peers[pair.client_key].persistent_keepalive == 0


def test_keepalive_on_and_off_in_one_transaction_sends_nothing(pair: Pair) -> None:
    """wireguard-go sends the immediate keepalive only if the interval went from 0 to non-zero
    over the whole peer section; 1 then 0 in the same `set=1` cancels it: no initiation."""
    c = client_config(pair, keepalive=1)
    request = (
        f"set=1\npublic_key={c.public_key.hex()}\nendpoint={c.endpoint}\n"
        "allowed_ip=100.65.98.2/32\npersistent_keepalive_interval=1\n"
        "persistent_keepalive_interval=0\n\n"
    )
    assert uapi_raw(pair.gw.ifname, request) == "errno=0\n\n"
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        state = pair.dev.read().peers[pair.client_key]
        assert state.tx_bytes == 0 and state.last_handshake is None
        time.sleep(0.05)
