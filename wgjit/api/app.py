"""The admin HTTP API of `wgjit serve`: FastAPI over the service layer (wgjit.service).

Every /api route needs `Authorization: Bearer TOKEN` (compared in constant time). Endpoints are
plain functions: FastAPI runs them in its thread pool, where the synchronous store is called
(both stores are thread-safe). Every failure is JSON `{"error": ..., "field": ...}`: a
WgjitError by its kind (404 unknown peer, 409 conflict, 400 bad value, 503 store unreachable),
a request that does not fit the schema 422 naming the field; anything else 500 without a
traceback (the traceback goes to the server's log).
"""

import base64
import datetime
import hmac
import logging
import math
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

import wgjit.web
from wgjit import __version__
from wgjit.api.models import (
    MAX_LIMIT,
    NAME_PART_PATTERN,
    NAME_PATTERN,
    ErrorBody,
    Gateway,
    PeerCreate,
    PeerCreated,
    PeerOut,
    PeerPage,
    PeerPatch,
    State,
)
from wgjit.errors import Conflict, InputError, NotFound, WgjitError
from wgjit.service import Added, PeerService, iso, peer_dict, render_qr_png
from wgjit.store import KEEP, DuplicatePeer, Keep, PeerRefused, StoreError, UnknownPeer
from wgjit.store.pool import PoolError
from wgjit.store.urls import scrub

log = logging.getLogger("wgjit.api")

API_PREFIX = "/api/v1"
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what}
    for code, what in (
        (400, "a value is invalid (the field and the fix are named)"),
        (401, "no or a wrong bearer token"),
        (404, "no such peer"),
        (409, "refused by the store's state (a duplicate name or key, an overlap, no pool)"),
        (413, "the request body is too large"),
        (422, "the request does not fit the schema (the field is named)"),
        (503, "the store cannot be reached"),
    )
}


def status_of(e: WgjitError) -> int:
    """The HTTP status of an expected failure."""
    if isinstance(e, UnknownPeer | NotFound):
        return 404
    if isinstance(e, Conflict | DuplicatePeer | PeerRefused | PoolError):
        return 409
    if isinstance(e, InputError | ValueError):
        return 400
    if isinstance(e, StoreError) and type(e) is StoreError:
        return 503  # unreachable, busy, timed out: the store's one-line reason says which
    return 400


def _error(status: int, message: str, field: str | None, **headers: str) -> JSONResponse:
    body = ErrorBody(error=" ".join(message.split()), field=field)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers or None)


def _validation_field(loc: tuple[Any, ...]) -> str | None:
    """The field a validation error is about: the first name after body/query/path."""
    names = [str(part) for part in loc[1:] if isinstance(part, str)]
    if names:
        return names[0]
    return str(loc[0]) if loc else None


def create_app(
    service: PeerService, token: str, *, store_url: str = "", title: str = "wgjit"
) -> FastAPI:
    """The app: /api/v1 (bearer `token`), /openapi.json, and the web page at / (wgjit.web).
    `store_url`: no error message shows its password, whatever quoted it (as the CLI's)."""
    if not token:
        raise ValueError("the API token is empty")
    app = FastAPI(
        title=f"{title} admin API",
        version=__version__,
        description="Peers of a wgjit store: list (keyset pages), add, change, disable,"
        " revoke, remove; client configs; gateways' presence. Every /api route needs"
        " `Authorization: Bearer TOKEN`.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    expected = token.encode()
    bearer = HTTPBearer(auto_error=False, description="the token of `wgjit serve --token-file`")

    def authorized(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, expected):
            raise _Unauthorized

    @app.exception_handler(_Unauthorized)
    def unauthorized(request: Request, e: Exception) -> JSONResponse:
        return _unauthorized()

    # checked again before FastAPI reads a request's body: no one without the token makes
    # the server read or parse one (the dependency above is what OpenAPI documents)
    app.add_middleware(_Guard, expected=expected)

    @app.exception_handler(WgjitError)
    def wgjit_error(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, WgjitError)
        return _error(status_of(e), scrub(str(e), store_url), e.field)

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, RequestValidationError)
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = _validation_field(tuple(first.get("loc", ())))
        what = f"{field}: " if field else ""
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return _error(422, f"{what}{first.get('msg', 'invalid')}{more}", field)

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, StarletteHTTPException)
        headers = dict(e.headers or {})
        if e.status_code == 405:  # every method of the path, not only the first route's
            headers["Allow"] = ", ".join(_methods_of(app, request.scope))
        return _error(e.status_code, str(e.detail), None, **headers)

    @app.exception_handler(Exception)
    def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal error; the server's log has the details", None)

    api = APIRouter(
        prefix=API_PREFIX,
        dependencies=[Depends(authorized), Depends(_known_query)],
        responses=_ERRORS,
    )
    _routes(api, service)
    app.include_router(api)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    wgjit.web.mount(app, service, token)
    return app


class _Unauthorized(Exception):
    pass


# the largest request body the API takes (a peer with 64 allowed IPs is about 5 KiB)
MAX_BODY = 64 * 1024


def _unauthorized() -> JSONResponse:
    return _error(
        401,
        "missing or wrong bearer token: send `Authorization: Bearer TOKEN` with the token"
        " of `wgjit serve --token-file`",
        "authorization",
        **{"WWW-Authenticate": "Bearer"},
    )


class _Guard:
    """ASGI middleware in front of /api: the bearer token (constant-time), and a body size
    limit, both before anything reads the body."""

    def __init__(self, app: ASGIApp, expected: bytes) -> None:
        self.app = app
        self.expected = expected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == API_PREFIX or path.startswith(API_PREFIX + "/")):
            headers = dict(scope["headers"])
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if not (
                scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.expected)
            ):
                await _unauthorized()(scope, receive, send)
                return
            length = headers.get(b"content-length", b"0")
            if not length.isdigit() or int(length) > MAX_BODY:
                await _error(413, f"the request body is over {MAX_BODY} bytes", "body")(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


def _known_query(request: Request) -> None:
    """A query parameter the route does not take is an error (a misspelt `limit` must not
    silently give the default), and so is one given twice."""
    route = request.scope.get("route")
    known: set[str] = set()
    stack = [route.dependant] if route is not None else []
    while stack:
        dependant = stack.pop()
        known |= {p.alias for p in dependant.query_params}
        stack += dependant.dependencies
    for key in request.query_params:
        if key not in known:
            takes = f"; it takes {', '.join(sorted(known))}" if known else ""
            raise InputError(f"unknown query parameter {key!r}{takes}", field=key)
        if len(request.query_params.getlist(key)) > 1:  # which one would count?
            raise InputError(f"query parameter {key!r} is given more than once", field=key)


def _methods_of(app: FastAPI, scope: Any) -> list[str]:
    """The methods some route of this path takes (for a 405's Allow header)."""
    methods: set[str] = set()
    for route in app.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with every error response as what it is, JSON (FastAPI gives an
    operation's errors the media type of its success: text/plain for /config)."""
    if app.openapi_schema is None:
        doc = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        for operation in (op for ops in doc["paths"].values() for op in ops.values()):
            for code, response in operation.get("responses", {}).items():
                content = response.get("content")
                if code.startswith(("4", "5")) and content and "application/json" not in content:
                    response["content"] = {"application/json": next(iter(content.values()))}
        app.openapi_schema = doc
    return app.openapi_schema


NamePath = Annotated[str, Path(pattern=NAME_PATTERN, description="the peer's name")]


def _timestamp(dt: datetime.datetime | None, field: str = "expires_at") -> float | None:
    """An aware or naive (UTC) datetime as unix seconds; InputError if out of range."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    try:
        at = dt.timestamp()
    except (OverflowError, ValueError, OSError):
        at = math.nan
    if not math.isfinite(at) or not 0 < at < 2**41:
        raise InputError(f"{field} {dt.isoformat()} is out of range", field=field)
    return at


def _created(service: PeerService, added: Added) -> dict[str, Any]:
    conf = service.client_config(added.peer, service.plan(), added.private_key)
    text = conf.render()
    png = None
    if added.private_key is not None:
        png = base64.b64encode(render_qr_png(text)).decode()
    return {"peer": peer_dict(added.peer), "config": text, "config_png_base64": png}


def _routes(api: APIRouter, service: PeerService) -> None:
    @api.get("/peers", response_model=PeerPage, summary="list peers, a page at a time")
    def list_peers(
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="peers per page")] = 100,
        cursor: Annotated[
            str | None,
            Query(
                pattern=NAME_PART_PATTERN,
                description="the `next_cursor` of the previous page (omit for the first)",
            ),
        ] = None,
        prefix: Annotated[
            str | None, Query(pattern=NAME_PART_PATTERN, description="names starting with it")
        ] = None,
        state: Annotated[State | None, Query(description="only peers in this state")] = None,
    ) -> dict[str, Any]:
        page = service.list_page(cursor=cursor, limit=limit, prefix=prefix, state=state)
        return {"items": [peer_dict(p) for p in page.items], "next_cursor": page.next_cursor}

    @api.post(
        "/peers",
        response_model=PeerCreated,
        status_code=201,
        summary="add a peer (a key pair is generated unless public_key is given)",
    )
    def add_peer(body: PeerCreate) -> dict[str, Any]:
        added = service.add(
            body.name,
            allowed_ips=body.allowed_ips,
            public_key=body.public_key,
            preshared_key=body.preshared_key,
            allow_overlap=body.allow_overlap,
            expires_at=_timestamp(body.expires_at),
        )
        return _created(service, added)

    @api.get("/peers/{name}", response_model=PeerOut, summary="one peer")
    def get_peer(name: NamePath) -> dict[str, Any]:
        return peer_dict(service.get(name))

    @api.patch(
        "/peers/{name}",
        response_model=PeerOut,
        summary="change a peer's name, allowed IPs, expiry or disabled",
    )
    def patch_peer(name: NamePath, body: PeerPatch) -> dict[str, Any]:
        given = body.model_fields_set
        expires: float | Keep | None = KEEP
        if "expires_at" in given:
            expires = _timestamp(body.expires_at)
        return peer_dict(
            service.update(
                name,
                allowed_ips=body.allowed_ips,
                new_name=body.name,
                expires_at=expires,
                disabled=body.disabled,
                allow_overlap=body.allow_overlap,
            )
        )

    @api.delete("/peers/{name}", response_model=PeerOut, summary="remove a peer (returns it)")
    def remove_peer(name: NamePath) -> dict[str, Any]:
        return peer_dict(service.remove(name))

    @api.post("/peers/{name}/disable", response_model=PeerOut, summary="refuse until enabled")
    def disable_peer(name: NamePath) -> dict[str, Any]:
        return peer_dict(service.disable(name))

    @api.post("/peers/{name}/enable", response_model=PeerOut, summary="undo disable")
    def enable_peer(name: NamePath) -> dict[str, Any]:
        return peer_dict(service.enable(name))

    @api.post("/peers/{name}/revoke", response_model=PeerOut, summary="refuse for good")
    def revoke_peer(name: NamePath) -> dict[str, Any]:
        return peer_dict(service.revoke(name))

    @api.post(
        "/peers/{name}/rotate",
        response_model=PeerCreated,
        summary="a new key pair (and preshared key, if it had one); the old key is refused",
    )
    def rotate_peer(name: NamePath) -> dict[str, Any]:
        return _created(service, service.rotate(name))

    @api.get(
        "/peers/{name}/config",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {}}, "description": "wg-quick config"}},
        summary="the peer's client config, with a placeholder for its private key",
    )
    def peer_config(name: NamePath) -> PlainTextResponse:
        _, conf = service.config(name)
        return PlainTextResponse(conf.render())

    @api.get(
        "/peers/{name}/config.png",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "never: see 409"},
        },
        summary="refused: a QR code needs the private key, which wgjit does not keep",
        description="The QR code of a client config is returned, once, by the calls that"
        " generate a key pair (POST /peers without public_key, POST /peers/{name}/rotate) as"
        " config_png_base64. A QR code without the private key cannot be used as scanned.",
    )
    def peer_config_png(name: NamePath) -> Response:
        service.get(name)  # an unknown peer is a 404
        raise Conflict(
            f"peer {name!r}: a QR code needs the peer's private key, which wgjit does not keep:"
            f" POST {API_PREFIX}/peers/{name}/rotate makes a new key pair and returns its"
            " config and QR code (config_png_base64)",
            field="name",
        )

    @api.get("/gateways", response_model=list[Gateway], summary="gateways and their peers")
    def gateways() -> list[dict[str, Any]]:
        return [
            {
                "gateway_id": g.gateway_id,
                "heartbeat_at": iso(g.heartbeat_at),
                "installed": g.installed,
                "claimed": g.claimed,
                "rejects": dict(g.rejects),
            }
            for g in service.gateways()
        ]
