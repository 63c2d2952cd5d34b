"""The netlink backend's sans-IO parts: message encoding, dump parsing, error messages.

No kernel WireGuard needed (tests/kernel runs the backend against a real kernel); the only
socket here is an unprivileged generic netlink one, to see the kernel answer for a family that
does not exist.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgjit.addr import Endpoint
from wgjit.device import DeviceError, DeviceNotFound, PeerConfig, PeerState
from wgjit.device.netlink import (
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
    InterfaceMissing,
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
