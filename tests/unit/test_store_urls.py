"""Store URLs: which backend, and every password form redacted."""

from __future__ import annotations

import pytest

from wgjit.store.urls import is_postgres, redact, scrub


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:secret@db:5432/wgjit", "postgresql://u:***@db:5432/wgjit"),
        ("postgresql://u:se#cret@db/wgjit", "postgresql://u:***@db/wgjit"),
        ("postgresql://u:se?cr/et@db/wgjit", "postgresql://u:***@db/wgjit"),
        ("postgresql://u:p%40ss@db/wgjit", "postgresql://u:***@db/wgjit"),
        ("postgresql://u:p@ss@db/wgjit", "postgresql://u:***@db/wgjit"),
        ("postgresql://u@db/wgjit", "postgresql://u@db/wgjit"),
        ("postgres:///wgjit?host=/run/pg&password=secret", "postgres:///wgjit?host=/run/pg&password=***"),
        ("postgres:///wgjit?password=se#c&host=/x", "postgres:///wgjit?password=***&host=/x"),
        ("postgresql:///wgjit?host=/run/pg", "postgresql:///wgjit?host=/run/pg"),
        ("host=/run/pg password=secret dbname=x", "host=/run/pg password=*** dbname=x"),
        ("host=/run/pg password = 'se cr\\'et' dbname=x", "host=/run/pg password = *** dbname=x"),
        ("mysql://u:pw@db/x", "mysql://u:***@db/x"),
        ("sqlite:///var/lib/wgjit/peers.db", "sqlite:///var/lib/wgjit/peers.db"),
    ],
)  # fmt: skip
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_scrub_masks_decoded_and_quoted_passwords() -> None:
    url = "postgresql://u:p%40ssw0rd@db/x"
    assert scrub('invalid token: "p%40ssw0rd" and p@ssw0rd', url) == 'invalid token: "***" and ***'
    assert scrub(f"cannot parse {url}", url) == "cannot parse postgresql://u:***@db/x"
    short = "postgresql://u:ab@db/x"
    assert scrub('bad "xaby" here', short) == 'bad "***" here'  # quoted: masked whatever length
    assert scrub("an abacus", short) == "an abacus"  # bare 2-letter words are left alone


@pytest.mark.parametrize(
    ("url", "pg"),
    [
        ("postgresql:///x", True),
        ("POSTGRES://h/x", True),
        ("host=/run/pg dbname=x", True),
        (" dbname = x", True),
        ("peers.db", False),
        ("sqlite:///x.db", False),
        ("colour=red.db", False),
    ],
)
def test_is_postgres(url: str, pg: bool) -> None:
    assert is_postgres(url) is pg
