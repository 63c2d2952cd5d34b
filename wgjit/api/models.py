"""The API's request and response bodies (pydantic), as /openapi.json documents them.

The peer's response model is made from the Peer dataclass itself, field by field, with the
JSON type `wgjit.service.peer_dict` gives each: a field added to Peer appears in the API and
its OpenAPI document without an edit here.
"""

from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from wgjit.keys import PublicKey
from wgjit.service import RENAMED_FIELDS, SECRET_FIELDS, is_time_field
from wgjit.store import MAX_PAGE, Peer

# a peer name (wgjit.store.validate_peer_name), and a part of one (cursor, prefix)
NAME_PATTERN = r"^[A-Za-z0-9._@-]{1,64}$"
NAME_PART_PATTERN = r"^[A-Za-z0-9._@-]{0,64}$"
# a WireGuard key in base64: 32 bytes, 43 characters and "=" (the last one carries 4 bits)
KEY_PATTERN = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"
# `limit` of GET /api/v1/peers: the most one page may hold
MAX_LIMIT = 1000
assert MAX_LIMIT < MAX_PAGE  # the service asks the store for one more

State = Literal["active", "disabled", "expired", "revoked"]
PeerName = Annotated[str, Field(pattern=NAME_PATTERN, examples=["laptop"])]
Cidr = Annotated[str, Field(min_length=1, max_length=64, examples=["100.65.0.2/32"])]


class ErrorBody(BaseModel):
    """Every error: one line saying what is wrong and how to fix it, and the request field it
    is about (a body, query or path field; null when it is about none)."""

    error: str
    field: str | None = None


def _json_type(name: str, hint: Any) -> Any:
    """The type of peer_dict's value for a Peer field with this type hint."""
    if name in SECRET_FIELDS:  # whether there is one
        return bool
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        inner = _json_type(name, rest[0]) if len(rest) == 1 else str
        return inner | None
    if name == "handshake_hwm" or hint in (PublicKey, str, bytes):
        return str
    if hint in (bool, int):
        return hint
    if hint is float:
        return str if is_time_field(name) else float
    if typing.get_origin(hint) in (tuple, list):
        return list[str]
    return str


def _peer_model() -> type[BaseModel]:
    hints = typing.get_type_hints(Peer)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(Peer):
        fields[RENAMED_FIELDS.get(f.name, f.name)] = (_json_type(f.name, hints[f.name]), ...)
        if f.name == "preshared_key":
            fields["state"] = (State, ...)
    model: type[BaseModel] = create_model(
        "Peer",
        __config__=ConfigDict(
            json_schema_extra={
                "description": "A peer. Times are ISO 8601 in UTC; preshared_key says whether"
                " it has one (the key itself is never shown); handshake_mark is the newest"
                " accepted initiation by the client's clock (anti-replay)."
            }
        ),
        **fields,
    )
    return model


PeerOut = _peer_model()


class PeerPage(BaseModel):
    items: list[PeerOut]  # type: ignore[valid-type]
    # the `cursor` of the next page; null: this is the last
    next_cursor: str | None


class PeerCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: PeerName
    allowed_ips: Annotated[list[Cidr], Field(max_length=64)] | Literal["auto"] = Field(
        "auto",
        description='"auto": the next free address of the store\'s pool; or a list of CIDRs',
    )
    public_key: Annotated[str, Field(pattern=KEY_PATTERN)] | None = Field(
        None, description="the peer's public key (base64); omit to have a key pair generated"
    )
    preshared_key: bool = Field(False, description="generate a preshared key")
    allow_overlap: bool = Field(
        False,
        description="accept allowed IPs that overlap another peer's, link-local ranges and"
        " default routes",
    )
    expires_at: datetime.datetime | None = Field(
        None, description="refuse the peer from then on (ISO 8601; no offset: UTC)"
    )


class PeerPatch(BaseModel):
    """Only the fields given change. `expires_at: null` removes the expiry."""

    model_config = ConfigDict(extra="forbid")

    name: PeerName | None = Field(None, description="a new name")
    allowed_ips: (
        Annotated[list[Cidr], Field(min_length=1, max_length=64)] | Literal["auto"] | None
    ) = None
    expires_at: datetime.datetime | None = None
    disabled: bool | None = None
    allow_overlap: bool = False


class PeerCreated(BaseModel):
    peer: PeerOut  # type: ignore[valid-type]
    # the wg-quick client config; with the private key when wgjit generated the pair (the only
    # copy: wgjit keeps none), else with a placeholder for it
    config: str
    # that config as a QR code (PNG, base64), when it has the private key (else null)
    config_png_base64: str | None


class Gateway(BaseModel):
    gateway_id: str
    heartbeat_at: str
    installed: int | None
    claimed: int
    rejects: dict[str, int]
