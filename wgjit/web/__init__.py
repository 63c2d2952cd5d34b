"""The web page served by `wgjit serve` at `/` (helper "web" fills this in).

`wgjit.api.app.create_app` calls `mount(app, service, token)` once, after the /api routes are
registered: add the page's routes to `app` (a FastAPI app), call the service layer
(`wgjit.service.PeerService`) for data, and check sign-ins against `token` (the bearer token
of the API; compare with `hmac.compare_digest`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from wgjit.service import PeerService


def mount(app: FastAPI, service: PeerService, token: str) -> None:
    """Add the web page's routes to `app`. A stub until the web page exists."""
