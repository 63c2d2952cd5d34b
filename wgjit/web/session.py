"""Sign-in sessions and CSRF tokens of the web page: sans-IO, no state but the admin token.

Why an HttpOnly cookie and not the token in sessionStorage with a bearer header on fetch():
the page is server-rendered, so a plain link or form submission must carry the credential,
which only a cookie does; and a cookie the page's scripts cannot read (HttpOnly) keeps the
credential out of reach of any script injected into the page, where sessionStorage hands it to
every script on the origin. The cookie's known weakness, cross-site request forgery, is closed
twice: it is SameSite=Strict (a browser never sends it on a request another site starts), and
every state-changing request is a POST that must carry a CSRF token derived from the session
(a hidden form field), which a page of another origin cannot read. A POST whose Origin header
names another origin is refused before anything else.

The cookie holds no token either: it is `ISSUED.NONCE.MAC`, an HMAC under a key derived from
the admin token, valid for SESSION_TTL_S. Restarting `wgjit serve` with another token ends
every session; signing out ends that one (kept in a small set until it would have expired).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time

SESSION_COOKIE = "wgjit_session"
SESSION_TTL_S = 12 * 3600
# sessions signed out before they expired, remembered until then (bounded)
MAX_ENDED = 10000


class Sessions:
    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._key = hashlib.sha256(b"wgjit web session key\0" + self._token).digest()
        self._ended: dict[str, float] = {}
        self._lock = threading.Lock()

    def _mac(self, purpose: str, text: str) -> str:
        return hmac.new(self._key, f"{purpose}\0{text}".encode(), hashlib.sha256).hexdigest()

    def check_token(self, given: str) -> bool:
        """The admin token, compared in constant time."""
        return hmac.compare_digest(given.strip().encode(), self._token)

    def issue(self, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        body = f"{issued}.{secrets.token_hex(12)}"
        return f"{body}.{self._mac('session', body)}"

    def valid(self, value: str | None, now: float | None = None) -> bool:
        if not value or value.count(".") != 2:
            return False
        body, _, mac = value.rpartition(".")
        if not hmac.compare_digest(mac.encode(), self._mac("session", body).encode()):
            return False
        try:
            issued = int(body.split(".", 1)[0])
        except ValueError:
            return False
        t = time.time() if now is None else now
        if not issued <= t + 60 or t - issued > SESSION_TTL_S:
            return False
        with self._lock:
            return value not in self._ended

    def end(self, value: str, now: float | None = None) -> None:
        """Sign out: the session is refused from now on, even if its cookie was copied."""
        t = time.time() if now is None else now
        with self._lock:
            if len(self._ended) >= MAX_ENDED:
                for v, at in list(self._ended.items()):
                    if t - at > SESSION_TTL_S:
                        del self._ended[v]
                if len(self._ended) >= MAX_ENDED:  # still full: forget the oldest
                    del self._ended[next(iter(self._ended))]
            self._ended[value] = t

    def csrf(self, session: str) -> str:
        """The CSRF token of a session: forms carry it, POSTs must return it."""
        return self._mac("csrf", session)

    def check_csrf(self, session: str, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.csrf(session).encode())
