"""What the web page reads and changes, through the service layer (wgjit.service): the only
module of the page that calls it. Peers come as the service's serialised dicts (its one peer
serialiser), so fields added to peers (holder, last handshake, traffic) reach the page as they
reach the API."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wgjit.errors import WgjitError
from wgjit.service import peer_dict

if TYPE_CHECKING:
    from wgjit.clientconf import ClientConfig
    from wgjit.service import PeerService

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


def _plain(obj: Any) -> dict[str, Any]:
    """A gateway's presence as the page shows it: a dict as is; a dataclass field by field,
    unix seconds in `*_at` fields as ISO 8601 UTC (as the peer serialiser writes times)."""
    if isinstance(obj, dict):
        return dict(obj)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name.endswith("_at") and isinstance(value, int | float):
            value = iso(value)
        out[f.name] = value
    return out


def iso(ts: float) -> str:
    text = datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")
    return text.replace("+00:00", "Z")


class Data:
    def __init__(self, service: PeerService) -> None:
        self.service = service

    def page(
        self, prefix: str, state: str, cursor: str, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        with _refused():
            page = self.service.list_page(
                cursor=cursor or None, limit=limit, prefix=prefix or None, state=state or None
            )
        return [peer_dict(p) for p in page.items], page.next_cursor

    def gateways(self) -> list[dict[str, Any]]:
        """The live gateways: id, last heartbeat, peers installed and claimed, rejects by
        reason."""
        with _refused():
            return [_plain(g) for g in self.service.gateways()]

    def busiest(self, limit: int) -> list[dict[str, Any]]:
        """The peers with the most traffic (rx + tx) in total, with their holder and last
        handshake."""
        with _refused():
            return [peer_dict(p) for p in self.service.store.busiest_peers(limit)]

    def peer_and_config(self, name: str) -> tuple[dict[str, Any], Config]:
        with _refused():
            peer, conf = self.service.config(name)
        return peer_dict(peer), _config(conf)

    def add(
        self, name: str, allowed_ips: str, public_key: str, preshared_key: bool
    ) -> tuple[dict[str, Any], Config, bool]:
        """Add a peer; its client config (with the private key if wgjit generated the pair:
        the only copy) and whether it has the private key."""
        with _refused():
            # the config's inputs are checked before anything is written
            plan = self.service.plan()
            added = self.service.add(
                name,
                allowed_ips=allowed_ips or "auto",
                public_key=public_key or None,
                preshared_key=preshared_key,
            )
            conf = self.service.client_config(added.peer, plan, added.private_key)
        return peer_dict(added.peer), _config(conf), added.private_key is not None

    def act(self, name: str, action: str) -> None:
        with _refused():
            if action == "disable":
                self.service.disable(name)
            elif action == "enable":
                self.service.enable(name)
            elif action == "revoke":
                self.service.revoke(name)
            else:
                raise Refused(f"no such action {action!r}: use one of {', '.join(ACTIONS)}")


def _config(conf: ClientConfig) -> Config:
    notes = tuple(f"The config lacks {gap}: fill it in." for gap in conf.missing())
    return Config(conf.render(), notes)


@contextlib.contextmanager
def _refused() -> Iterator[None]:
    """A WgjitError (unknown peer, bad input, store unreachable) as one line for the page."""
    try:
        yield
    except WgjitError as e:
        raise Refused(str(e)) from None
