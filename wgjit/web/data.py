"""What the web page reads and changes, through the service layer (wgjit.service): the only
module of the page that calls it. Peers come as the service's serialised dicts (its one peer
serialiser), so fields added to peers (holder, last handshake, traffic) reach the page as they
reach the API."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wgjit.service import PeerService

STATES = ("active", "disabled", "expired", "revoked")
# action in a URL -> what the page says afterwards
ACTIONS = {"disable": "disabled", "enable": "enabled", "revoke": "revoked"}
# shown on a peer's page in this order first; then any other field the service gives
_FIRST_FIELDS = ("public_key", "allowed_ips", "preshared_key", "holder", "endpoint",
                 "last_handshake", "rx_bytes", "tx_bytes", "expires_at", "created_at",
                 "updated_at")  # fmt: skip
_HIDDEN_FIELDS = frozenset({"name", "state"})


class Refused(Exception):
    """The service refused (unknown peer, bad input, store unreachable): one line for the page."""


@dataclass(frozen=True)
class Config:
    text: str
    notes: tuple[str, ...] = ()


def now_text() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S UTC")


def fields(peer: dict[str, Any]) -> list[tuple[str, Any]]:
    keys = [k for k in _FIRST_FIELDS if k in peer]
    keys += [k for k in peer if k not in keys and k not in _HIDDEN_FIELDS]
    return [(k, peer[k]) for k in keys]


def qr_data_uri(text: str) -> tuple[str, int]:
    """The QR code of a client config as a PNG data: URI and its size in pixels. Never stored
    and never served at a URL of its own: it holds the private key, shown this once."""
    import segno

    scale, border = 4, 2
    qr = segno.make(text, error="l")
    width, _ = qr.symbol_size(scale=scale, border=border)
    return qr.png_data_uri(scale=scale, border=border), int(width)


class Data:
    def __init__(self, service: PeerService) -> None:
        self.service = service

    def page(
        self, prefix: str, state: str, cursor: str, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        if state and state not in STATES:
            raise Refused(f"state {state!r}: choose one of {', '.join(STATES)}")
        r = self._call(self.service.list_peers, limit=limit, cursor=cursor or None,
                       prefix=prefix or None, state=state or None)  # fmt: skip
        return list(r["items"]), r.get("next_cursor")

    def gateways(self) -> list[dict[str, Any]]:
        return list(self._call(self.service.gateways))

    def installed(self, limit: int) -> tuple[list[dict[str, Any]], bool]:
        r = self._call(self.service.list_peers, limit=limit, installed=True)
        return list(r["items"]), bool(r.get("next_cursor"))

    def peer_and_config(self, name: str) -> tuple[dict[str, Any], Config]:
        peer = self._call(self.service.get_peer, name)
        text = self._call(self.service.peer_config, name)
        return peer, Config(text)

    def add(
        self, name: str, allowed_ips: str, preshared_key: bool
    ) -> tuple[dict[str, Any], Config]:
        r = self._call(self.service.add_peer, name, allowed_ips=allowed_ips,
                       preshared_key=preshared_key)  # fmt: skip
        config = r.pop("config")
        return r, Config(config)

    def act(self, name: str, action: str) -> str:
        if action not in ACTIONS:
            raise Refused(f"no such action {action!r}: use one of {', '.join(ACTIONS)}")
        self._call(getattr(self.service, action), name)
        return f"Peer {name} {ACTIONS[action]}."

    @staticmethod
    def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        from wgjit.errors import WgjitError

        try:
            return fn(*args, **kwargs)
        except WgjitError as e:
            raise Refused(str(e)) from None
