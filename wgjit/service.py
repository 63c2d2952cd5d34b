"""The service layer: what can be done with peers, over a Store, for every entry point.

The CLI (`wgjit peer ...`) and the HTTP API (`wgjit serve`, wgjit.api) both call this; neither
has logic of its own beyond reading its input and showing the result. Key pairs are generated
here, `--allowed-ips auto` picks the pool's next free address here, client configs are built
here from the store's defaults and what the caller gives, and `peer_dict` is the one way a
peer is shown as data (JSON of `peer show/list --json` and of the API).

Every failure is a `WgjitError` (wgjit.errors) with a one-line message; where it is about one
input, `field` names it (the API's field names: `name`, `allowed_ips`, `public_key`, ...).
No I/O but through the store: an entry point that knows the gateway's key and port (read from
its interface) passes them in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import re
import time
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from wgjit.addr import IPNetwork, parse_networks
from wgjit.clientconf import (
    DEFAULT_PORT,
    ClientConfig,
    parse_allowed,
    parse_dns,
    parse_endpoint,
)
from wgjit.errors import InputError, WgjitError, about
from wgjit.keys import PresharedKey, PrivateKey, PublicKey
from wgjit.store import (
    KEEP,
    MAX_PAGE,
    PEER_NAME_CHARS,
    PEER_STATES,
    GatewayPresence,
    Keep,
    Peer,
    Store,
    UnknownPeer,
)
from wgjit.store.pool import add_with_auto_address

DEFAULT_CLIENT_ALLOWED_IPS: Final = "0.0.0.0/0, ::/0"
# a page of `list` unless asked otherwise, and the most one may ask for
DEFAULT_PAGE: Final = 100
_NAME_PART = re.compile(r"[A-Za-z0-9._@-]{0,64}")


# -- showing a peer ---------------------------------------------------------------------------


def iso(ts: float | None) -> str | None:
    """Unix seconds as ISO 8601 in UTC (`2026-12-01T09:30:00Z`); None stays None."""
    if ts is None:
        return None
    text = datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")
    return text.replace("+00:00", "Z")


def mark_time(mark: bytes) -> str:
    """A TAI64N mark as ISO 8601 UTC (`2026-11-24T07:30:01.204Z`); hex if out of range."""
    from wgjit.handshake import Timestamp

    try:
        t = datetime.datetime.fromtimestamp(Timestamp(mark).to_unix(), datetime.UTC)
    except (ValueError, OverflowError, OSError):
        return f"TAI64N {mark.hex()} (out of range)"
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# fields shown under another name, or otherwise than by their type (see _value)
RENAMED_FIELDS: Final = {"handshake_hwm": "handshake_mark"}


def is_time_field(name: str) -> bool:
    """Peer fields holding unix seconds: `*_at` and `last_*` (created_at, last_seen, ...)."""
    return name.endswith("_at") or name.startswith("last_")


def _secret_fields() -> frozenset[str]:
    """Peer fields that hold a secret key (the preshared key; any added later)."""
    secret = (PresharedKey, PrivateKey)
    return frozenset(
        name
        for name, hint in typing.get_type_hints(Peer).items()
        if hint in secret or any(a in secret for a in typing.get_args(hint))
    )


SECRET_FIELDS: Final = _secret_fields()


def _value(name: str, value: Any) -> Any:
    """One Peer field as JSON: a secret key (the preshared key) only as whether there is one
    (`peer export` is the backup that has it), public keys as base64, times as ISO 8601 UTC,
    the replay mark as the client's time, networks as text."""
    if name in SECRET_FIELDS:
        return value is not None
    if value is None:
        return None
    if name == "handshake_hwm":
        return mark_time(value)
    if isinstance(value, PublicKey):
        return value.b64()
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return iso(value) if is_time_field(name) else value
    if isinstance(value, tuple | list):
        return [str(v) for v in value]
    return str(value)


def peer_dict(p: Peer, now: float | None = None) -> dict[str, Any]:
    """A peer as JSON-ready data: every field of Peer (a field added to Peer appears here by
    itself, shown by its type and name), plus `state` (active, disabled, expired, revoked at
    `now`). `preshared_key` is true/false, never the key."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(p):
        value = getattr(p, f.name)
        out[RENAMED_FIELDS.get(f.name, f.name)] = _value(f.name, value)
        if f.name == "preshared_key":  # the state next to what decides it
            out["state"] = p.refusal(time.time() if now is None else now) or "active"
    return out


# -- client configs ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigOptions:
    """What a client config needs besides the peer, as given by the caller (None: not given;
    the store's defaults fill it, else the config has a placeholder or goes without)."""

    endpoint: str | None = None  # HOST[:PORT]
    dns: str | None = None  # ADDR|DOMAIN[,...]
    mtu: int | None = None
    persistent_keepalive: int | None = None
    client_allowed_ips: str | None = None  # CIDR[,...]: what the client routes to the tunnel
    gateway_key: PublicKey | None = None


@dataclass(frozen=True, slots=True)
class ConfigPlan:
    """ConfigOptions checked and completed: everything of a client config but the peer."""

    gateway_key: PublicKey | None
    endpoint: str | None
    allowed_ips: tuple[IPNetwork, ...]
    dns: tuple[str, ...]
    mtu: int | None
    persistent_keepalive: int | None


# store-wide defaults (`wgjit store set-defaults`) that fill ConfigOptions: name -> field
DEFAULT_FIELDS: Final = {
    "endpoint": "endpoint",
    "dns": "dns",
    "mtu": "mtu",
    "persistent-keepalive": "persistent_keepalive",
    "client-allowed-ips": "client_allowed_ips",
}


def _int_in(field: str, text: Any, lo: int, hi: int) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise InputError(
            f"{field} {text!r} is not a whole number; use {lo}-{hi}", field=field
        ) from None
    if not lo <= value <= hi:
        raise InputError(f"{field} {value} is out of range; use {lo}-{hi}", field=field)
    return value


def plan_config(
    options: ConfigOptions,
    defaults: Mapping[str, str],
    *,
    gateway_key: PublicKey | None = None,
    listen_port: int | None = None,
) -> ConfigPlan:
    """Check `options`, filling what is not given from `defaults` (the store's, `wgjit store
    set-defaults`); an endpoint without a port gets `listen_port` (else 51820)."""
    values = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    for key, value in defaults.items():
        field = DEFAULT_FIELDS.get(key)
        if field is not None and values.get(field) is None:
            values[field] = value
    endpoint, dns = values["endpoint"], values["dns"]
    mtu, keepalive = values["mtu"], values["persistent_keepalive"]
    with about("endpoint"):
        endpoint = (
            parse_endpoint(endpoint, listen_port or DEFAULT_PORT) if endpoint is not None else None
        )
    with about("client_allowed_ips"):
        allowed = parse_allowed(values["client_allowed_ips"] or DEFAULT_CLIENT_ALLOWED_IPS)
    with about("dns"):
        dns_list = parse_dns(dns) if dns is not None else ()
    return ConfigPlan(
        gateway_key=values["gateway_key"] or gateway_key,
        endpoint=endpoint,
        allowed_ips=allowed,
        dns=dns_list,
        mtu=_int_in("mtu", mtu, 576, 65535) if mtu is not None else None,
        persistent_keepalive=(
            _int_in("persistent_keepalive", keepalive, 1, 65535) if keepalive is not None else None
        ),
    )


def render_qr_png(text: str, scale: int = 6) -> bytes:
    """A client config as a QR code image (PNG), as WireGuard's phone apps scan it."""
    import segno

    buf = io.BytesIO()
    segno.make(text, error="l").save(buf, kind="png", scale=scale)
    return buf.getvalue()


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Added:
    """A peer just added or re-keyed, and its private key if wgjit generated the pair (the
    only copy: wgjit stores none)."""

    peer: Peer
    private_key: PrivateKey | None
    previous: Peer | None = None  # rotate: the peer before


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Peer]
    # the `cursor` of the next page; None: this was the last
    next_cursor: str | None


# -- the service ------------------------------------------------------------------------------


@contextlib.contextmanager
def _blame() -> Iterator[None]:
    """Name the field a store refusal is about: its message starts with what it refuses
    ("public key ...", "allowed IP(s) ...", "peer 'x' already exists", an invalid name)."""
    try:
        yield
    except WgjitError as e:
        if e.field is None:
            text = str(e)
            if text.startswith("public key"):
                e.field = "public_key"
            elif text.startswith("allowed IP"):
                e.field = "allowed_ips"
            elif text.startswith(("peer ", "no peer ", "invalid peer name")):
                e.field = "name"
        raise


class PeerService:
    """Peer management over one store. Thread-safe as far as the store is (both are)."""

    def __init__(
        self,
        store: Store,
        *,
        gateway_key: PublicKey | None = None,
        listen_port: int | None = None,
    ) -> None:
        """`gateway_key` and `listen_port`: the gateway's interface, if the caller read it
        (client configs then have its key; an endpoint without a port gets its port)."""
        self.store = store
        self.gateway_key = gateway_key
        self.listen_port = listen_port

    # -- reading ------------------------------------------------------------------------------

    def get(self, name: str) -> Peer:
        """The peer named `name`; UnknownPeer (field `name`) if there is none."""
        p = self.store.get_peer(name)
        if p is None:
            raise UnknownPeer(f"no peer named {name!r} (see `wgjit peer list`)", field="name")
        return p

    def list_page(
        self,
        *,
        cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
        prefix: str | None = None,
        state: str | None = None,
    ) -> Page:
        """One page of peers in name order: after `cursor` (a page's `next_cursor`), names
        starting with `prefix`, in `state`; at most `limit` (1 to MAX_PAGE - 1)."""
        if not 1 <= limit < MAX_PAGE:
            raise InputError(f"limit {limit} is out of range; use 1-{MAX_PAGE - 1}", field="limit")
        for field, text in (("cursor", cursor), ("prefix", prefix)):
            if text is not None and not _NAME_PART.fullmatch(text):
                raise InputError(
                    f"{field} {text!r} cannot be (part of) a peer name: use at most 64 of"
                    f" {PEER_NAME_CHARS}",
                    field=field,
                )
        if state is not None and state not in PEER_STATES:
            raise InputError(
                f"state {state!r} is not one of {', '.join(PEER_STATES)}", field="state"
            )
        # one more than asked: whether there is a next page, without an empty last one
        rows = self.store.list_page(
            after=cursor or "",
            limit=limit + 1,
            prefix=prefix or "",
            state=state,
        )
        if len(rows) > limit:
            return Page(rows[:limit], rows[limit - 1].name)
        return Page(rows, None)

    def iter_all(self) -> Iterator[Peer]:
        """Every peer in name order, streamed page by page."""
        return self.store.iter_peers()

    def defaults(self) -> dict[str, str]:
        return self.store.get_defaults()

    def gateways(self) -> list[GatewayPresence]:
        """The live gateways (heartbeat within the presence timeout): the peers on each one's
        device as of its last heartbeat, the peers the store has it holding, its drops."""
        return self.store.gateways()

    # -- adding and changing ------------------------------------------------------------------

    def add(
        self,
        name: str,
        *,
        allowed_ips: str | Sequence[str] = "auto",
        public_key: str | PublicKey | None = None,
        preshared_key: bool = False,
        allow_overlap: bool = False,
        expires_at: float | None = None,
    ) -> Added:
        """Add a peer. `allowed_ips`: CIDRs (text with commas, or a list), or "auto" for the
        pool's next free address. Without `public_key` a key pair is generated: the private
        key is in the result (and nowhere else). `preshared_key`: generate one."""
        nets = self._networks(allowed_ips, allow_overlap)
        private = None
        if public_key is None:
            private = PrivateKey.generate()
            key = private.public_key()
        else:
            key = self._key(public_key)
        self._future(expires_at)
        psk = PresharedKey.generate() if preshared_key else None

        def add(nets: tuple[IPNetwork, ...]) -> Peer:
            return self.store.add_peer(
                name, key, nets, psk, allow_overlap=allow_overlap, expires_at=expires_at
            )

        with _blame():
            peer = add(nets) if nets is not None else add_with_auto_address(self.store, add)
        return Added(peer, private)

    def update(
        self,
        name: str,
        *,
        allowed_ips: str | Sequence[str] | None = None,
        new_name: str | None = None,
        expires_at: float | Keep | None = KEEP,
        disabled: bool | None = None,
        allow_overlap: bool = False,
    ) -> Peer:
        """Change what is given (None / KEEP: unchanged). `allowed_ips` "auto": the pool's
        next free address. `expires_at` None: never expires."""
        nets = None
        auto = False
        if allowed_ips is not None:
            nets = self._networks(allowed_ips, allow_overlap)
            auto = nets is None
        if not isinstance(expires_at, Keep):
            self._future(expires_at)
        if (
            nets is None
            and not auto
            and new_name is None
            and expires_at is KEEP
            and disabled is None
        ):
            raise InputError(
                "nothing to change; give allowed IPs, a new name, an expiry or disabled"
            )
        changes: dict[str, Any] = {"new_name": new_name, "expires_at": expires_at}
        if disabled is not None:
            changes["disabled"] = disabled
        with _blame():
            if auto:
                self.get(name)  # an unknown peer is that error, not a pool's

                def change(nets: tuple[IPNetwork, ...]) -> Peer:
                    return self.store.update_peer(name, allowed_ips=nets, **changes)

                return add_with_auto_address(self.store, change)
            return self.store.update_peer(
                name, allowed_ips=nets, allow_overlap=allow_overlap, **changes
            )

    def disable(self, name: str) -> Peer:
        with _blame():
            return self.store.update_peer(name, disabled=True)

    def enable(self, name: str) -> Peer:
        with _blame():
            return self.store.update_peer(name, disabled=False)

    def revoke(self, name: str) -> Peer:
        with _blame():
            return self.store.revoke(name)

    def remove(self, name: str) -> Peer:
        with _blame():
            return self.store.remove(name)

    def rotate(self, name: str, *, public_key: str | PublicKey | None = None) -> Added:
        """A new key pair for the peer (generated unless `public_key`), and a new preshared
        key if it had one: the old key is refused at once."""
        private = None
        if public_key is None:
            private = PrivateKey.generate()
            key = private.public_key()
        else:
            key = self._key(public_key)
        old = self.get(name)
        psk = PresharedKey.generate() if old.preshared_key is not None else None
        with _blame():
            peer = self.store.update_peer(name, public_key=key, preshared_key=psk)
        return Added(peer, private, old)

    def reset_replay(self, name: str) -> Peer:
        """Clear the peer's replay mark; returns the peer as it was."""
        with _blame():
            return self.store.reset_handshake_mark(name)

    # -- client configs -----------------------------------------------------------------------

    def plan(self, options: ConfigOptions = ConfigOptions()) -> ConfigPlan:
        """Check the options, filling what is not given from the store's defaults."""
        return plan_config(
            options,
            self.store.get_defaults(),
            gateway_key=self.gateway_key,
            listen_port=self.listen_port,
        )

    @staticmethod
    def client_config(
        peer: Peer, plan: ConfigPlan, private_key: PrivateKey | None = None
    ) -> ClientConfig:
        """The peer's wg-quick config (its private key only if given: wgjit keeps none)."""
        return ClientConfig(
            addresses=peer.allowed_ips,
            private_key=private_key,
            gateway_key=plan.gateway_key,
            preshared_key=peer.preshared_key,
            endpoint=plan.endpoint,
            allowed_ips=plan.allowed_ips,
            dns=plan.dns,
            mtu=plan.mtu,
            persistent_keepalive=plan.persistent_keepalive,
        )

    def config(
        self, name: str, options: ConfigOptions = ConfigOptions()
    ) -> tuple[Peer, ClientConfig]:
        """A stored peer's client config, with a placeholder for its private key."""
        plan = self.plan(options)
        peer = self.get(name)
        return peer, self.client_config(peer, plan)

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _networks(
        allowed_ips: str | Sequence[str], allow_overlap: bool
    ) -> tuple[IPNetwork, ...] | None:
        """CIDRs, or None for "auto"."""
        text = allowed_ips if isinstance(allowed_ips, str) else ",".join(allowed_ips)
        if text.strip().lower() == "auto":
            if allow_overlap:
                raise InputError(
                    "allowed IPs `auto` takes a free address: drop allow-overlap",
                    field="allow_overlap",
                )
            return None
        with about("allowed_ips"):
            return parse_networks(text)

    @staticmethod
    def _key(public_key: str | PublicKey) -> PublicKey:
        if isinstance(public_key, PublicKey):
            return public_key
        with about("public_key"):
            return PublicKey.from_b64(public_key)

    @staticmethod
    def _future(at: float | None) -> None:
        if at is not None and at <= time.time():
            raise InputError(
                f"expiry {iso(at)} is not in the future; to refuse the peer now disable it",
                field="expires_at",
            )
