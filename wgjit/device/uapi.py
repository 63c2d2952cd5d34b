"""UAPI backend: wireguard-go (and other userspace WireGuard) over its unix socket.

Speaks the text protocol (`get=1`, `set=1`, keys in hex) on /var/run/wireguard/<ifname>.sock
over one persistent connection, reconnected once if the daemon restarted. Responses are read in
chunks and handed to a sans-IO reader: `_TextReply` keeps the whole text (read, set), while
`HandshakeReader` keeps only each peer's key and last handshake as the chunks arrive.
"""

from __future__ import annotations

import binascii
import collections
import errno as errno_mod
import ipaddress
import os
import re
import socket
import threading
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from wgjit.addr import Endpoint, InvalidAddress, IPNetwork
from wgjit.closing import Closing
from wgjit.device import (
    DeviceError,
    DeviceNotFound,
    DeviceState,
    PeerConfig,
    PeerState,
    PeerStats,
    StatsDump,
)
from wgjit.keys import InvalidKey, PrivateKey, PublicKey

UAPI_DIR = Path("/var/run/wireguard")
DEFAULT_TIMEOUT = 10.0  # seconds per receive, and for sending a whole request; a full
# wireguard-go (65 536 peers) answers `get=1` with ~22 MB in 0.2-0.4 s
# Peers per `set=1` in set_peers: wireguard-go reads a transaction as it applies it, creating
# 7-14k peers/s here, so sending one transaction must fit DEFAULT_TIMEOUT with room to spare.
MAX_SET_PEERS = 8192
_RECV_SIZE = 1 << 16


def uapi_socket_path(ifname: str) -> Path:
    """Where wireguard-go listens for `ifname` (the directory is shared by all namespaces)."""
    return UAPI_DIR / f"{ifname}.sock"


class UAPIError(DeviceError):
    """The daemon refused an operation with `errno=N` (N is negative on wireguard-go)."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class _Disconnected(Exception):
    """The daemon closed the connection (or it broke) before a complete response."""


class UAPIDevice(Closing):
    """One WireGuard device reached through its UAPI socket. Thread-safe; calls are serialized."""

    def __init__(self, ifname: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not ifname or "/" in ifname or ifname in (".", ".."):
            raise DeviceNotFound(f"invalid interface name {ifname!r}")
        self.name = ifname
        self.path = uapi_socket_path(ifname)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = self._connect()

    # -- the Device protocol ------------------------------------------------------------------

    def read(self, peers: bool = True) -> DeviceState:
        if not peers:
            return self._transact("get", b"get=1\n\n", lambda: InterfaceReader(self.name)).state
        reply = self._transact("get", b"get=1\n\n", _TextReply)
        return parse_get(self.name, reply.body)

    def handshakes(self) -> dict[PublicKey, float]:
        reader = self._transact("handshakes", b"get=1\n\n", lambda: HandshakeReader(self.name))
        return reader.handshakes

    def stats(self) -> dict[PublicKey, PeerStats]:
        return self._transact("stats", b"get=1\n\n", lambda: StatsReader(self.name)).stats

    def stats_dump(self) -> StatsDump:
        return _StatsStream(self)

    def set_peer(self, config: PeerConfig) -> None:
        try:
            self._set(f"set_peer {config.public_key.short()}", _peer_lines(config))
        except UAPIError:
            # wireguard-go creates (then drops) an absent peer even for update_only, which fails
            # when the device is full; the update of an absent peer is a no-op by definition.
            if config.update_only and config.public_key not in self.handshakes():
                return
            raise

    def set_peers(self, configs: Sequence[PeerConfig]) -> None:
        configs = list(configs)
        for start in range(0, len(configs), MAX_SET_PEERS):
            self._set_peers(configs[start : start + MAX_SET_PEERS], len(configs))

    def remove_peers(self, keys: Iterable[PublicKey]) -> None:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return
        try:
            self._remove(wanted)
        except UAPIError:
            # Removing an absent key makes wireguard-go create a peer first, which fails only
            # when the device already holds its maximum (65 536) peers: retry with present keys.
            present = self.handshakes()
            remaining = [k for k in wanted if k in present]
            if len(remaining) == len(wanted):
                raise
            if remaining:
                self._remove(remaining)

    def identity(self) -> object:
        # a restarted wireguard-go makes its socket anew
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- extras (not part of the protocol) ----------------------------------------------------

    def configure(
        self, private_key: PrivateKey | None = None, listen_port: int | None = None
    ) -> None:
        """Set the device's own key and/or UDP port (peers untouched)."""
        lines = ["set=1"]
        if private_key is not None:
            lines.append(f"private_key={private_key.hex()}")
        if listen_port is not None:
            lines.append(f"listen_port={listen_port}")
        if len(lines) > 1:
            self._transact("configure", _body(lines), _TextReply)

    def __repr__(self) -> str:
        return f"UAPIDevice({self.name!r})"

    # -- wire ---------------------------------------------------------------------------------

    def _set_peers(self, configs: list[PeerConfig], total: int) -> None:
        """One `set=1` transaction for up to MAX_SET_PEERS configs (of `total` in the call)."""
        op = f"set_peers ({total} peers)"
        try:
            self._set(op, [line for c in configs for line in _peer_lines(c)])
        except UAPIError:
            # as in set_peer: on a full device an update_only of an absent peer fails the whole
            # transaction (wireguard-go stops there; the configs before it are applied). Drop
            # those no-ops and send the batch again; a real error fails the same way again.
            if not any(c.update_only for c in configs):
                raise
            kept = _without_absent_updates(configs, self.handshakes())
            if len(kept) == len(configs):
                raise
            if kept:
                self._set(op, [line for c in kept for line in _peer_lines(c)])

    def _set(self, op: str, peer_lines: list[str]) -> None:
        self._transact(op, _body(["set=1", *peer_lines]), _TextReply)

    def _remove(self, keys: list[PublicKey]) -> None:
        lines = ["set=1"]
        for k in keys:
            lines.append(f"public_key={k.hex()}")
            lines.append("remove=true")
        self._transact(f"remove_peers ({len(keys)} keys)", _body(lines), _TextReply)

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._timeout)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise DeviceNotFound(
                f"no wireguard-go UAPI socket for interface {self.name!r} at {self.path}; "
                "is wireguard-go running?"
            ) from None
        except OSError as e:
            sock.close()
            hint = " (run as root)" if e.errno in (errno_mod.EACCES, errno_mod.EPERM) else ""
            raise DeviceError(
                f"{self.name}: cannot connect to {self.path}: {e.strerror or e}{hint}"
            ) from None
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _transact(self, op: str, request: bytes, make_reply: Callable[[], _R]) -> _R:
        """Send one request; feed the response to a fresh reply and check its errno line."""
        with self._lock:
            for attempt in range(2):
                if self._sock is None:
                    self._sock = self._connect()
                reply = make_reply()
                try:
                    self._exchange(self._sock, request, reply.feed)
                except _Disconnected as e:
                    self._drop()
                    if attempt == 0:
                        continue  # the daemon restarted or dropped us: one fresh connection
                    raise DeviceError(
                        f"{self.name}: {op} failed: wireguard-go closed the UAPI connection "
                        f"({e}); is it still running?"
                    ) from None
                except TimeoutError:
                    self._drop()
                    raise DeviceError(
                        f"{self.name}: {op} failed: no answer from {self.path} "
                        f"within {self._timeout:g} s"
                    ) from None
                except BaseException:
                    # a reader error or an interrupt mid-response: the rest of the response
                    # would be taken for the answer to the next request
                    self._drop()
                    raise
                break
            try:
                code = reply.finish()
            except DeviceError:
                self._drop()
                raise
            if code is None:
                self._drop()
                raise DeviceError(
                    f"{self.name}: {op}: malformed UAPI response ending {reply.last_line!r}"
                )
            if code != 0:
                # After a refused `set`, wireguard-go leaves the rest of our request unread and
                # would parse it as the next operation: start over on a fresh connection.
                self._drop()
                raise UAPIError(
                    f"{self.name}: {op} failed: wireguard-go returned errno={code} "
                    f"({os.strerror(abs(code))}); its log says why",
                    code,
                )
            return reply

    @staticmethod
    def _exchange(sock: socket.socket, request: bytes, feed: Callable[[bytes], None]) -> None:
        """Send `request`; pass the response to `feed` chunk by chunk, up to its blank line."""
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError) as e:
            send_error: OSError | None = e  # a refused `set` may have answered before closing
        else:
            send_error = None
        last2 = b""
        while last2 != b"\n\n":
            try:
                chunk = sock.recv(_RECV_SIZE)
            except ConnectionResetError as e:
                raise _Disconnected(e.strerror) from None
            if not chunk:
                reason = send_error.strerror if send_error else "end of stream"
                raise _Disconnected(reason)
            feed(chunk)
            last2 = (last2 + chunk)[-2:]


# -- response parsing (sans-IO) ---------------------------------------------------------------


def parse_get(ifname: str, text: str) -> DeviceState:
    """The DeviceState in the text of a `get=1` response (the lines before `errno=`)."""
    private_key: PrivateKey | None = None
    listen_port = 0
    peers: dict[PublicKey, PeerState] = {}
    cur: _PeerBuilder | None = None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        try:
            if key == "public_key":
                if cur is not None:
                    peers[cur.key] = cur.build()
                cur = _PeerBuilder(PublicKey.from_hex(value))
            elif cur is not None:
                cur.take(key, value)
            elif key == "private_key":
                private_key = PrivateKey.from_hex(value)
            elif key == "listen_port":
                listen_port = int(value)
        except (InvalidKey, InvalidAddress, ValueError) as e:
            raise DeviceError(f"{ifname}: get: cannot parse {key}={value!r}: {e}") from None
    if cur is not None:
        peers[cur.key] = cur.build()
    return DeviceState(ifname, private_key, listen_port, peers)


# -- response readers (sans-IO) ---------------------------------------------------------------


class _Reply(typing.Protocol):
    last_line: str

    def feed(self, data: bytes) -> None:
        """The next chunk of the response, as received."""

    def finish(self) -> int | None:
        """After the response's blank line: its errno, or None if it had no errno line."""


def _errno_of(line: str) -> int | None:
    key, sep, value = line.partition("=")
    if key != "errno" or not sep:
        return None
    try:
        return int(value)
    except ValueError:
        return None


_R = typing.TypeVar("_R", bound=_Reply)


class _TextReply:
    """The whole response as text: `body` (the lines before `errno=N`)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.body = ""
        self.last_line = ""

    def feed(self, data: bytes) -> None:
        self._buf += data

    def finish(self) -> int | None:
        text = self._buf.decode("utf-8", "replace")
        self._buf = bytearray()
        self.body, _, self.last_line = text.rstrip("\n").rpartition("\n")
        return _errno_of(self.last_line)


# A line that handshakes() needs, with the newline before it (the reader keeps one in front of
# every line); the regex engine steps over all others without Python seeing them.
_HANDSHAKE_LINE = re.compile(
    rb"\n(public_key|last_handshake_time_sec|last_handshake_time_nsec|errno)=([^\n]*)(?=\n)"
)


class HandshakeReader:
    """Each peer's key and last handshake (unix seconds, 0.0 if never) from a `get=1` response
    fed in chunks as they arrive; memory stays at one chunk plus the result.

    Lines other than `public_key`, `last_handshake_time_sec`/`_nsec` and the final `errno` are
    never split, decoded or copied. Raises DeviceError for a value it cannot parse."""

    __slots__ = ("_key", "_nsec", "_sec", "_tail", "errno", "handshakes", "ifname", "last_line")

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self.handshakes: dict[PublicKey, float] = {}
        self.errno: int | None = None
        self.last_line = "(no errno line)"
        self._tail = b"\n"  # the unfinished last line, after the newline that precedes it
        self._key: PublicKey | None = None
        self._sec = 0
        self._nsec = 0

    def feed(self, data: bytes) -> None:
        buf = self._tail + data
        end = buf.rfind(b"\n") + 1  # >= 1: the tail starts with a newline
        lines = _HANDSHAKE_LINE.findall(buf, 0, end)
        self._tail = buf[end - 1 :]
        if lines:
            self._take(lines)

    def finish(self) -> int | None:
        if self._tail != b"\n":
            self.feed(b"\n")  # a last line without its newline (never sent by wireguard-go)
        if self._key is not None:
            self.handshakes[self._key] = self._sec + self._nsec / 1e9
            self._key = None
        return self.errno

    def _take(self, lines: list[tuple[bytes, bytes]]) -> None:
        # one loop over locals: this runs three times per peer
        handshakes = self.handshakes
        key, sec, nsec = self._key, self._sec, self._nsec
        name = value = b""
        try:
            for name, value in lines:
                if name == b"public_key":
                    if key is not None:
                        handshakes[key] = sec + nsec / 1e9
                    key = PublicKey(binascii.a2b_hex(value))
                    sec = nsec = 0
                elif name == b"errno":
                    self.last_line = "errno=" + value.decode("ascii", "replace")
                    self.errno = _errno_of(self.last_line)
                elif not value.isdigit() or len(value) > 20:
                    raise ValueError("not a non-negative integer")
                elif name == b"last_handshake_time_sec":
                    sec = int(value)
                else:
                    nsec = int(value)
        except (InvalidKey, ValueError) as e:  # binascii.Error is a ValueError
            text = value[:80].decode("ascii", "replace")
            raise DeviceError(
                f"{self.ifname}: handshakes: cannot parse {name.decode()}={text!r}: {e}"
            ) from None
        finally:
            self._key, self._sec, self._nsec = key, sec, nsec


# the lines stats() needs (as _HANDSHAKE_LINE, with the counters and the endpoint)
_STATS_LINE = re.compile(
    rb"\n(public_key|last_handshake_time_sec|last_handshake_time_nsec|rx_bytes|tx_bytes"
    rb"|endpoint|errno)=([^\n]*)(?=\n)"
)


class StatsReader:
    """Each peer's PeerStats (last handshake, rx and tx bytes, endpoint) from a `get=1`
    response fed in chunks, like HandshakeReader: other lines are never split or decoded.
    Raises DeviceError for a value it cannot parse."""

    __slots__ = ("_cur", "_key", "_tail", "errno", "ifname", "last_line", "stats")

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self.stats: dict[PublicKey, PeerStats] = {}
        self.errno: int | None = None
        self.last_line = "(no errno line)"
        self._tail = b"\n"
        self._key: PublicKey | None = None
        # the current peer's handshake seconds and nanoseconds, rx, tx, endpoint
        self._cur: tuple[int, int, int, int, str | None] = (0, 0, 0, 0, None)

    def feed(self, data: bytes) -> None:
        buf = self._tail + data
        end = buf.rfind(b"\n") + 1
        lines = _STATS_LINE.findall(buf, 0, end)
        self._tail = buf[end - 1 :]
        if lines:
            self._take(lines)

    def take(self) -> dict[PublicKey, PeerStats]:
        """The peers read whole since the last take() (all so far, the first time), for a
        reader that hands the response on in chunks; the peer being read stays."""
        stats, self.stats = self.stats, {}
        return stats

    def finish(self) -> int | None:
        if self._tail != b"\n":
            self.feed(b"\n")
        if self._key is not None:
            sec, nsec, rx, tx, ep = self._cur
            self.stats[self._key] = (sec + nsec / 1e9, rx, tx, ep)
            self._key = None
        return self.errno

    def _take(self, lines: list[tuple[bytes, bytes]]) -> None:
        # one loop over locals: this runs six times per peer
        stats = self.stats
        key = self._key
        sec, nsec, rx, tx, ep = self._cur
        name = value = b""
        try:
            for name, value in lines:
                if name == b"public_key":
                    if key is not None:
                        stats[key] = (sec + nsec / 1e9, rx, tx, ep)
                    key = PublicKey(binascii.a2b_hex(value))
                    sec = nsec = rx = tx = 0
                    ep = None
                elif name == b"endpoint":
                    ep = value.decode("ascii") if value else None
                elif name == b"errno":
                    self.last_line = "errno=" + value.decode("ascii", "replace")
                    self.errno = _errno_of(self.last_line)
                elif not value.isdigit() or len(value) > 20:
                    raise ValueError("not a non-negative integer")
                elif name == b"rx_bytes":
                    rx = int(value)
                elif name == b"tx_bytes":
                    tx = int(value)
                elif name == b"last_handshake_time_sec":
                    sec = int(value)
                else:
                    nsec = int(value)
        except (InvalidKey, ValueError) as e:  # binascii.Error, UnicodeError: ValueErrors
            text = value[:80].decode("ascii", "replace")
            raise DeviceError(
                f"{self.ifname}: stats: cannot parse {name.decode()}={text!r}: {e}"
            ) from None
        finally:
            self._key, self._cur = key, (sec, nsec, rx, tx, ep)


# the lines read(peers=False) needs; the regex engine steps over the peers' lines
_INTERFACE_LINE = re.compile(rb"\n(private_key|listen_port|errno)=([^\n]*)(?=\n)")


class InterfaceReader:
    """The device's private key and listen port from a `get=1` response fed in chunks; the
    peers' lines (all but a few of a big device's) are never split or decoded."""

    __slots__ = ("_tail", "errno", "ifname", "last_line", "listen_port", "private_key")

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self.private_key: PrivateKey | None = None
        self.listen_port = 0
        self.errno: int | None = None
        self.last_line = "(no errno line)"
        self._tail = b"\n"

    def feed(self, data: bytes) -> None:
        buf = self._tail + data
        end = buf.rfind(b"\n") + 1
        for name, value in _INTERFACE_LINE.findall(buf, 0, end):
            try:
                if name == b"private_key":
                    raw = binascii.a2b_hex(value)
                    self.private_key = PrivateKey(raw) if any(raw) else None
                elif name == b"listen_port":
                    self.listen_port = int(value)
                else:
                    self.last_line = "errno=" + value.decode("ascii", "replace")
                    self.errno = _errno_of(self.last_line)
            except (InvalidKey, ValueError) as e:
                what = name.decode()
                raise DeviceError(f"{self.ifname}: get: cannot parse {what}: {e}") from None
        self._tail = buf[end - 1 :]

    def finish(self) -> int | None:
        if self._tail != b"\n":
            self.feed(b"\n")
        return self.errno

    @property
    def state(self) -> DeviceState:
        return DeviceState(self.ifname, self.private_key, self.listen_port)


def _peer_lines(config: PeerConfig) -> list[str]:
    """One peer's section of a `set=1` transaction."""
    lines = [f"public_key={config.public_key.hex()}"]
    if config.update_only:
        lines.append("update_only=true")  # first, so nothing is applied to a new peer
    if config.preshared_key is not None:
        lines.append(f"preshared_key={config.preshared_key.hex()}")
    if config.endpoint is not None:
        lines.append(f"endpoint={config.endpoint}")
    if config.persistent_keepalive is not None:
        lines.append(f"persistent_keepalive_interval={config.persistent_keepalive}")
    if config.allowed_ips is not None:
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={net}" for net in config.allowed_ips)
    return lines


def _without_absent_updates(
    configs: list[PeerConfig], present: Iterable[PublicKey]
) -> list[PeerConfig]:
    """The batch without update_only configs of peers that neither are on the device nor
    are added earlier in the batch (those are no-ops that a full wireguard-go refuses)."""
    known = set(present)
    kept = []
    for c in configs:
        if c.update_only and c.public_key not in known:
            continue
        known.add(c.public_key)
        kept.append(c)
    return kept


class _PeerBuilder:
    __slots__ = ("allowed", "endpoint", "hs_nsec", "hs_sec", "keepalive", "key", "rx", "tx")

    def __init__(self, key: PublicKey) -> None:
        self.key = key
        self.endpoint: Endpoint | None = None
        self.allowed: list[IPNetwork] = []
        self.hs_sec = 0
        self.hs_nsec = 0
        self.rx = 0
        self.tx = 0
        self.keepalive = 0

    def take(self, key: str, value: str) -> None:
        if key == "allowed_ip":
            self.allowed.append(ipaddress.ip_network(value, strict=False))
        elif key == "endpoint":
            self.endpoint = Endpoint.parse(value)
        elif key == "last_handshake_time_sec":
            self.hs_sec = int(value)
        elif key == "last_handshake_time_nsec":
            self.hs_nsec = int(value)
        elif key == "rx_bytes":
            self.rx = int(value)
        elif key == "tx_bytes":
            self.tx = int(value)
        elif key == "persistent_keepalive_interval":
            self.keepalive = int(value)
        # anything else (preshared_key, protocol_version, future keys) is not part of PeerState

    def build(self) -> PeerState:
        hs = None if self.hs_sec == 0 and self.hs_nsec == 0 else self.hs_sec + self.hs_nsec / 1e9
        return PeerState(
            public_key=self.key,
            endpoint=self.endpoint,
            allowed_ips=tuple(self.allowed),
            last_handshake=hs,
            rx_bytes=self.rx,
            tx_bytes=self.tx,
            persistent_keepalive=self.keepalive,
        )


def _body(lines: list[str]) -> bytes:
    lines.append("\n")  # the blank line that ends a `set=1` transaction
    return "\n".join(lines).encode("ascii")


class _StatsStream:
    """UAPIDevice.stats_dump(): a `get=1` on a connection of its own, read to its end at the
    first take(), then parsed by a StatsReader and handed out a chunk at a time.

    wireguard-go writes its whole answer holding its configuration lock for reading: other
    reads go on, but a change (an install on the device's handle) waits until the answer is
    read to its end. So the bytes come first (about 0.15 s and 22 MB at 65 536 peers,
    wireguard-go's maximum) and the parsing after, with the lock free: parsed as it was read,
    the answer held installs for the whole sweep (0.6 s beside a busy packet loop). Each read
    is dropped once parsed."""

    def __init__(self, device: UAPIDevice) -> None:
        self.done = False
        self.complete = True
        self._name = device.name
        self._path = device.path
        self._timeout = device._timeout
        self._reader = StatsReader(device.name)
        self._raw: collections.deque[bytes] | None = None  # the answer, once read
        self._sock: socket.socket | None = device._connect()
        try:
            self._sock.sendall(b"get=1\n\n")
        except OSError as e:
            self.close()
            raise DeviceError(
                f"{self._name}: stats failed: cannot send to {self._path}: {e.strerror or e}"
            ) from None

    def take(self, peers: int) -> dict[PublicKey, PeerStats]:
        reader = self._reader
        if self.done:
            return reader.take()
        try:
            if self._raw is None:
                self._raw = self._read_all()
            raw = self._raw
            while raw and len(reader.stats) < peers:
                reader.feed(raw.popleft())
            if not raw:
                self.close()
                self._finish()
        except BaseException:
            self.close()
            raise
        return reader.take()

    def _read_all(self) -> collections.deque[bytes]:
        sock = self._sock
        assert sock is not None
        raw: collections.deque[bytes] = collections.deque()
        last2 = b""
        try:
            while last2 != b"\n\n":
                data = sock.recv(_RECV_SIZE)
                if not data:
                    raise DeviceError(
                        f"{self._name}: stats failed: wireguard-go closed the UAPI connection "
                        "(end of stream); is it still running?"
                    )
                raw.append(data)
                last2 = (last2 + data)[-2:]
        except TimeoutError:
            raise DeviceError(
                f"{self._name}: stats failed: no answer from {self._path} "
                f"within {self._timeout:g} s"
            ) from None
        except OSError as e:
            raise DeviceError(
                f"{self._name}: stats failed: UAPI connection error: {e.strerror or e}"
            ) from None
        finally:
            self._sock = None
            sock.close()  # wireguard-go's lock is free from here
        return raw

    def _finish(self) -> None:
        code = self._reader.finish()
        if code is None:
            raise DeviceError(
                f"{self._name}: stats: malformed UAPI response ending {self._reader.last_line!r}"
            )
        if code != 0:
            raise UAPIError(
                f"{self._name}: stats failed: wireguard-go returned errno={code} "
                f"({os.strerror(abs(code))}); its log says why",
                code,
            )

    def close(self) -> None:
        self.done = True
        self._raw = None
        if self._sock is not None:
            self._sock.close()  # an answer left unread ends with its connection
            self._sock = None
