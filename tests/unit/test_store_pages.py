"""Store.list_page on both backends: keyset pages in code point order, a name prefix, a state
filter, and the plan each uses (an index range, never a scan of every peer)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgjit.keys import PrivateKey
from wgjit.store import MAX_PAGE, PEER_STATES, Peer, Store, open_store, prefix_bound


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = f"sqlite://{tmp_path}/peers.db"
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    with open_store(url) as s:
        yield s


def add(store: Store, name: str, i: int, **kw: object) -> Peer:
    net = ipaddress.ip_network(f"10.{i // 250}.{i % 250}.1/32")
    return store.add_peer(name, PrivateKey.generate().public_key(), (net,), **kw)  # type: ignore[arg-type]


def all_pages(store: Store, limit: int, **kw: object) -> list[list[str]]:
    pages, after = [], ""
    while True:
        page = [p.name for p in store.list_page(after=after, limit=limit, **kw)]  # type: ignore[arg-type]
        if not page:
            return pages
        pages.append(page)
        after = page[-1]


def test_pages_walk_every_peer_once_in_code_point_order(store: Store) -> None:
    # mixed case and punctuation: a linguistic collation would interleave these differently
    names = ["b", "B", "a-c", "ab", "a-b", "a", "Z9", "z", "_x", "@home", "a.b", "0"]
    for i, n in enumerate(names):
        add(store, n, i)
    pages = all_pages(store, 5)
    assert [len(p) for p in pages] == [5, 5, 2]
    assert [n for p in pages for n in p] == sorted(names)  # Python sorts by code point
    assert [p.name for p in store.list_page(limit=MAX_PAGE)] == sorted(names)


def test_prefix_is_exactly_the_names_that_start_with_it(store: Store) -> None:
    names = ["a", "a-b", "a-c", "ab", "a.b", "b", "aa", "a-", "A-b"]
    for i, n in enumerate(names):
        add(store, n, i)
    assert [n for p in all_pages(store, 2, prefix="a-") for n in p] == ["a-", "a-b", "a-c"]
    assert [p.name for p in store.list_page(prefix="a")] == sorted(
        n for n in names if n.startswith("a")
    )
    assert store.list_page(prefix="zz") == []
    # the cursor and the prefix together: the rest of the prefix's names after the cursor
    assert [p.name for p in store.list_page(after="a-b", prefix="a-")] == ["a-c"]
    assert [p.name for p in store.list_page(after="0", prefix="a-")] == ["a-", "a-b", "a-c"]


def test_state_filter_agrees_with_peer_state(store: Store) -> None:
    now = time.time()
    add(store, "act", 1)
    add(store, "act-future", 2, expires_at=now + 3600)
    add(store, "exp", 3, expires_at=now + 3600)
    add(store, "dis", 4)
    add(store, "rev", 5)
    add(store, "rev-dis", 6)
    add(store, "dis-exp", 7, expires_at=now + 3600)
    store.update_peer("dis", disabled=True)
    store.update_peer("dis-exp", disabled=True)
    store.revoke("rev")
    store.update_peer("rev-dis", disabled=True)
    store.revoke("rev-dis")
    later = now + 7200  # "exp", "act-future" and "dis-exp" have expired by then
    expect = {
        None: {"act": "active", "act-future": "active", "exp": "active"},
        later: {"act": "active", "act-future": "expired", "exp": "expired"},
    }
    for at, timed in expect.items():
        by_state = {s: [p.name for p in store.list_page(state=s, now=at)] for s in PEER_STATES}
        want = {s: sorted(n for n, st in timed.items() if st == s) for s in PEER_STATES}
        want["disabled"] = ["dis", "dis-exp"]
        want["revoked"] = ["rev", "rev-dis"]
        assert by_state == want, at
    # every peer's state is the one list_page files it under (now)
    for p in store.list_page():
        assert p.name in [q.name for q in store.list_page(state=p.state)]
    # filters combine: a prefix, a state and a cursor
    assert [p.name for p in store.list_page(prefix="rev", state="revoked", after="rev")] == [
        "rev-dis"
    ]


def test_bad_limit_or_state_is_a_value_error(store: Store) -> None:
    for bad in (0, -1, MAX_PAGE + 1):
        with pytest.raises(ValueError, match="limit"):
            store.list_page(limit=bad)
    with pytest.raises(ValueError, match="state"):
        store.list_page(state="gone")


def test_prefix_bound() -> None:
    assert prefix_bound("ab") == "ac"
    assert prefix_bound("a\U0010ffff") == "b"
    assert prefix_bound("\U0010ffff") is None
    assert prefix_bound("") is None


def test_sqlite_pages_are_index_ranges(tmp_path: Path) -> None:
    """The plan of every kind of page seeks an index (no full scan, no sort of all rows)."""
    import sqlite3

    from wgjit.store.sqlite import _COLUMNS, _page_where

    with open_store(f"sqlite://{tmp_path}/peers.db"):
        pass
    conn = sqlite3.connect(tmp_path / "peers.db")
    for state in (None, *PEER_STATES):
        for prefix in ("", "ab"):
            where, params = _page_where("x", 100, prefix, state, None)
            plan = " ".join(
                str(r[-1])
                for r in conn.execute(
                    f"EXPLAIN QUERY PLAN SELECT {_COLUMNS} FROM peers WHERE {where}"
                    " ORDER BY name LIMIT :limit",
                    params,
                )
            )
            assert "USING INDEX" in plan and "TEMP B-TREE" not in plan, (state, prefix, plan)
            if state in ("revoked", "disabled", "expired"):
                assert f"peers_{'expiring' if state == 'expired' else state}_by_name" in plan
    conn.close()


def test_postgres_pages_are_index_ranges(pg_url: str) -> None:
    """Each kind of page can walk an index in name order (no Sort of all rows): the "C"
    collation's name index, or the state's partial index (its predicate is implied)."""
    import psycopg

    from wgjit.store import postgres

    with open_store(pg_url):
        pass
    with psycopg.connect(pg_url) as conn:
        # an empty table would be scanned and sorted anyway: ask whether an ordered index walk
        # is possible at all (the 1 M peer plans: benchmarks/pages.py)
        for setting in ("enable_seqscan", "enable_sort", "enable_bitmapscan"):
            conn.execute(f"SET {setting} = off")
        for state in (None, *PEER_STATES):
            for prefix in ("", "ab"):
                sql, params = postgres._page_sql("x", 100, prefix, state, None)
                plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {sql}", params))
                assert "Sort" not in plan and "Index" in plan, (state, prefix, plan)
                if state in ("revoked", "disabled", "expired"):
                    index = f"peers_{'expiring' if state == 'expired' else state}_by_name"
                    assert index in plan, (state, prefix, plan)
