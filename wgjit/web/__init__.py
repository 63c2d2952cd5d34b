"""The web page served by `wgjit serve` at `/`: sign in with the admin token, peers with search
and pagination, add a peer (its config and QR code, once), disable/enable/revoke, and a live
view of the gateways and the peers installed on them.

Server-rendered HTML (Jinja2, autoescaping) plus one small script (`static/web.js`: the live
view's refresh and a confirmation before a revoke); everything, CSS and script included, is
served from this package: no build step, nothing loaded from elsewhere (the Content-Security-
Policy allows only this origin, and `data:` images for the QR code).

`wgjit.api.app.create_app` calls `mount(app, service, token)`; the page calls the service
layer directly (the API's JSON is for programs). Sign-in, cookie and CSRF: see session.py.
Routes: `/` (peers), everything else under `/ui/` (none in the OpenAPI document).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from wgjit.store import PEER_STATES
from wgjit.web import data
from wgjit.web.render import PEER_STATUS_COLUMNS, environment, title
from wgjit.web.session import SESSION_COOKIE, SESSION_TTL_S, Sessions

if TYPE_CHECKING:
    from fastapi import FastAPI

    from wgjit.service import PeerService

# peers on one page of the list (`?limit=` up to MAX_PAGE_SIZE); the live view's refresh
# period (seconds)
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
LIVE_INTERVAL_S = 2
# peers in the live view's "busiest" table
BUSIEST = 10
# column titles of the live view's gateways table (other fields: their name, capitalised)
GATEWAY_TITLES = {
    "gateway_id": "Gateway",
    "heartbeat_at": "Last heartbeat",
    "installed": "Peers installed",
    "claimed": "Claimed in the store",
    "rejects": "Knocks rejected, by reason",
}
# a form post is a few fields; anything bigger is refused unread
MAX_FORM_BYTES = 16 * 1024

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    # not no-referrer: with it Chromium sends `Origin: null` on the page's own form posts
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    # pages show peers (and once a private key): never kept by a cache
    "Cache-Control": "no-store",
}


class FormError(Exception):
    """A request the page refuses (bad CSRF token, foreign origin, oversized form)."""


def mount(app: FastAPI, service: PeerService, token: str) -> None:
    """Add the web page's routes to `app`."""
    Page(service, token).mount(app)


class Page:
    def __init__(self, service: PeerService, token: str) -> None:
        self.data = data.Data(service)
        self.sessions = Sessions(token)
        self.env = environment()

    # -- plumbing ------------------------------------------------------------------------------

    def mount(self, app: FastAPI) -> None:
        app.mount(
            "/ui/static",
            StaticFiles(packages=[("wgjit.web", "static")]),
            name="wgjit-web-static",
        )
        routes: list[tuple[str, str, Callable[[Request], Awaitable[Response]]]] = [
            ("/", "GET", self.index),
            ("/ui/login", "GET", self.login_form),
            ("/ui/login", "POST", self.login),
            ("/ui/logout", "POST", self.logout),
            ("/ui/live", "GET", self.live),
            ("/ui/peers", "POST", self.add),
            ("/ui/peers/{name}", "GET", self.peer),
            ("/ui/peers/{name}/{action}", "POST", self.action),
        ]
        for path, method, endpoint in routes:
            app.add_api_route(path, endpoint, methods=[method], include_in_schema=False)

    def _html(self, template: str, request: Request, status: int = 200, **ctx: Any) -> Response:
        session = self._session(request)
        ctx.setdefault("csrf", self.sessions.csrf(session) if session else "")
        ctx.setdefault("message", None)
        ctx.setdefault("message_kind", None)
        body = self.env.get_template(template).render(**ctx)
        return HTMLResponse(body, status_code=status, headers=_HEADERS)

    def _session(self, request: Request) -> str | None:
        value = request.cookies.get(SESSION_COOKIE)
        return value if value and self.sessions.valid(value) else None

    def _to_login(self, request: Request) -> Response:
        return RedirectResponse("/ui/login", status_code=303, headers=_HEADERS)

    @staticmethod
    def _same_origin(request: Request) -> bool:
        """A POST's Origin header, when the browser sends one, must be this server's."""
        origin = request.headers.get("origin")
        if origin is None:
            return True
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        return origin == own

    async def _form(self, request: Request, *, csrf: bool = True) -> dict[str, str]:
        if not self._same_origin(request):
            raise FormError("This form was sent from another site.")
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_FORM_BYTES):
            raise FormError("The form is too large.")
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise FormError("The form is too large.")
        fields = {
            k: v[0] for k, v in urllib.parse.parse_qs(body.decode("utf-8", "replace")).items()
        }
        if csrf:
            session = self._session(request)
            if session is None or not self.sessions.check_csrf(session, fields.get("csrf", "")):
                raise FormError(
                    "The form has expired or was not sent by this page: reload the page and"
                    " try again."
                )
        return fields

    def _refused(self, request: Request, why: FormError) -> Response:
        return self._html("base.html", request, status=403, message=str(why), message_kind="error")

    # -- sign in -------------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        if self._session(request):
            return RedirectResponse("/", 303, headers=_HEADERS)
        return self._html("login.html", request, csrf="")

    async def login(self, request: Request) -> Response:
        try:
            fields = await self._form(request, csrf=False)
        except FormError as e:
            return self._refused(request, e)
        if not self.sessions.check_token(fields.get("token", "")):
            return self._html(
                "login.html", request, status=401, csrf="",
                message="That is not the token of this server (its --token-file).",
                message_kind="error",
            )  # fmt: skip
        response = RedirectResponse("/", status_code=303, headers=_HEADERS)
        response.set_cookie(
            SESSION_COOKIE,
            self.sessions.issue(),
            max_age=SESSION_TTL_S,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(self, request: Request) -> Response:
        try:
            await self._form(request)
        except FormError as e:
            return self._refused(request, e)
        session = self._session(request)
        if session:
            self.sessions.end(session)
        response = self._to_login(request)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # -- pages ---------------------------------------------------------------------------------

    def _live_context(self) -> dict[str, Any]:
        gateways = self.data.gateways()
        columns: list[str] = []
        for g in gateways:
            columns.extend(k for k in g if k not in columns)
        busiest = self.data.busiest(limit=BUSIEST)
        present = {k for p in busiest for k in p}
        return {
            "gateways": gateways,
            "gateway_columns": [(c, GATEWAY_TITLES.get(c) or title(c)) for c in columns],
            "busiest": busiest,
            "busiest_columns": [
                (c, t) for c, t in PEER_STATUS_COLUMNS if c in present and c != "expires_at"
            ],
            "live_interval": LIVE_INTERVAL_S,
            "now_text": data.now_text(),
        }

    async def index(self, request: Request) -> Response:
        if not self._session(request):
            return self._to_login(request)
        q = request.query_params
        query = {
            "prefix": q.get("prefix", "").strip(),
            "state": q.get("state", "").strip(),
            "cursor": q.get("cursor", "").strip(),
            "limit": q.get("limit", "").strip(),
        }
        limit = int(query["limit"]) if query["limit"].isdigit() else PAGE_SIZE
        limit = min(max(limit, 1), MAX_PAGE_SIZE)
        message, kind = _done_message(q), "ok"
        try:
            peers, next_cursor = await run_in_threadpool(
                self.data.page, query["prefix"], query["state"], query["cursor"], limit
            )
        except data.Refused as e:
            peers, next_cursor, message, kind = [], None, str(e), "error"
        live = await run_in_threadpool(self._live_context)
        present = {k for p in peers for k in p}

        def page_query(cursor: str | None) -> str:
            args = {k: v for k, v in query.items() if v and k != "cursor"}
            if cursor:
                args["cursor"] = cursor
            return urllib.parse.urlencode(args)

        return self._html(
            "index.html", request,
            peers=peers, next_cursor=next_cursor, query=query, states=PEER_STATES,
            status_columns=[(c, t) for c, t in PEER_STATUS_COLUMNS if c in present],
            page_query=page_query, back=_here(request), message=message, message_kind=kind,
            **live,
        )  # fmt: skip

    async def live(self, request: Request) -> Response:
        if not self._session(request):
            return Response("signed out", status_code=401, headers=_HEADERS)
        live = await run_in_threadpool(self._live_context)
        return self._html("_live.html", request, **live)

    async def peer(self, request: Request) -> Response:
        if not self._session(request):
            return self._to_login(request)
        name = request.path_params["name"]
        try:
            peer, config = await run_in_threadpool(self.data.peer_and_config, name)
        except data.Refused as e:
            return self._html("base.html", request, 404, message=str(e), message_kind="error")
        return self._html(
            "peer.html", request,
            peer=peer, fields=data.fields(peer), config=config.text, notes=config.notes,
            private=False, qr=None, qr_size=0, back=_here(request),
            message=_done_message(request.query_params),
        )  # fmt: skip

    # -- changes -------------------------------------------------------------------------------

    async def add(self, request: Request) -> Response:
        try:
            fields = await self._form(request)
        except FormError as e:
            return self._refused(request, e)
        try:
            peer, config, private = await run_in_threadpool(
                self.data.add,
                fields.get("name", "").strip(),
                fields.get("allowed_ips", "").strip(),
                fields.get("public_key", "").strip(),
                fields.get("preshared_key") == "1",
            )
        except data.Refused as e:
            return self._html(
                "base.html", request, 400, message=f"Not added: {e}", message_kind="error"
            )
        # a QR code only of a config a phone can use as scanned: one with its private key
        qr, size = data.qr_data_uri(config.text) if private else (None, 0)
        return self._html(
            "peer.html", request,
            peer=peer, fields=data.fields(peer), config=config.text, notes=config.notes,
            private=private, qr=qr, qr_size=size, back=_peer_path(peer["name"]),
            message=f"Added peer {peer['name']}.",
        )  # fmt: skip

    async def action(self, request: Request) -> Response:
        try:
            fields = await self._form(request)
        except FormError as e:
            return self._refused(request, e)
        name = request.path_params["name"]
        action = request.path_params["action"]
        back = safe_back(fields.get("next", ""))
        try:
            await run_in_threadpool(self.data.act, name, action)
        except data.Refused as e:
            return self._html(
                "base.html", request, 400, message=f"Not changed: {e}", message_kind="error"
            )
        sep = "&" if "?" in back else "?"
        back += sep + urllib.parse.urlencode({"done": action, "peer": name})
        return RedirectResponse(back, status_code=303, headers=_HEADERS)


# a path on this site, with its query: no scheme, no host, no whitespace or control characters
# (browsers drop tabs and newlines from URLs, so "/\t/evil.example" would be "//evil.example")
_LOCAL_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*")


def safe_back(target: str) -> str:
    """Where a form returns to: its `next` field if that is a path on this site, else `/`
    (never a redirect to another site)."""
    return target if _LOCAL_PATH.fullmatch(target) and "//" not in target[:2] else "/"


def _here(request: Request) -> str:
    """This page's path and query, less the message of the last change (done, peer)."""
    args = [(k, v) for k, v in request.query_params.multi_items() if k not in ("done", "peer")]
    query = urllib.parse.urlencode(args)
    return request.url.path + (f"?{query}" if query else "")


def _peer_path(name: str) -> str:
    return f"/ui/peers/{urllib.parse.quote(name, safe='')}"


def _done_message(q: Any) -> str | None:
    """After a change, the page it returns to says what was done (from a fixed list)."""
    done = data.ACTIONS.get(q.get("done", ""))
    peer = q.get("peer")
    return f"Peer {peer} {done}." if done and peer else None
