"""The one base class of wgjit's expected failures.

Every error a user can cause or fix (a bad value, a missing store, an unknown peer, a device
that is not there) is a `WgjitError` whose message is one line saying what is wrong and what
to do. Entry points turn it into that line: the CLI prints `wgjit: error: MESSAGE` and exits 1,
the HTTP API answers 4xx (or 503 for a store it cannot reach) with `{"error": MESSAGE,
"field": FIELD}`. Anything else is a bug and may show a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class WgjitError(Exception):
    """An expected failure; `str(e)` is the one line to show. `field` names the input it is
    about (an API request's field: `name`, `allowed_ips`, ...), where there is one."""

    field: str | None = None

    def __init__(self, *args: object, field: str | None = None) -> None:
        super().__init__(*args)
        if field is not None:
            self.field = field


class InputError(WgjitError):
    """A value given to the service layer is invalid; the message names it and the fix."""


class NotFound(WgjitError):
    """What was asked for does not exist (the API's 404)."""


class Conflict(WgjitError):
    """Refused by what exists, not by the value given (the API's 409)."""


@contextlib.contextmanager
def about(field: str) -> Iterator[None]:
    """Blame `field` for a WgjitError raised inside that names no field yet."""
    try:
        yield
    except WgjitError as e:
        if e.field is None:
            e.field = field
        raise
