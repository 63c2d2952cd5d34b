"""stats(): each peer's (last handshake, rx, tx, endpoint) from the same dump as handshakes(),
on both backends' sans-IO parsers; they agree with the full parsers (read())."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_device_netlink import dump_of, kernel_peer
from wgjit.addr import Endpoint
from wgjit.device import DeviceError
from wgjit.device.netlink import (
    WGDEVICE_A_PEERS,
    WGPEER_A_RX_BYTES,
    DumpParser,
    StatsParser,
    _attr,
    _nest,
    encode_endpoint,
    endpoint_text,
)
from wgjit.device.uapi import StatsReader, parse_get
from wgjit.keys import PrivateKey, PublicKey


def key() -> PublicKey:
    return PrivateKey.generate().public_key()


def test_netlink_endpoints_print_as_uapi_does() -> None:
    for text in ("198.18.0.2:7", "[2001:db8::1]:51820", "[::ffff:1.2.3.4]:9"):
        assert endpoint_text(encode_endpoint(Endpoint.parse(text))) == text
    assert endpoint_text(b"\x00\x00\x00\x00") is None and endpoint_text(b"") is None


def test_netlink_stats_merge_messages_and_continuations() -> None:
    a, b, c = key(), key(), key()
    peers = [
        (a, 1700000000, 5 * 10**8, [f"10.0.{i}.0/24" for i in range(5)]),
        (b, 0, 0, []),
        (c, 1700000001, 0, ["fd00::/64"]),
    ]
    p = StatsParser("wg0")
    for m in dump_of(peers, {2, 4, 6}):  # a is cut twice; continuations carry no counters
        p.feed(m)
    ep = "198.18.0.2:7"  # kernel_peer's layout: rx 92, tx 148
    assert p.result() == {
        a: (1700000000.5, 92, 148, ep), b: (0.0, 92, 148, ep), c: (1700000001.0, 92, 148, ep)
    }  # fmt: skip
    assert p.laid_out == 3  # each peer's first part read with one unpack


def test_netlink_stats_of_a_continuation_seen_first() -> None:
    a = key()
    p = StatsParser("wg0")
    p.feed(_nest(WGDEVICE_A_PEERS, [kernel_peer(a, 0, 0, ["10.0.0.0/8"], first=False)]))
    assert p.result() == {a: (0.0, 0, 0, None)}
    p.feed(_nest(WGDEVICE_A_PEERS, [kernel_peer(a, 9, 0, [])]))
    p.feed(_nest(WGDEVICE_A_PEERS, [kernel_peer(a, 0, 0, ["10.1.0.0/16"], first=False)]))
    assert p.result() == {a: (9.0, 92, 148, "198.18.0.2:7")}


def test_netlink_stats_peer_without_key_names_the_interface() -> None:
    p = StatsParser("wg7")
    with pytest.raises(DeviceError, match=r"^wg7: stats: kernel sent a peer without a public"):
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
def test_netlink_stats_agree_with_the_full_parser(
    specs: list[tuple[bytes, int, int, int]], splits: set[int]
) -> None:
    peers = [(PublicKey(raw), s, ns, [f"10.{i}.0.0/16" for i in range(n)])
             for raw, s, ns, n in specs]  # fmt: skip
    sp, dp = StatsParser("wg0"), DumpParser("wg0")
    for m in dump_of(peers, splits):
        sp.feed(m)
        dp.feed(m)
    full = {
        k: (p.last_handshake or 0.0, p.rx_bytes, p.tx_bytes, str(p.endpoint))
        for k, p in dp.result().peers.items()
    }
    assert sp.result() == full


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_netlink_stats_parser_never_crashes_on_garbage(data: bytes) -> None:
    from wgjit.device.netlink import WGPEER_A_PUBLIC_KEY

    p = StatsParser("wg0")
    with contextlib.suppress(DeviceError):
        p.feed(data)
        p.feed(memoryview(_nest(WGDEVICE_A_PEERS, [data])))
        p.feed(_nest(WGDEVICE_A_PEERS, [_nest(0, [_attr(WGPEER_A_PUBLIC_KEY, bytes(32)), data])]))
    for hs, rx, tx, ep in p.result().values():
        assert isinstance(hs, float) and rx >= 0 and tx >= 0 and (ep is None or ":" in ep)


def _uapi_dump(a: PublicKey, b: PublicKey) -> bytes:
    return (
        "private_key=" + "11" * 32 + "\nlisten_port=51820\n"
        f"public_key={a.hex()}\npreshared_key={'00' * 32}\nprotocol_version=1\n"
        "endpoint=198.18.0.11:40000\nlast_handshake_time_sec=1800000000\n"
        "last_handshake_time_nsec=250000000\ntx_bytes=1480\nrx_bytes=920\n"
        "persistent_keepalive_interval=0\nallowed_ip=100.65.0.2/32\n"
        f"public_key={b.hex()}\nprotocol_version=1\nendpoint=[2001:db8::1]:7\n"
        "last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n"
        "allowed_ip=100.65.0.3/32\nerrno=0\n\n"
    ).encode()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 16])
def test_uapi_stats_in_any_chunking_agree_with_read(chunk: int) -> None:
    a, b = key(), key()
    raw = _uapi_dump(a, b)
    r = StatsReader("wg0")
    for i in range(0, len(raw), chunk):
        r.feed(raw[i : i + chunk])
    assert r.finish() == 0
    assert r.stats == {
        a: (1800000000.25, 920, 1480, "198.18.0.11:40000"),
        b: (0.0, 0, 0, "[2001:db8::1]:7"),
    }
    state = parse_get("wg0", raw.decode().rsplit("errno", 1)[0])
    for k, (hs, rx, tx, ep) in r.stats.items():
        p = state.peers[k]
        assert (p.last_handshake or 0.0, p.rx_bytes, p.tx_bytes, str(p.endpoint)) == (
            hs, rx, tx, ep
        )  # fmt: skip


def test_uapi_stats_name_a_bad_value() -> None:
    r = StatsReader("wg3")
    with pytest.raises(DeviceError, match=r"^wg3: stats: cannot parse rx_bytes='x1'"):
        r.feed(f"public_key={key().hex()}\nrx_bytes=x1\n".encode())


def test_netlink_stats_in_another_layout_are_read_attribute_by_attribute() -> None:
    """The one-unpack path is for the kernel's layout; any other order (a future kernel, no
    preshared key attribute) is read attribute by attribute, with the same result."""
    from wgjit.device.netlink import (
        WGPEER_A_ALLOWEDIPS,
        WGPEER_A_ENDPOINT,
        WGPEER_A_LAST_HANDSHAKE_TIME,
        WGPEER_A_PUBLIC_KEY,
        WGPEER_A_TX_BYTES,
    )

    a = key()
    peer = _nest(0, [
        _attr(WGPEER_A_PUBLIC_KEY, a.raw),
        _attr(WGPEER_A_ENDPOINT, encode_endpoint(Endpoint.parse("[2001:db8::7]:9"))),
        _attr(WGPEER_A_RX_BYTES, struct.pack("=Q", 5)),
        _attr(WGPEER_A_LAST_HANDSHAKE_TIME, struct.pack("=qq", 100, 5 * 10**8)),
        _attr(WGPEER_A_TX_BYTES, struct.pack("=Q", 6)),
        _nest(WGPEER_A_ALLOWEDIPS, []),
        _attr(99, bytes(200)),  # (long enough for the kernel layout's unpack to be tried)
    ])  # fmt: skip
    p = StatsParser("wg0")
    p.feed(_nest(WGDEVICE_A_PEERS, [peer]))
    assert p.result() == {a: (100.5, 5, 6, "[2001:db8::7]:9")} and p.laid_out == 0
    b = key()
    p.feed(_nest(WGDEVICE_A_PEERS, [kernel_peer(b, 7, 0, ["10.0.0.0/8"])]))
    assert p.result()[b] == (7.0, 92, 148, "198.18.0.2:7") and p.laid_out == 1


# -- in chunks (Device.stats_dump: what a sweep reads) ---------------------------------------


def test_netlink_stats_taken_per_message_are_the_whole_result() -> None:
    """A sweep takes the parser's peers after each message: a peer cut at a message's end
    continues in the next one with its key and more allowed IPs only, which must not come
    out again as a peer that never had a handshake."""
    a, b, c = key(), key(), key()
    peers = [
        (a, 1700000000, 5 * 10**8, [f"10.0.{i}.0/24" for i in range(5)]),
        (b, 0, 0, []),
        (c, 1700000001, 0, ["fd00::/64", "fd01::/64"]),
    ]
    whole = StatsParser("wg0")
    chunked = StatsParser("wg0")
    chunks = []
    for m in dump_of(peers, {2, 4, 7}):  # a is cut twice, c once
        whole.feed(m)
        chunked.feed(m)
        chunks.append(chunked.take())
    assert [len(ch) for ch in chunks] == [1, 0, 2, 0]  # (a continuation adds nobody)
    merged = {k: v for ch in chunks for k, v in ch.items()}
    assert merged == whole.result() and len(merged) == 3


@settings(max_examples=200, deadline=None)
@given(_peer_specs, st.sets(st.integers(min_value=1, max_value=40), max_size=8))
def test_netlink_stats_in_chunks_agree_with_stats(
    specs: list[tuple[bytes, int, int, int]], splits: set[int]
) -> None:
    peers = [(PublicKey(raw), s, ns, [f"10.{i}.0.0/16" for i in range(n)])
             for raw, s, ns, n in specs]  # fmt: skip
    whole, chunked = StatsParser("wg0"), StatsParser("wg0")
    seen: list[PublicKey] = []
    merged = {}
    for m in dump_of(peers, splits):
        whole.feed(m)
        chunked.feed(m)
        chunk = chunked.take()
        seen.extend(chunk)
        merged.update(chunk)
    assert merged == whole.result() and len(seen) == len(merged)  # each peer once


def test_uapi_stats_taken_between_reads_are_the_whole_result() -> None:
    a, b = key(), key()
    raw = _uapi_dump(a, b)
    r = StatsReader("wg0")
    chunks = []
    for i in range(0, len(raw), 50):
        r.feed(raw[i : i + 50])
        chunks.append(r.take())
    assert r.finish() == 0
    chunks.append(r.take())  # the last peer is whole only at the end of the answer
    assert sum(len(ch) for ch in chunks) == 2 and chunks[-1] == {b: (0.0, 0, 0, "[2001:db8::1]:7")}
    assert {k: v for ch in chunks for k, v in ch.items()} == {
        a: (1800000000.25, 920, 1480, "198.18.0.11:40000"),
        b: (0.0, 0, 0, "[2001:db8::1]:7"),
    }


def test_snapshot_dump_hands_out_chunks_then_is_done() -> None:
    from wgjit.device import SnapshotDump

    stats = {key(): (float(i), i, i, None) for i in range(10)}
    d = SnapshotDump(stats)
    assert not d.done
    assert [len(d.take(4)) for _ in range(3)] == [4, 4, 2] and d.done and d.complete
    assert d.take(4) == {}
    assert SnapshotDump({}).done
