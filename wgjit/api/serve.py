"""`wgjit serve`: checks its settings (token file, listen address, TLS), then runs the API
under uvicorn on a socket it bound itself (so a port in use is one line, not a log dump)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from wgjit.addr import Endpoint, InvalidAddress
from wgjit.errors import WgjitError

# a token shorter than this is refused: it would be guessable
MIN_TOKEN_LEN = 16


class ServeError(WgjitError):
    """A setting of `wgjit serve` is refused; the message names the flag and the fix."""


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int
    loopback: bool

    def url(self, tls: bool) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if tls else 'http'}://{host}:{self.port}"


def parse_listen(text: str) -> Listen:
    """`127.0.0.1:8080`, `[::1]:8080` or `0.0.0.0:8080`: an IP address and a port."""
    try:
        ep = Endpoint.parse(text)
    except InvalidAddress as e:
        raise ServeError(f"--listen: {e}") from None
    return Listen(str(ep.host), ep.port, ipaddress.ip_address(ep.host).is_loopback)


def check_transport(
    listen: Listen, tls_cert: str | None, tls_key: str | None, insecure_http: bool
) -> None:
    """Plain HTTP only on loopback, unless --insecure-http says the operator means it (the
    token would cross the network in the clear)."""
    if (tls_cert is None) != (tls_key is None):
        raise ServeError("--tls-cert and --tls-key go together: give both, or neither")
    for flag, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path is not None and not os.access(path, os.R_OK):
            raise ServeError(f"{flag} {path}: cannot read it; check the path and permissions")
    if tls_cert is None and not listen.loopback and not insecure_http:
        raise ServeError(
            f"--listen {listen.host} is not a loopback address: the bearer token would cross"
            " the network in the clear; give --tls-cert FILE --tls-key FILE, or --insecure-http"
            " if a TLS proxy in front of it handles that"
        )


def read_token(path: str) -> str:
    """The bearer token: the file's content, stripped. The file must be a regular file owned
    by the user running this, readable and writable by no one else (0600 or stricter)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise ServeError(
            f"--token-file {path}: cannot open it ({e.strerror}); create it with"
            f" `umask 077; head -c 32 /dev/urandom | base64 > {path}`"
        ) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ServeError(f"--token-file {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise ServeError(
                f"--token-file {path} is owned by uid {st.st_uid}, not by the user running"
                f" wgjit serve (uid {os.geteuid()}): `chown {os.geteuid()} {path}`"
            )
        if st.st_mode & 0o077:
            raise ServeError(
                f"--token-file {path} is mode {stat.S_IMODE(st.st_mode):04o}: others may read"
                f" the token; make it 0600 (`chmod 600 {path}`) and consider replacing the token"
            )
        raw = f.read(4097)
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ServeError(f"--token-file {path}: the token must be ASCII text") from None
    if len(raw) > 4096 or any(c.isspace() or not c.isprintable() for c in token):
        raise ServeError(f"--token-file {path}: the token must be one line without spaces")
    if len(token) < MIN_TOKEN_LEN:
        raise ServeError(
            f"--token-file {path}: the token has {len(token)} characters; use at least"
            f" {MIN_TOKEN_LEN} (`head -c 32 /dev/urandom | base64 > {path}`)"
        )
    return token


def bind(listen: Listen) -> socket.socket:
    """The listening socket; ServeError naming --listen if the address cannot be bound."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listen.host, listen.port))
        sock.listen(128)
        sock.set_inheritable(True)
    except OSError as e:
        sock.close()
        raise ServeError(
            f"--listen {listen.url(False).split('//')[1]}: cannot listen there ({e.strerror});"
            " choose another address or port"
        ) from None
    return sock


def run(
    app: object,
    sock: socket.socket,
    *,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve `app` on `sock` until SIGINT/SIGTERM."""
    import uvicorn

    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        log_level=log_level,
        server_header=False,
        proxy_headers=False,
        # the store is synchronous: endpoints run in the thread pool, one loop is enough
        workers=None,
    )

    class Server(uvicorn.Server):
        """Stops on SIGINT/SIGTERM (finishing the requests in flight) and returns: exit status
        0, as the gateway's, where uvicorn would die by the signal again afterwards."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    try:
        Server(config).run(sockets=[sock])
    except OSError as e:  # e.g. an unreadable or mismatched TLS key
        raise ServeError(f"cannot serve: {e}") from None
    finally:
        sock.close()
