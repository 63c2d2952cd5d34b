"""UAPI backend: wireguard-go (and other userspace WireGuard) over its unix socket.

Speaks the text protocol (`get=1`, `set=1`, keys in hex) on /var/run/wireguard/<ifname>.sock
over one persistent connection, reconnected once if the daemon restarted.
"""

from __future__ import annotations

import errno as errno_mod
import ipaddress
import os
import socket
import threading
from collections.abc import Iterable
from pathlib import Path

from wgjit.addr import Endpoint, InvalidAddress, IPNetwork
from wgjit.closing import Closing
from wgjit.device import DeviceError, DeviceNotFound, DeviceState, PeerConfig, PeerState
from wgjit.keys import InvalidKey, PrivateKey, PublicKey

UAPI_DIR = Path("/var/run/wireguard")
DEFAULT_TIMEOUT = 10.0  # seconds; `get=1` + parsing on a full wireguard-go (65 536 peers): ~1 s
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

    def read(self) -> DeviceState:
        return self._parse_get(self._transact("get", b"get=1\n\n"))

    def set_peer(self, config: PeerConfig) -> None:
        lines = ["set=1", f"public_key={config.public_key.hex()}"]
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
        op = f"set_peer {config.public_key.short()}"
        try:
            self._transact(op, _body(lines))
        except UAPIError:
            # wireguard-go creates (then drops) an absent peer even for update_only, which fails
            # when the device is full; the update of an absent peer is a no-op by definition.
            if config.update_only and config.public_key not in self.read().peers:
                return
            raise

    def remove_peers(self, keys: Iterable[PublicKey]) -> None:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return
        try:
            self._remove(wanted)
        except UAPIError:
            # Removing an absent key makes wireguard-go create a peer first, which fails only
            # when the device already holds its maximum (65 536) peers: retry with present keys.
            present = self.read().peers
            remaining = [k for k in wanted if k in present]
            if len(remaining) == len(wanted):
                raise
            if remaining:
                self._remove(remaining)

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
            self._transact("configure", _body(lines))

    def __repr__(self) -> str:
        return f"UAPIDevice({self.name!r})"

    # -- wire ---------------------------------------------------------------------------------

    def _remove(self, keys: list[PublicKey]) -> None:
        lines = ["set=1"]
        for k in keys:
            lines.append(f"public_key={k.hex()}")
            lines.append("remove=true")
        self._transact(f"remove_peers ({len(keys)} keys)", _body(lines))

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

    def _transact(self, op: str, request: bytes) -> str:
        """Send one request; return the response lines before `errno=0`."""
        with self._lock:
            for attempt in range(2):
                if self._sock is None:
                    self._sock = self._connect()
                try:
                    response = self._exchange(self._sock, request)
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
                break
            body, _, last = response.rstrip("\n").rpartition("\n")
            key, _, value = last.partition("=")
            try:
                code = int(value) if key == "errno" else None
            except ValueError:
                code = None
            if code is None:
                self._drop()
                raise DeviceError(f"{self.name}: {op}: malformed UAPI response ending {last!r}")
            if code != 0:
                # After a refused `set`, wireguard-go leaves the rest of our request unread and
                # would parse it as the next operation: start over on a fresh connection.
                self._drop()
                raise UAPIError(
                    f"{self.name}: {op} failed: wireguard-go returned errno={code} "
                    f"({os.strerror(abs(code))}); its log says why",
                    code,
                )
            return body

    @staticmethod
    def _exchange(sock: socket.socket, request: bytes) -> str:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError) as e:
            send_error: OSError | None = e  # a refused `set` may have answered before closing
        else:
            send_error = None
        buf = bytearray()
        while not buf.endswith(b"\n\n"):
            try:
                chunk = sock.recv(_RECV_SIZE)
            except ConnectionResetError as e:
                raise _Disconnected(e.strerror) from None
            if not chunk:
                reason = send_error.strerror if send_error else "end of stream"
                raise _Disconnected(reason)
            buf += chunk
        return buf.decode("utf-8", "replace")

    def _parse_get(self, text: str) -> DeviceState:
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
                raise DeviceError(f"{self.name}: get: cannot parse {key}={value!r}: {e}") from None
        if cur is not None:
            peers[cur.key] = cur.build()
        return DeviceState(self.name, private_key, listen_port, peers)


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
