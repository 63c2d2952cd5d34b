"""Store URLs as text: which backend a URL names, and how to show it without its password.

Every message and log line that names a store goes through `redact()`; text that may quote
parts of a URL back (a libpq error) goes through `scrub()`. No I/O here.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote

# libpq connection keywords: a store given as `host=/run/pg dbname=wgjit password=...` (the
# keyword/value form) is PostgreSQL, never an SQLite file of that name
_LIBPQ_KEYWORDS: Final = frozenset({
    "host", "hostaddr", "port", "dbname", "user", "password", "passfile", "service", "sslmode",
    "sslcert", "sslkey", "sslrootcert", "application_name", "connect_timeout", "options",
    "target_session_attrs",
})  # fmt: skip
_KEYWORD_FORM = re.compile(r"\s*([A-Za-z_]+)\s*=")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(.*)", re.S)
# `password=VALUE` in a URL query (VALUE ends at `&`) or in the keyword form (VALUE quoted
# with '...' and backslash escapes, or up to white space)
_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)([^&]*)")
_KEYWORD_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)")
_QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'")
MASK: Final = "***"


def is_postgres(url: str) -> bool:
    """Whether `url` names a PostgreSQL store: a `postgresql://` / `postgres://` URI or the
    libpq keyword/value form (`host=... dbname=...`)."""
    text = url.strip()
    if text.lower().startswith(("postgres://", "postgresql://")):
        return True
    m = _KEYWORD_FORM.match(text)
    return m is not None and m.group(1).lower() in _LIBPQ_KEYWORDS


def _passwords(url: str) -> list[str]:
    """Every password the text carries, as written (percent-escaped or quoted)."""
    found: list[str] = []
    m = _SCHEME.match(url.strip())
    if m:
        rest = m.group(2)
        # userinfo runs to the LAST '@': a password may hold '#', '?', '/' or '@' unescaped,
        # and showing too little of a URL is better than showing a password
        at = rest.rfind("@")
        if at >= 0 and ":" in rest[:at]:
            found.append(rest[:at].split(":", 1)[1])
        found += [v for _, v in _QUERY_PASSWORD.findall(rest)]
    else:
        found += [v for _, v in _KEYWORD_PASSWORD.findall(url)]
    return [p for p in found if p]


def redact(url: str) -> str:
    """`url` with every password replaced by `***`: `user:PASSWORD@`, `?password=PASSWORD`
    and the keyword form's `password=PASSWORD` / `password='PASS WORD'`."""
    m = _SCHEME.match(url.strip())
    if not m:
        return _KEYWORD_PASSWORD.sub(lambda k: k.group(1) + MASK, url)
    scheme, rest = m.groups()
    at = rest.rfind("@")
    if at >= 0 and ":" in rest[:at]:
        user = rest[:at].split(":", 1)[0]
        rest = f"{user}:{MASK}{rest[at:]}"
    rest = _QUERY_PASSWORD.sub(lambda q: q.group(1) + MASK, rest)
    return scheme + rest


def scrub(text: str, url: str) -> str:
    """`text` (an error message that may quote the URL or parts of it) with the URL shown
    redacted and every password of `url`, as written or percent-decoded, masked."""
    if not url:
        return text
    stripped = url.strip()
    if stripped and stripped in text:
        text = text.replace(stripped, redact(stripped))
    secrets: set[str] = set()
    for p in _passwords(url):
        secrets.add(p)
        secrets.add(unquote(p))
        if p.startswith("'"):
            secrets.add(p.strip("'").replace("\\'", "'").replace("\\\\", "\\"))
    secrets.discard("")
    # a quoted token that holds a password is masked whole, whatever the password's length;
    # bare occurrences only when long enough not to mask ordinary words
    text = _QUOTED.sub(
        lambda q: (
            q.group(0)[0] + MASK + q.group(0)[0]
            if any(s in q.group(0) for s in secrets)
            else q.group(0)
        ),
        text,
    )
    for s in sorted(secrets, key=len, reverse=True):
        if len(s) >= 4:
            text = text.replace(s, MASK)
    return text
