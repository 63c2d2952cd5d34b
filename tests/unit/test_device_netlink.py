"""The netlink backend's sans-IO parts: message encoding, dump parsing, error messages.

No kernel WireGuard needed (tests/kernel runs the backend against a real kernel); the only
socket here is an unprivileged generic netlink one, to see the kernel answer for a family that
does not exist.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgjit.addr import Endpoint
from wgjit.device import DeviceError, DeviceNotFound, PeerConfig, PeerState
from wgjit.device.netlink import (
    CTRL_CMD_GETFAMILY,
    GENL_ID_CTRL,
    MAX_PEERS_NEST,
    WGDEVICE_A_IFNAME,
    WGDEVICE_A_LISTEN_PORT,
    WGDEVICE_A_PEERS,
    WGDEVICE_A_PRIVATE_KEY,
    WGPEER_A_ALLOWEDIPS,
    WGPEER_A_ENDPOINT,
    WGPEER_A_FLAGS,
    WGPEER_A_LAST_HANDSHAKE_TIME,
    WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
    WGPEER_A_PRESHARED_KEY,
    WGPEER_A_PUBLIC_KEY,
    WGPEER_A_RX_BYTES,
    WGPEER_A_TX_BYTES,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    DumpParser,
    HandshakeParser,
    InterfaceMissing,
    NetlinkDevice,
    NetlinkError,
    NotWireGuard,
    PermissionDenied,
    WireGuardModuleMissing,
    _attr,
    _GenericNetlink,
    _KernelErrno,
    _nest,
    decode_endpoint,
    describe_error,
    encode_endpoint,
    encode_peer,
    encode_removal,
    iter_attrs,
    set_device_messages,
)
from wgjit.keys import PresharedKey, PrivateKey, PublicKey


def key() -> PublicKey:
    return PrivateKey.generate().public_key()


def attrs_of(nest: bytes) -> dict[int, bytes]:
    """The attributes inside one encoded nest, by type."""
    ((_, inner),) = list(iter_attrs(nest))
    return {k: bytes(v) for k, v in iter_attrs(inner)}


def test_endpoints_are_sockaddrs_and_round_trip() -> None:
    v4 = Endpoint.parse("198.18.0.2:51820")
    raw = encode_endpoint(v4)
    assert len(raw) == 16
    assert raw[:2] == struct.pack("=H", socket.AF_INET) and raw[2:4] == b"\xca\x6c"
    assert raw[4:8] == bytes([198, 18, 0, 2]) and raw[8:] == bytes(8)
    v6 = Endpoint.parse("[fd18::2]:41641")
    raw6 = encode_endpoint(v6)
    assert len(raw6) == 28 and raw6[:2] == struct.pack("=H", socket.AF_INET6)
    assert decode_endpoint(raw) == v4 and decode_endpoint(raw6) == v6
    assert decode_endpoint(b"\0\0") is None and decode_endpoint(bytes(16)) is None


def test_peer_encodes_only_what_is_set() -> None:
    k = key()
    a = attrs_of(encode_peer(PeerConfig(k)))
    assert a == {WGPEER_A_PUBLIC_KEY: k.raw, WGPEER_A_FLAGS: struct.pack("=I", 0)}

    psk = PresharedKey.generate()
    full = PeerConfig(
        k,
        Endpoint.parse("[fd18::2]:5"),
        (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/64")),
        preshared_key=psk,
        persistent_keepalive=25,
        update_only=True,
    )
    a = attrs_of(encode_peer(full))
    assert a[WGPEER_A_PRESHARED_KEY] == psk.raw
    assert decode_endpoint(a[WGPEER_A_ENDPOINT]) == full.endpoint
    assert a[WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL] == struct.pack("=H", 25)
    flags = struct.unpack("=I", a[WGPEER_A_FLAGS])[0]
    assert flags == WGPEER_F_UPDATE_ONLY | WGPEER_F_REPLACE_ALLOWEDIPS
    ips = list(iter_attrs(a[WGPEER_A_ALLOWEDIPS]))
    assert len(ips) == 2

    # an empty allowed-IPs tuple still replaces (clears) the list
    a = attrs_of(encode_peer(PeerConfig(k, allowed_ips=())))
    assert struct.unpack("=I", a[WGPEER_A_FLAGS])[0] == WGPEER_F_REPLACE_ALLOWEDIPS
    with pytest.raises(DeviceError, match="out of range"):
        encode_peer(PeerConfig(k, persistent_keepalive=70000))


def test_removal_is_key_and_flag_only() -> None:
    k = key()
    assert attrs_of(encode_removal(k)) == {
        WGPEER_A_PUBLIC_KEY: k.raw,
        WGPEER_A_FLAGS: struct.pack("=I", WGPEER_F_REMOVE_ME),
    }


def test_removals_are_batched_into_as_few_messages_as_fit() -> None:
    keys = [PublicKey(bytes([i % 256, i // 256]) + bytes(30)) for i in range(3000)]
    blocks = list(set_device_messages("wg0", (encode_removal(k) for k in keys)))
    per_message = (MAX_PEERS_NEST - 4) // 48
    assert len(blocks) == -(-3000 // per_message) == 3
    seen = []
    for block in blocks:
        top = {k: v for k, v in iter_attrs(block)}
        assert bytes(top[WGDEVICE_A_IFNAME]) == b"wg0\0"
        assert len(top[WGDEVICE_A_PEERS]) <= MAX_PEERS_NEST
        for _, peer in iter_attrs(top[WGDEVICE_A_PEERS]):
            seen.append(PublicKey(bytes(dict(iter_attrs(peer))[WGPEER_A_PUBLIC_KEY])))
    assert seen == keys


def test_device_header_goes_first_and_alone_without_peers() -> None:
    header = _attr(WGDEVICE_A_LISTEN_PORT, struct.pack("=H", 51820))
    (block,) = set_device_messages("wg0", [], header)
    assert [k for k, _ in iter_attrs(block)] == [WGDEVICE_A_IFNAME, WGDEVICE_A_LISTEN_PORT]
    assert list(set_device_messages("wg0", [])) == []


@pytest.mark.parametrize("bad", ["", "x" * 16, "a/b", "a\0b"])
def test_invalid_interface_names(bad: str) -> None:
    with pytest.raises(InterfaceMissing, match="invalid interface name"):
        list(set_device_messages(bad, [encode_removal(key())]))


def _dump_peer(k: PublicKey, *extra: bytes) -> bytes:
    return _nest(0, (_attr(WGPEER_A_PUBLIC_KEY, k.raw), *extra))


def _allowed(net: str) -> bytes:
    n = ipaddress.ip_network(net)
    fam = socket.AF_INET if n.version == 4 else socket.AF_INET6
    return _nest(
        0,
        (
            _attr(1, struct.pack("=H", fam)),
            _attr(2, n.network_address.packed),
            _attr(3, bytes([n.prefixlen])),
        ),
    )


def test_dump_merges_messages_and_split_allowed_ips() -> None:
    priv = PrivateKey.generate()
    a, b = key(), key()
    first = (
        _attr(WGDEVICE_A_PRIVATE_KEY, priv.raw)
        + _attr(WGDEVICE_A_LISTEN_PORT, struct.pack("=H", 51820))
        + _nest(
            WGDEVICE_A_PEERS,
            [
                _dump_peer(
                    a,
                    _attr(WGPEER_A_ENDPOINT, encode_endpoint(Endpoint.parse("198.18.0.2:7"))),
                    _attr(WGPEER_A_LAST_HANDSHAKE_TIME, struct.pack("=qq", 1700000000, 5 * 10**8)),
                    _attr(WGPEER_A_RX_BYTES, struct.pack("=Q", 92)),
                    _attr(WGPEER_A_TX_BYTES, struct.pack("=Q", 148)),
                    _attr(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, struct.pack("=H", 0)),
                    _nest(WGPEER_A_ALLOWEDIPS, [_allowed("10.0.0.0/24")]),
                )
            ],
        )
    )
    # the next message continues peer a (key and allowed IPs only), then peer b
    second = _nest(
        WGDEVICE_A_PEERS,
        [
            _dump_peer(a, _nest(WGPEER_A_ALLOWEDIPS, [_allowed("fd00::/64")])),
            _dump_peer(
                b,
                _attr(WGPEER_A_LAST_HANDSHAKE_TIME, bytes(16)),
                _attr(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, struct.pack("=H", 25)),
            ),
        ],
    )
    p = DumpParser("wg0")
    p.feed(first)
    p.feed(second)
    state = p.result()
    assert state.private_key == priv and state.listen_port == 51820
    assert state.peers[a] == PeerState(
        a,
        Endpoint.parse("198.18.0.2:7"),
        (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("fd00::/64")),
        1700000000.5,
        92,
        148,
        0,
    )
    assert state.peers[b] == PeerState(b, persistent_keepalive=25)


def test_dump_of_fresh_device() -> None:
    p = DumpParser("wg0")
    p.feed(_attr(WGDEVICE_A_PRIVATE_KEY, bytes(32)) + _attr(WGDEVICE_A_LISTEN_PORT, bytes(2)))
    assert p.result().private_key is None and p.result().peers == {}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_dump_parser_never_crashes_on_garbage(data: bytes) -> None:
    p = DumpParser("wg0")
    try:
        p.feed(data)
        p.feed(_nest(WGDEVICE_A_PEERS, [data]))
        p.result()
    except DeviceError:
        pass  # a peer without a key is reported, not crashed on


def test_error_messages_name_the_fix() -> None:
    cases = {
        errno.ENOENT: (WireGuardModuleMissing, "modprobe wireguard"),
        errno.ENODEV: (InterfaceMissing, "ip link add wg0 type wireguard"),
        errno.EOPNOTSUPP: (NotWireGuard, "--backend uapi"),
        errno.EPERM: (PermissionDenied, "CAP_NET_ADMIN"),
        errno.EINVAL: (NetlinkError, "Invalid argument"),
    }
    for code, (cls, fix) in cases.items():
        e = describe_error("wg0", "set_peer", code)
        assert type(e) is cls and fix in str(e) and "\n" not in str(e)
        assert e.errno == code
    assert isinstance(describe_error("wg0", "x", errno.ENODEV), DeviceNotFound)
    assert not isinstance(describe_error("wg0", "x", errno.EPERM), DeviceNotFound)


def test_kernel_answers_enoent_for_a_missing_family() -> None:
    """What a kernel without the wireguard module answers when asked for its family."""
    nl = _GenericNetlink(5.0)
    try:
        with pytest.raises(_KernelErrno) as e:
            nl.resolve_family("wgjit-no-such")
        assert e.value.errno == errno.ENOENT
        assert nl.resolve_family("nlctrl") == 0x10  # and the socket still works
    finally:
        nl.close()


# -- handshakes(): the lean dump parser -----------------------------------------------------


def kernel_peer(k: PublicKey, sec: int, nsec: int, nets: list[str], first: bool = True) -> bytes:
    """One peer nest laid out like the kernel's get_peer(): the key, then (in the first part
    only) preshared key, handshake time, keepalive, counters, protocol version and endpoint,
    then the allowed IPs."""
    parts = [_attr(WGPEER_A_PUBLIC_KEY, k.raw)]
    if first:
        parts += [
            _attr(WGPEER_A_PRESHARED_KEY, bytes(32)),
            _attr(WGPEER_A_LAST_HANDSHAKE_TIME, struct.pack("=qq", sec, nsec)),
            _attr(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, struct.pack("=H", 0)),
            _attr(WGPEER_A_TX_BYTES, struct.pack("=Q", 148)),
            _attr(WGPEER_A_RX_BYTES, struct.pack("=Q", 92)),
            _attr(10, struct.pack("=I", 1)),  # WGPEER_A_PROTOCOL_VERSION
            _attr(WGPEER_A_ENDPOINT, encode_endpoint(Endpoint.parse("198.18.0.2:7"))),
        ]
    parts.append(_nest(WGPEER_A_ALLOWEDIPS, [_allowed(n) for n in nets]))
    return _nest(0, parts)


def dump_of(peers: list[tuple[PublicKey, int, int, list[str]]], splits: set[int]) -> list[bytes]:
    """Dump messages: a message ends after the item numbers in `splits`, where each peer is
    one item per allowed IP (a peer cut inside its list continues in the next message)."""
    messages: list[bytes] = []
    nests: list[bytes] = []
    item = 0
    head = _attr(WGDEVICE_A_PRIVATE_KEY, bytes(32)) + _attr(WGDEVICE_A_LISTEN_PORT, bytes(2))
    for k, sec, nsec, nets in peers:
        first, pending = True, []
        for net in nets or [None]:
            if net is not None:
                pending.append(net)
            item += 1
            if item in splits:
                nests.append(kernel_peer(k, sec, nsec, pending, first))
                messages.append(head + _nest(WGDEVICE_A_PEERS, nests))
                head, nests, first, pending = b"", [], False, []
        if first or pending:
            nests.append(kernel_peer(k, sec, nsec, pending, first))
    messages.append(head + (_nest(WGDEVICE_A_PEERS, nests) if nests else b""))
    return messages


def test_handshakes_merge_messages_and_continuations() -> None:
    a, b, c = key(), key(), key()
    peers = [
        (a, 1700000000, 5 * 10**8, [f"10.0.{i}.0/24" for i in range(5)]),
        (b, 0, 0, []),
        (c, 1700000001, 0, ["fd00::/64"]),
    ]
    messages = dump_of(peers, {2, 4, 6})  # a is cut twice; its continuations carry no time
    assert len(messages) == 4
    hp, dp = HandshakeParser("wg0"), DumpParser("wg0")
    for m in messages:
        hp.feed(m)
        dp.feed(memoryview(m))
    assert hp.result() == {a: 1700000000.5, b: 0.0, c: 1700000001.0}
    assert {k: p.last_handshake or 0.0 for k, p in dp.result().peers.items()} == hp.result()
    assert len(dp.result().peers[a].allowed_ips) == 5


def test_handshakes_of_a_continuation_seen_first_is_zero_until_the_time_comes() -> None:
    a = key()
    p = HandshakeParser("wg0")
    p.feed(_nest(WGDEVICE_A_PEERS, [kernel_peer(a, 0, 0, ["10.0.0.0/8"], first=False)]))
    assert p.result() == {a: 0.0}
    p.feed(_nest(WGDEVICE_A_PEERS, [kernel_peer(a, 9, 0, [])]))
    p.feed(_nest(WGDEVICE_A_PEERS, [kernel_peer(a, 0, 0, ["10.1.0.0/16"], first=False)]))
    assert p.result() == {a: 9.0}


def test_handshakes_peer_without_key_names_the_interface() -> None:
    p = HandshakeParser("wg7")
    with pytest.raises(DeviceError, match=r"^wg7: handshakes: kernel sent a peer without a public"):
        p.feed(_nest(WGDEVICE_A_PEERS, [_nest(0, [_attr(WGPEER_A_RX_BYTES, bytes(8))])]))


_peer_specs = st.lists(
    st.tuples(
        st.binary(min_size=32, max_size=32),
        st.integers(min_value=0, max_value=2**40),
        st.integers(min_value=0, max_value=999_999_999),
        st.integers(min_value=0, max_value=6),
    ),
    max_size=8,
    unique_by=lambda t: t[0],
)


@settings(max_examples=200, deadline=None)
@given(_peer_specs, st.sets(st.integers(min_value=1, max_value=40), max_size=8))
def test_handshakes_agree_with_the_full_parser(
    specs: list[tuple[bytes, int, int, int]], splits: set[int]
) -> None:
    peers = [(PublicKey(raw), s, ns, [f"10.{i}.0.0/16" for i in range(n)])
             for raw, s, ns, n in specs]  # fmt: skip
    hp, dp = HandshakeParser("wg0"), DumpParser("wg0")
    for m in dump_of(peers, splits):
        hp.feed(m)
        dp.feed(m)
    assert hp.result() == {k: p.last_handshake or 0.0 for k, p in dp.result().peers.items()}
    assert set(hp.result()) == {p[0] for p in peers}


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_handshake_parser_never_crashes_on_garbage(data: bytes) -> None:
    p = HandshakeParser("wg0")
    with contextlib.suppress(DeviceError):
        p.feed(data)
        p.feed(memoryview(_nest(WGDEVICE_A_PEERS, [data])))
        p.feed(_nest(WGDEVICE_A_PEERS, [_nest(0, [_attr(WGPEER_A_PUBLIC_KEY, bytes(32)), data])]))
    assert all(isinstance(t, float) for t in p.result().values())


# -- NetlinkDevice logic without a kernel -----------------------------------------------------


def offline_device(name: str = "wg0") -> NetlinkDevice:
    """A NetlinkDevice that has not opened anything (its constructor needs kernel WireGuard)."""
    dev = NetlinkDevice.__new__(NetlinkDevice)
    dev.name = name
    dev._timeout = 5.0
    dev._lock = threading.Lock()
    dev._nl = None
    dev._family = None
    return dev


class Recorder:
    def __init__(self, dumps: list[tuple[list[bytes], bool]] | None = None) -> None:
        self.sent: list[tuple[str, int, bytes]] = []
        self.dumps = list(dumps or [])

    def __call__(self, op: str, cmd: int, attrs: bytes, *, dump: bool = False,
                 on_reply: object = None) -> tuple[list[bytes], bool]:  # fmt: skip
        self.sent.append((op, cmd, attrs))
        if not dump:
            return [], False
        messages, interrupted = self.dumps.pop(0)
        assert callable(on_reply)
        for m in messages:
            on_reply(memoryview(m))
        return [], interrupted


def peers_in(block: bytes) -> list[dict[int, bytes]]:
    top = dict(iter_attrs(block))
    assert bytes(top[WGDEVICE_A_IFNAME]) == b"wg0\0"
    assert len(top[WGDEVICE_A_PEERS]) <= MAX_PEERS_NEST
    return [{k: bytes(v) for k, v in iter_attrs(p)} for _, p in iter_attrs(top[WGDEVICE_A_PEERS])]


def test_set_peers_packs_many_peers_per_message() -> None:
    dev, rec = offline_device(), Recorder()
    dev._request = rec
    configs = [
        PeerConfig(key(), Endpoint.parse(f"198.18.0.2:{1024 + i}"),
                   (ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24"),),
                   persistent_keepalive=i % 2, update_only=i % 3 == 0)
        for i in range(2000)
    ]  # fmt: skip
    dev.set_peers(configs)
    assert 2 <= len(rec.sent) <= 4  # ~100 bytes per peer, 64 KiB per message
    assert {op for op, _, _ in rec.sent} == {"set_peers (2000 peers)"}
    got = [p for _, _, block in rec.sent for p in peers_in(block)]
    assert [PublicKey(p[WGPEER_A_PUBLIC_KEY]) for p in got] == [c.public_key for c in configs]
    for c, p in zip(configs, got, strict=True):
        flags = struct.unpack("=I", p[WGPEER_A_FLAGS])[0]
        assert bool(flags & WGPEER_F_UPDATE_ONLY) == c.update_only
        assert decode_endpoint(p[WGPEER_A_ENDPOINT]) == c.endpoint

    rec.sent.clear()
    dev.set_peers([])
    assert rec.sent == []


def test_set_peers_checks_every_peer_before_sending_any() -> None:
    dev, rec = offline_device(), Recorder()
    dev._request = rec
    configs = [PeerConfig(key()) for _ in range(5)]
    configs.append(PeerConfig(key(), persistent_keepalive=70000))
    with pytest.raises(DeviceError, match=r"^wg0: set_peers \(6 peers\): persistent keepalive"):
        dev.set_peers(configs)
    with pytest.raises(DeviceError, match=r"^wg0: set_peer \S+: persistent keepalive"):
        dev.set_peer(configs[-1])
    assert rec.sent == []


def test_interrupted_dump_is_read_again_with_a_fresh_parser() -> None:
    a, b = key(), key()
    first = dump_of([(a, 5, 0, []), (b, 6, 0, [])], set())
    second = dump_of([(b, 7, 0, [])], set())  # a was removed meanwhile
    dev = offline_device()
    dev._request = Recorder([(first, True), (second, False)])
    assert dev.handshakes() == {b: 7.0}
    dev._request = Recorder([(first, True)] * 5)
    with pytest.raises(NetlinkError, match="kept changing") as e:
        dev.handshakes()
    assert e.value.errno == errno.EAGAIN


def test_replies_stream_to_the_callback_and_a_failing_one_drops_the_socket() -> None:
    """A real multi-part dump (the generic netlink family list, no privilege needed)."""
    dev = offline_device()
    dev._nl = _GenericNetlink(5.0)
    dev._family = GENL_ID_CTRL
    try:
        seen: list[int] = []

        def count(attrs: memoryview) -> None:
            seen.append(len(attrs))

        replies, _ = dev._request("families", CTRL_CMD_GETFAMILY, b"", dump=True,
                                  on_reply=count)  # fmt: skip
        assert replies == [] and len(seen) >= 2

        def boom(attrs: memoryview) -> None:
            raise DeviceError("wg0: parse failed")

        nl = dev._nl
        with pytest.raises(DeviceError, match="parse failed"):
            dev._request("families", CTRL_CMD_GETFAMILY, b"", dump=True, on_reply=boom)
        assert dev._nl is None and nl.sock.fileno() == -1  # closed: no half-read dump left
        dev._family = GENL_ID_CTRL
        seen.clear()
        dev._request("families", CTRL_CMD_GETFAMILY, b"", dump=True, on_reply=count)
        assert len(seen) >= 2
    finally:
        dev.close()
