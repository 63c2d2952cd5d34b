"""NetlinkDevice against real kernel WireGuard; runs INSIDE the qemu guest (tests/kernel).

Mirrors tests/e2e/test_device_uapi.py: reading, adding, updating (update_only, replaced
allowed IPs), batched adds and updates (set_peers), batched removal, handshakes(), the errors
a kernel user meets, the interface vanishing and coming back, and role inversion between two
kernel interfaces (also batched). Not collected on the host (the file name does not start with
test_): test_kernel.py passes it to pytest in the guest.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest

from tests.e2e.conftest import Netns, unique_name, wait_until
from wgjit.addr import Endpoint, IPNetwork
from wgjit.device import DeviceError, DeviceNotFound, PeerConfig, PeerState, open_device
from wgjit.device.netlink import (
    InterfaceMissing,
    NetlinkDevice,
    NotWireGuard,
    StatsParser,
)
from wgjit.device.uapi import UAPIDevice
from wgjit.keys import PresharedKey, PrivateKey, PublicKey

GW_PORT = 51820
CLIENT_PORT = 51821


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def ep(text: str) -> Endpoint:
    return Endpoint.parse(text)


def new_key() -> PublicKey:
    return PrivateKey.generate().public_key()


@pytest.fixture
def netns() -> Iterator[Callable[[], Netns]]:
    made: list[Netns] = []

    def make() -> Netns:
        ns = Netns(unique_name("wjk-"))
        subprocess.run(["ip", "netns", "add", ns.name], check=True)
        made.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    yield make
    for ns in reversed(made):
        subprocess.run(["ip", "netns", "del", ns.name], check=False)


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class InNs:
    """Runs this thread inside a namespace for the duration of a `with` block (sockets made
    there stay in it)."""

    def __init__(self, ns: Netns) -> None:
        self.path = f"/var/run/netns/{ns.name}"

    def __enter__(self) -> None:
        self._home = os.open("/proc/self/ns/net", os.O_RDONLY)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        _setns(self._home)
        os.close(self._home)


@dataclass
class KernelWg:
    ns: Netns
    ifname: str

    def wg(self, *args: str) -> str:
        return self.ns.run("wg", *args)


def add_wg(ns: Netns, ifname: str | None = None) -> KernelWg:
    ifname = ifname or unique_name("wjk")
    ns.run("ip", "link", "add", ifname, "type", "wireguard")
    return KernelWg(ns, ifname)


@pytest.fixture
def gw(netns: Callable[[], Netns]) -> KernelWg:
    return add_wg(netns())


@pytest.fixture
def dev(gw: KernelWg) -> Iterator[NetlinkDevice]:
    with InNs(gw.ns):
        d = NetlinkDevice(gw.ifname)
        d.configure(PrivateKey.generate(), GW_PORT)
        try:
            yield d
        finally:
            d.close()


# -- reading and writing peers ----------------------------------------------------------------


def test_read_fresh_then_configured_device(gw: KernelWg) -> None:
    with InNs(gw.ns), NetlinkDevice(gw.ifname) as d:
        fresh = d.read()
        assert fresh.name == gw.ifname
        assert fresh.private_key is None and fresh.public_key is None
        assert (fresh.listen_port, fresh.peers) == (0, {})
        key = PrivateKey.generate()
        d.configure(key, GW_PORT)
        state = d.read()
        assert state.private_key == key and state.public_key == key.public_key()
        assert state.listen_port == GW_PORT and state.peers == {}


def test_open_device_auto_and_forced_pick_netlink(gw: KernelWg) -> None:
    with InNs(gw.ns):
        for backend in ("auto", "netlink"):
            d = open_device(gw.ifname, backend)
            try:
                assert isinstance(d, NetlinkDevice)
            finally:
                d.close()


def test_add_peers_with_every_field(dev: NetlinkDevice, gw: KernelWg) -> None:
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
    psks = dict(
        line.split("\t") for line in gw.wg("show", gw.ifname, "preshared-keys").splitlines()
    )
    assert psks == {a.b64(): psk.b64(), b.b64(): "(none)"}


def test_update_only_the_endpoint_keeps_the_rest(dev: NetlinkDevice) -> None:
    a = new_key()
    ips = (net("100.65.98.2/32"), net("fd65:98::2/128"))
    dev.set_peer(PeerConfig(a, ep("198.18.98.2:51821"), ips, persistent_keepalive=25))
    dev.set_peer(PeerConfig(a, endpoint=ep("[fd18:98::2]:40000")))
    pa = dev.read().peers[a]
    assert pa.endpoint == ep("[fd18:98::2]:40000")
    assert set(pa.allowed_ips) == set(ips) and pa.persistent_keepalive == 25


def test_allowed_ips_are_replaced_not_merged(dev: NetlinkDevice) -> None:
    a, other = new_key(), new_key()
    dev.set_peer(PeerConfig(other, allowed_ips=(net("100.65.98.9/32"),)))
    dev.set_peer(PeerConfig(a, allowed_ips=(net("100.65.98.2/32"), net("fd65:98::2/128"))))
    dev.set_peer(PeerConfig(a, allowed_ips=(net("100.65.98.7/32"),)))
    assert dev.read().peers[a].allowed_ips == (net("100.65.98.7/32"),)
    dev.set_peer(PeerConfig(a, allowed_ips=()))
    peers = dev.read().peers
    assert peers[a].allowed_ips == ()
    assert peers[other].allowed_ips == (net("100.65.98.9/32"),)


def test_update_only_never_creates(dev: NetlinkDevice) -> None:
    absent, present = new_key(), new_key()
    dev.set_peer(PeerConfig(present, allowed_ips=(net("100.65.98.2/32"),)))
    dev.set_peer(
        PeerConfig(absent, ep("198.18.98.5:51821"), (net("100.65.98.5/32"),),
                   preshared_key=PresharedKey.generate(), persistent_keepalive=1,
                   update_only=True)
    )  # fmt: skip
    dev.set_peer(PeerConfig(present, persistent_keepalive=7, update_only=True))
    peers = dev.read().peers
    assert set(peers) == {present}
    assert peers[present].persistent_keepalive == 7
    assert peers[present].allowed_ips == (net("100.65.98.2/32"),)


def test_long_allowed_ips_list_split_across_dump_messages(dev: NetlinkDevice) -> None:
    """1 500 prefixes (48 KB of attributes) do not fit one dump message: the kernel continues
    the peer in the next one, repeating only its key."""
    a, b = new_key(), new_key()
    many = tuple(net(f"10.{i // 256}.{i % 256}.0/24") for i in range(1500))
    dev.set_peer(PeerConfig(a, ep("198.18.98.2:51821"), many, persistent_keepalive=9))
    dev.set_peer(PeerConfig(b, allowed_ips=(net("100.65.98.3/32"),)))
    peers = dev.read().peers
    assert set(peers) == {a, b}
    assert set(peers[a].allowed_ips) == set(many) and len(peers[a].allowed_ips) == 1500
    assert (peers[a].endpoint, peers[a].persistent_keepalive) == (ep("198.18.98.2:51821"), 9)


def test_batch_remove_leaves_others_untouched(dev: NetlinkDevice) -> None:
    keepers = {new_key(): net(f"100.65.98.{i}/32") for i in (2, 3, 4)}
    for k, n in keepers.items():
        dev.set_peer(PeerConfig(k, ep("198.18.98.2:51821"), (n,), persistent_keepalive=25))
    doomed = [new_key() for _ in range(3000)]
    dev.set_peers(
        [PeerConfig(k, allowed_ips=(net(f"10.1.{i // 256}.{i % 256}/32"),))
         for i, k in enumerate(doomed)]
    )  # fmt: skip
    assert len(dev.read().peers) == 3003

    t = time.perf_counter()
    dev.remove_peers(doomed)
    elapsed = time.perf_counter() - t
    print(f"\nremove_peers: 3000 peers in 3 messages took {elapsed * 1e3:.1f} ms")
    peers = dev.read().peers
    assert set(peers) == set(keepers)
    for k, n in keepers.items():
        assert peers[k] == PeerState(k, ep("198.18.98.2:51821"), (n,), persistent_keepalive=25)


def test_removing_absent_keys_is_fine(dev: NetlinkDevice) -> None:
    present, absent = new_key(), new_key()
    dev.set_peer(PeerConfig(present))
    dev.remove_peers([absent])
    assert set(dev.read().peers) == {present}
    dev.remove_peers([absent, present, absent])
    assert dev.read().peers == {}


def test_the_device_own_key_is_ignored_as_peer(dev: NetlinkDevice) -> None:
    own = dev.read().public_key
    assert own is not None
    dev.set_peer(PeerConfig(own, allowed_ips=(net("100.65.98.2/32"),)))
    assert dev.read().peers == {}


def test_handshakes_of_peers_that_never_shook_hands(dev: NetlinkDevice) -> None:
    assert dev.handshakes() == {}
    keys = [new_key() for _ in range(50)]
    dev.set_peers([PeerConfig(k, ep("198.18.98.2:51821"), (net(f"10.3.0.{i}/32"),))
                   for i, k in enumerate(keys)])  # fmt: skip
    assert dev.handshakes() == dict.fromkeys(keys, 0.0)
    dev.remove_peers(keys[:10])
    assert dev.handshakes() == dict.fromkeys(keys[10:], 0.0)


def test_set_peers_many_per_message_with_every_field(dev: NetlinkDevice, gw: KernelWg) -> None:
    """3 000 peers of ~150 bytes: a few 64 KiB messages, not 3 000."""
    psk = PresharedKey.generate()
    configs = [
        PeerConfig(new_key(), ep(f"198.18.98.2:{1024 + i}"),
                   (net(f"10.2.{i // 256}.{i % 256}/32"), net(f"fd65:98::{i:x}/128")),
                   preshared_key=psk if i % 2 else None, persistent_keepalive=i % 3)
        for i in range(3000)
    ]  # fmt: skip
    t = time.perf_counter()
    dev.set_peers(configs)
    print(f"\nset_peers: 3000 peers took {(time.perf_counter() - t) * 1e3:.0f} ms")
    peers = dev.read().peers
    assert len(peers) == 3000
    for c in configs:
        assert peers[c.public_key] == PeerState(
            c.public_key, c.endpoint, c.allowed_ips or (),
            persistent_keepalive=c.persistent_keepalive or 0,
        )  # fmt: skip
    psks = dict(
        line.split("\t") for line in gw.wg("show", gw.ifname, "preshared-keys").splitlines()
    )
    assert psks == {c.public_key.b64(): psk.b64() if c.preshared_key else "(none)"
                    for c in configs}  # fmt: skip
    assert dev.handshakes() == dict.fromkeys(peers, 0.0)
    # stats(): the same dump, with counters and endpoints, in the kernel's layout (one unpack
    # per peer: the layout StatsParser expects is the kernel's)
    parser = dev._dump("stats", StatsParser)
    assert parser.laid_out == 3000
    assert parser.result() == {k: (0.0, 0, 0, str(p.endpoint)) for k, p in peers.items()}
    # what a sweep reads: the same, 500 peers at a time on a socket of the dump's own (the
    # device's socket answers meanwhile)
    dump = dev.stats_dump()
    chunks = [dump.take(500)]
    assert len(dev.handshakes()) == 3000
    while not dump.done:
        chunks.append(dump.take(500))
    assert dump.complete and len(chunks) >= 4 and all(len(c) >= 500 for c in chunks[:-1])
    merged = {k: v for c in chunks for k, v in c.items()}
    assert sum(map(len, chunks)) == 3000 and merged == parser.result()


def test_set_peers_updates_in_order_and_never_creates(dev: NetlinkDevice) -> None:
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


def test_set_peers_errors_name_the_interface(dev: NetlinkDevice, gw: KernelWg) -> None:
    configs = [PeerConfig(new_key(), allowed_ips=(net(f"10.4.0.{i}/32"),)) for i in range(20)]
    bad = list(configs)
    bad[10] = replace(bad[10], persistent_keepalive=70000)
    with pytest.raises(DeviceError, match=rf"^{gw.ifname}: set_peers \(20 peers\): persistent"):
        dev.set_peers(bad)
    assert dev.handshakes() == {}  # every peer is checked before anything is sent
    gw.ns.run("ip", "link", "del", gw.ifname)
    with pytest.raises(InterfaceMissing, match=f"interface '{gw.ifname}' does not exist"):
        dev.set_peers(configs)
    with pytest.raises(InterfaceMissing):
        dev.handshakes()


# -- errors a kernel user meets ---------------------------------------------------------------


def test_missing_interface(netns: Callable[[], Netns]) -> None:
    with InNs(netns()):
        name = unique_name("wjn")
        with pytest.raises(InterfaceMissing) as e:
            NetlinkDevice(name)
        assert str(e.value) == (
            f"interface {name!r} does not exist in this network namespace; create it with "
            f"`ip link add {name} type wireguard`"
        )
        with pytest.raises(DeviceNotFound, match="or start `wireguard-go"):
            open_device(name)


def test_not_a_wireguard_interface(netns: Callable[[], Netns]) -> None:
    ns = netns()
    ns.run("ip", "link", "add", "dummy0", "type", "dummy")
    with InNs(ns):
        with pytest.raises(NotWireGuard, match=r"'dummy0' is not a kernel WireGuard interface"):
            NetlinkDevice("dummy0")
        with pytest.raises(NotWireGuard, match="no wireguard-go socket"):
            open_device("dummy0", "auto")


UNPRIVILEGED = """
import sys
from wgjit.device.netlink import NetlinkDevice, PermissionDenied
try:
    NetlinkDevice(sys.argv[1])
except PermissionDenied as e:
    print(e)
    sys.exit(3)
"""


def test_without_cap_net_admin(gw: KernelWg) -> None:
    p = subprocess.run(
        ["ip", "netns", "exec", gw.ns.name, "setpriv", "--reuid=65534", "--regid=65534",
         "--clear-groups", sys.executable, "-c", UNPRIVILEGED, gw.ifname],
        capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )  # fmt: skip
    assert p.returncode == 3, p.stdout + p.stderr
    assert p.stdout.strip() == (
        f"{gw.ifname}: open: permission denied: kernel WireGuard needs CAP_NET_ADMIN; run as root"
    )


def test_uapi_forced_on_a_kernel_interface_says_so(gw: KernelWg) -> None:
    with InNs(gw.ns), pytest.raises(DeviceNotFound, match="is wireguard-go running"):
        UAPIDevice(gw.ifname)


def test_interface_vanishes_and_returns(dev: NetlinkDevice, gw: KernelWg) -> None:
    a = new_key()
    dev.set_peer(PeerConfig(a))
    gw.ns.run("ip", "link", "del", gw.ifname)
    with pytest.raises(InterfaceMissing):
        dev.read()
    with pytest.raises(InterfaceMissing):
        dev.set_peer(PeerConfig(a))
    dev.remove_peers([])  # nothing to do: no I/O, no error
    gw.ns.run("ip", "link", "add", gw.ifname, "type", "wireguard")
    assert dev.read().peers == {}  # the same object works again
    dev.set_peer(PeerConfig(a))
    assert set(dev.read().peers) == {a}


# -- role inversion: the gateway initiates the handshake to a kernel client --------------------


@dataclass
class Pair:
    gw: KernelWg
    client: KernelWg
    client_key: PublicKey
    gw_key: PublicKey


@pytest.fixture
def pair(netns: Callable[[], Netns]) -> Pair:
    gns, cns = netns(), netns()
    gns.run(
        "ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", cns.name
    )
    for ns, link, addr in ((gns, "veth0", "198.18.98.1/24"), (cns, "veth1", "198.18.98.2/24")):
        ns.run("ip", "addr", "add", addr, "dev", link)
        ns.run("ip", "link", "set", link, "up")
    gw_priv, client_priv = PrivateKey.generate(), PrivateKey.generate()
    gw, client = add_wg(gns), add_wg(cns)
    with InNs(gns), NetlinkDevice(gw.ifname) as d:
        d.configure(gw_priv, GW_PORT)
    gns.run("ip", "addr", "add", "100.65.98.1/24", "dev", gw.ifname)
    gns.run("ip", "link", "set", gw.ifname, "up")
    with InNs(cns), NetlinkDevice(client.ifname) as d:
        d.configure(client_priv, CLIENT_PORT)
        d.set_peer(PeerConfig(gw_priv.public_key(), ep(f"198.18.98.1:{GW_PORT}"),
                              (net("100.65.98.0/24"),)))  # fmt: skip
    cns.run("ip", "addr", "add", "100.65.98.2/24", "dev", client.ifname)
    cns.run("ip", "link", "set", client.ifname, "up")
    return Pair(gw, client, client_priv.public_key(), gw_priv.public_key())


def test_role_inversion_keepalive_on_then_off(pair: Pair) -> None:
    with InNs(pair.gw.ns), NetlinkDevice(pair.gw.ifname) as dev:
        t0 = time.monotonic()
        dev.set_peer(
            PeerConfig(pair.client_key, ep(f"198.18.98.2:{CLIENT_PORT}"),
                       (net("100.65.98.2/32"),), persistent_keepalive=1)
        )  # fmt: skip
        dev.set_peer(PeerConfig(pair.client_key, persistent_keepalive=0, update_only=True))

        def handshake() -> bool:
            return dev.read().peers[pair.client_key].last_handshake is not None

        wait_until("the gateway's handshake with the client", handshake, timeout=4.0)
        print(f"\nrole inversion on kernel WireGuard: {(time.monotonic() - t0) * 1e3:.0f} ms")
        state = dev.read().peers[pair.client_key]
        assert state.persistent_keepalive == 0
        assert state.last_handshake is not None
        assert dev.handshakes() == {pair.client_key: state.last_handshake}
        assert abs(state.last_handshake - time.time()) < 10
        # no lingering keepalive: a 1 s keepalive would add 32 bytes within this 2.5 s window
        time.sleep(0.5)
        tx = dev.read().peers[pair.client_key].tx_bytes
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            assert dev.read().peers[pair.client_key].tx_bytes == tx
            time.sleep(0.1)
    pair.client.ns.run("ping", "-c", "1", "-W", "3", "100.65.98.1")

    # a peer whose allowed IPs span several dump messages: the continuations carry only the
    # key, and handshakes() keeps the time from the first part
    with InNs(pair.gw.ns), NetlinkDevice(pair.gw.ifname) as dev:
        many = (net("100.65.98.2/32"), *(net(f"10.{i // 256}.{i % 256}.0/24") for i in range(1500)))
        dev.set_peer(PeerConfig(pair.client_key, allowed_ips=many, update_only=True))
        state = dev.read().peers[pair.client_key]
        assert len(state.allowed_ips) == 1501 and state.last_handshake
        assert dev.handshakes() == {pair.client_key: state.last_handshake}
        # stats() agrees with read() (the ping's bytes counted), continuations included
        assert state.rx_bytes > 0 and state.tx_bytes > 0
        assert dev.stats() == {pair.client_key: (
            state.last_handshake, state.rx_bytes, state.tx_bytes, str(state.endpoint)
        )}  # fmt: skip
        # in chunks of one peer: its continuations in the next messages are nobody new
        dump = dev.stats_dump()
        chunks = [dump.take(1)]
        while not dump.done:
            chunks.append(dump.take(1))
        assert [c for c in chunks if c] == [dev.stats()] and dump.complete


def test_role_inversion_in_one_set_peers_batch(pair: Pair) -> None:
    """The kernel sends the keepalive (starting the handshake) while it applies the first peer
    of the message, before it reads the keepalive-off update: role inversion can be batched."""
    with InNs(pair.gw.ns), NetlinkDevice(pair.gw.ifname) as dev:
        dev.set_peers(
            [PeerConfig(pair.client_key, ep(f"198.18.98.2:{CLIENT_PORT}"),
                        (net("100.65.98.2/32"),), persistent_keepalive=1),
             PeerConfig(pair.client_key, persistent_keepalive=0, update_only=True)]
        )  # fmt: skip
        wait_until("the gateway's handshake with the client",
                   lambda: dev.handshakes()[pair.client_key] > 0, timeout=4.0)  # fmt: skip
        assert dev.read().peers[pair.client_key].persistent_keepalive == 0
