"""The UAPI backend's sans-IO parts (response readers, `set=1` sections) and its I/O logic
against a scripted fake daemon on a unix socket; real wireguard-go is in tests/e2e."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgjit.addr import Endpoint
from wgjit.device import DeviceError, PeerConfig
from wgjit.device import uapi as uapi_mod
from wgjit.device.uapi import (
    HandshakeReader,
    UAPIDevice,
    UAPIError,
    _peer_lines,
    _TextReply,
    _without_absent_updates,
    parse_get,
)
from wgjit.keys import PresharedKey, PublicKey


def key() -> PublicKey:
    return PublicKey(os.urandom(32))


def peer_text(k: PublicKey, sec: int = 0, nsec: int = 0, ips: int = 1) -> str:
    """One peer as wireguard-go 0.0.20220316 prints it for `get=1`."""
    lines = [
        f"public_key={k.hex()}",
        "preshared_key=" + "00" * 32,
        "protocol_version=1",
        "endpoint=198.18.0.2:51821",
        f"last_handshake_time_sec={sec}",
        f"last_handshake_time_nsec={nsec}",
        "tx_bytes=148",
        "rx_bytes=92",
        "persistent_keepalive_interval=0",
        *(f"allowed_ip=10.0.{i // 256}.{i % 256}/32" for i in range(ips)),
    ]
    return "\n".join(lines) + "\n"


def response(*peers: str, errno: int = 0) -> bytes:
    head = "private_key=" + "11" * 32 + "\nlisten_port=51820\n"
    return (head + "".join(peers) + f"errno={errno}\n\n").encode()


def read_all(data: bytes, cuts: list[int] | None = None) -> tuple[HandshakeReader, int | None]:
    r = HandshakeReader("wg0")
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts or [])})
    for a, b in itertools.pairwise(bounds):
        r.feed(data[a:b])
    return r, r.finish()


# -- HandshakeReader ------------------------------------------------------------------------


def test_handshakes_of_every_peer_and_the_errno() -> None:
    a, b, c = key(), key(), key()
    data = response(peer_text(a, 1700000000, 500_000_000), peer_text(b), peer_text(c, 5, 0, 40))
    r, code = read_all(data)
    assert code == 0
    assert r.handshakes == {a: 1700000000.5, b: 0.0, c: 5.0}
    # the same as read() would say (None there means never: 0.0 here)
    state = parse_get("wg0", data.decode().rpartition("errno=")[0])
    assert {k: p.last_handshake or 0.0 for k, p in state.peers.items()} == r.handshakes


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0), max_size=12))
def test_chunk_boundaries_do_not_matter(cuts: list[int]) -> None:
    keys = [key() for _ in range(5)]
    data = response(*(peer_text(k, 1700000000 + i, i * 7, ips=i) for i, k in enumerate(keys)))
    r, code = read_all(data, cuts)
    assert code == 0
    assert r.handshakes == {k: 1700000000 + i + i * 7 / 1e9 for i, k in enumerate(keys)}


def test_one_byte_at_a_time() -> None:
    a = key()
    data = response(peer_text(a, 12, 3))
    r, code = read_all(data, list(range(len(data))))
    assert (code, r.handshakes) == (0, {a: 12 + 3e-9})


def test_empty_device_and_refusal() -> None:
    r, code = read_all(b"errno=0\n\n")
    assert (code, r.handshakes) == (0, {})
    r, code = read_all(b"errno=-22\n\n")
    assert code == -22 and r.last_line == "errno=-22"
    r, code = read_all(b"listen_port=1\n\n")
    assert code is None and r.last_line == "(no errno line)"


def test_lines_that_only_look_alike_are_skipped() -> None:
    a = key()
    text = (
        f"public_key={a.hex()}\n"
        "xlast_handshake_time_sec=99\n"  # not at a line start
        "last_handshake_time_sec_extra=98\n"  # another key
        "preshared_key=" + "ab" * 32 + "\n"
        "last_handshake_time_sec=7\n"
        "errno=0\n\n"
    )
    r, code = read_all(text.encode())
    assert (code, r.handshakes) == (0, {a: 7.0})


@pytest.mark.parametrize(
    "line",
    [
        "public_key=zz",
        "public_key=" + "ab" * 31,
        "last_handshake_time_sec=-1",
        "last_handshake_time_nsec=1e9",
        "last_handshake_time_sec=" + "9" * 30,
        "public_key=" + "\u00e9" * 32,
    ],
)
def test_bad_values_are_device_errors_naming_the_interface(line: str) -> None:
    data = response(peer_text(key())).replace(b"errno=0", line.encode() + b"\nerrno=0")
    with pytest.raises(DeviceError, match=r"^wg0: handshakes: cannot parse"):
        read_all(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(min_value=0), max_size=6))
def test_garbage_raises_nothing_but_device_error(data: bytes, cuts: list[int]) -> None:
    with contextlib.suppress(DeviceError):
        read_all(data, cuts)


_names = st.sampled_from(
    ["public_key", "last_handshake_time_sec", "last_handshake_time_nsec", "errno", "allowed_ip",
     "endpoint", "private_key"]
)  # fmt: skip
_values = st.one_of(
    st.text(alphabet="0123456789abcdef-", max_size=70),
    st.binary(max_size=40).map(lambda b: b.hex()),
    st.just(os.urandom(32).hex()),
    st.text(max_size=10),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(_names, _values), max_size=30),
       st.lists(st.integers(min_value=0), max_size=6))  # fmt: skip
def test_plausible_garbage_raises_nothing_but_device_error(
    lines: list[tuple[str, str]], cuts: list[int]
) -> None:
    data = "".join(f"{n}={v}\n" for n, v in lines).encode("utf-8", "replace") + b"\n"
    try:
        r, _ = read_all(data, cuts)
    except DeviceError:
        return
    assert all(isinstance(t, float) and t >= 0 for t in r.handshakes.values())


def test_text_reply_splits_body_and_errno() -> None:
    t = _TextReply()
    t.feed(b"listen_port=5\n")
    t.feed(b"errno=0\n\n")
    assert (t.finish(), t.body, t.last_line) == (0, "listen_port=5", "errno=0")
    t = _TextReply()
    t.feed(b"garbage\n\n")
    assert t.finish() is None and t.last_line == "garbage"


# -- set=1 sections -------------------------------------------------------------------------


def test_peer_section_update_only_comes_right_after_the_key() -> None:
    k, psk = key(), PresharedKey.generate()
    c = PeerConfig(k, Endpoint.parse("[fd18::2]:5"), (ipaddress.ip_network("10.0.0.0/8"),),
                   preshared_key=psk, persistent_keepalive=25, update_only=True)  # fmt: skip
    assert _peer_lines(c) == [
        f"public_key={k.hex()}",
        "update_only=true",
        f"preshared_key={psk.hex()}",
        "endpoint=[fd18::2]:5",
        "persistent_keepalive_interval=25",
        "replace_allowed_ips=true",
        "allowed_ip=10.0.0.0/8",
    ]
    assert _peer_lines(PeerConfig(k)) == [f"public_key={k.hex()}"]


def test_absent_updates_are_dropped_unless_added_earlier_in_the_batch() -> None:
    present, absent, added = key(), key(), key()
    batch = [
        PeerConfig(absent, persistent_keepalive=1, update_only=True),
        PeerConfig(present, persistent_keepalive=1, update_only=True),
        PeerConfig(added, persistent_keepalive=1),
        PeerConfig(added, persistent_keepalive=0, update_only=True),
        PeerConfig(absent, persistent_keepalive=0, update_only=True),
    ]
    assert _without_absent_updates(batch, [present]) == batch[1:4]


# -- I/O logic against a scripted fake daemon -----------------------------------------------


class FakeDaemon:
    """Listens where UAPIDevice looks; answers each request with the next scripted response
    and records the requests and how many connections were made."""

    def __init__(self, path: Path, responses: list[bytes]) -> None:
        self.responses = list(responses)
        self.requests: list[bytes] = []
        self.connections = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                buf = b""
                while self.responses:
                    while b"\n\n" not in buf:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                    if b"\n\n" not in buf:
                        break
                    request, _, buf = buf.partition(b"\n\n")
                    self.requests.append(request + b"\n\n")
                    conn.sendall(self.responses.pop(0))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def daemon_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(uapi_mod, "UAPI_DIR", tmp_path)
    return tmp_path


@pytest.fixture
def fake(daemon_dir: Path) -> Iterator[list[FakeDaemon]]:
    made: list[FakeDaemon] = []
    yield made
    for d in made:
        d.close()


def start(daemon_dir: Path, made: list[FakeDaemon], responses: list[bytes]) -> FakeDaemon:
    d = FakeDaemon(daemon_dir / "wgfake0.sock", responses)
    made.append(d)
    return d


def test_handshakes_over_the_socket(daemon_dir: Path, fake: list[FakeDaemon]) -> None:
    keys = [key() for _ in range(300)]
    data = response(*(peer_text(k, 1700000000 + i, ips=20) for i, k in enumerate(keys)))
    assert len(data) > 1 << 17  # several recv() chunks
    d = start(daemon_dir, fake, [data])
    with UAPIDevice("wgfake0") as dev:
        assert dev.handshakes() == {k: 1700000000.0 + i for i, k in enumerate(keys)}
    assert d.requests == [b"get=1\n\n"]


def test_bad_reply_drops_the_connection(daemon_dir: Path, fake: list[FakeDaemon]) -> None:
    bad = response(peer_text(key())).replace(
        b"last_handshake_time_sec=0", b"last_handshake_time_sec=x"
    )
    d = start(daemon_dir, fake, [bad, response()])
    with UAPIDevice("wgfake0") as dev:
        with pytest.raises(DeviceError, match="wgfake0: handshakes: cannot parse"):
            dev.handshakes()
        assert dev.handshakes() == {}  # on a fresh connection
    assert d.connections == 2


def test_set_peers_is_one_transaction(daemon_dir: Path, fake: list[FakeDaemon]) -> None:
    a, b = key(), key()
    d = start(daemon_dir, fake, [b"errno=0\n\n"])
    with UAPIDevice("wgfake0") as dev:
        dev.set_peers([])  # no I/O
        dev.set_peers([PeerConfig(a, persistent_keepalive=1),
                       PeerConfig(b, persistent_keepalive=0, update_only=True)])  # fmt: skip
    assert d.requests == [
        (f"set=1\npublic_key={a.hex()}\npersistent_keepalive_interval=1\n"
         f"public_key={b.hex()}\nupdate_only=true\npersistent_keepalive_interval=0\n\n").encode()
    ]  # fmt: skip


def test_huge_batches_are_split_into_transactions_that_fit_the_timeout(
    daemon_dir: Path, fake: list[FakeDaemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uapi_mod, "MAX_SET_PEERS", 3)
    keys = [key() for _ in range(7)]
    d = start(daemon_dir, fake, [b"errno=0\n\n"] * 3)
    with UAPIDevice("wgfake0") as dev:
        dev.set_peers([PeerConfig(k) for k in keys])
    assert [r.count(b"public_key=") for r in d.requests] == [3, 3, 1]
    assert b"".join(d.requests) == b"".join(
        b"set=1\n" + b"".join(f"public_key={k.hex()}\n".encode() for k in keys[i : i + 3]) + b"\n"
        for i in (0, 3, 6)
    )


def test_set_peers_on_a_full_device_drops_absent_updates(
    daemon_dir: Path, fake: list[FakeDaemon]
) -> None:
    present, absent, new = key(), key(), key()
    batch = [
        PeerConfig(absent, persistent_keepalive=0, update_only=True),
        PeerConfig(present, persistent_keepalive=0, update_only=True),
    ]
    # refused (wireguard-go creating `absent` on a full device), then the device's peers, then
    # the retry without `absent`
    d = start(daemon_dir, fake, [b"errno=-22\n\n", response(peer_text(present)), b"errno=0\n\n"])
    with UAPIDevice("wgfake0") as dev:
        dev.set_peers(batch)
    assert d.requests[1] == b"get=1\n\n"
    assert (
        d.requests[2]
        == (
            f"set=1\npublic_key={present.hex()}\nupdate_only=true\n"
            "persistent_keepalive_interval=0\n\n"
        ).encode()
    )

    # a refusal that is not about absent updates fails the batch, naming interface and batch
    d.responses.extend([b"errno=-22\n\n", response(peer_text(present))])
    with (
        UAPIDevice("wgfake0") as dev,
        pytest.raises(UAPIError, match=r"^wgfake0: set_peers \(2 peers\) failed: .*errno=-22"),
    ):
        dev.set_peers([PeerConfig(new), batch[1]])


def test_stats_dump_in_chunks_on_a_connection_of_its_own(
    daemon_dir: Path, fake: list[FakeDaemon]
) -> None:
    keys = [key() for _ in range(300)]
    data = response(*(peer_text(k, 1700000000 + i, ips=20) for i, k in enumerate(keys)))
    d = start(daemon_dir, fake, [data])
    with UAPIDevice("wgfake0") as dev:
        dev.close()  # (the fake daemon serves one connection at a time)
        dump = dev.stats_dump()
        chunks = []
        while not dump.done:
            chunks.append(dump.take(10))
        assert dump.complete and dump.take(100) == {}
    assert all(len(ch) >= 10 for ch in chunks[:-1]) and len(chunks) >= 3  # (a read each)
    merged = {k: v for ch in chunks for k, v in ch.items()}
    assert merged == {
        k: (1700000000.0 + i, 92, 148, "198.18.0.2:51821") for i, k in enumerate(keys)
    }  # fmt: skip
    assert d.requests == [b"get=1\n\n"] and d.connections == 2


def test_stats_dump_frees_the_daemon_before_it_is_parsed(
    daemon_dir: Path, fake: list[FakeDaemon]
) -> None:
    # wireguard-go holds its configuration lock until its answer is read to the end, so an
    # install waits for that; this fake serves the next connection only then, the same way
    keys = [key() for _ in range(300)]
    data = response(*(peer_text(k, ips=20) for k in keys))  # more than a socket buffer
    other = key()
    start(daemon_dir, fake, [data, response(peer_text(other, 1700000000))])
    with UAPIDevice("wgfake0", timeout=2) as dev:
        dev.close()
        dump = dev.stats_dump()
        first = dump.take(10)
        assert 10 <= len(first) < 300 and not dump.done
        assert dev.handshakes() == {other: 1700000000.0}  # while the dump is still parsed
        rest = dump.take(1000)
        assert dump.done and dump.complete
    assert first.keys() | rest.keys() == set(keys)


def test_stats_dump_names_a_bad_value_and_a_refusal(
    daemon_dir: Path, fake: list[FakeDaemon]
) -> None:
    bad = response(peer_text(key())).replace(b"rx_bytes=92", b"rx_bytes=x")
    start(daemon_dir, fake, [bad, response(errno=-22)])
    with UAPIDevice("wgfake0") as dev:
        dev.close()
        dump = dev.stats_dump()
        with pytest.raises(DeviceError, match=r"^wgfake0: stats: cannot parse rx_bytes='x'"):
            dump.take(100)
        assert dump.done
        dump = dev.stats_dump()
        with pytest.raises(DeviceError, match=r"^wgfake0: stats failed: wireguard-go returned"):
            dump.take(100)
        assert dump.done
