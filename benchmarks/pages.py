"""Keyset pages of `GET /api/v1/peers` (Store.list_page) on a store with many peers: the first
page, a page deep inside, a name prefix, and each state filter, where the state is rare.

    .venv/bin/python benchmarks/pages.py [--peers 1000000] [--limit 100] [--rounds 20]
                                         [--store sqlite|postgresql]

The peers are written straight into the `peers` table in one transaction (names p0000000..,
one in 10 000 revoked, one in 10 000 disabled, one in 1 000 with an expiry of which half are
past), then each kind of page is read `--rounds` times; medians and maxima are reported.
PostgreSQL: a throwaway server (tests/pgserver.py), removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wgjit.store import Store, open_store


def rows(n: int, now: float) -> list[tuple[object, ...]]:
    out = []
    for i in range(n):
        key = i.to_bytes(4, "big") + os.urandom(28)
        ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}/32"
        expires = None
        if i % 1000 == 7:
            expires = now - 3600 if i % 2000 == 7 else now + 86400
        revoked, disabled = i % 10000 == 3, i % 10000 == 5
        out.append((f"p{i:07d}", key, ip, revoked, disabled, expires, now, now))
    return out


def fill_sqlite(path: Path, n: int) -> str:
    import sqlite3

    url = f"sqlite://{path}"
    open_store(url).close()
    conn = sqlite3.connect(path)
    conn.executemany(
        "INSERT INTO peers (name, public_key, allowed_ips, revoked, disabled, expires_at,"
        " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows(n, time.time()),
    )
    conn.commit()
    conn.execute("ANALYZE")
    conn.close()
    return url


def fill_postgres(url: str, n: int) -> None:
    import psycopg

    open_store(url).close()
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY peers (name, public_key, allowed_ips, revoked, disabled, expires_at,"
            " created_at, updated_at) FROM STDIN"
        ) as copy:
            for r in rows(n, time.time()):
                copy.write_row(r)
        conn.commit()
        conn.autocommit = True
        cur.execute("ANALYZE peers")


def measure(name: str, call: Callable[[], object], rounds: int) -> None:
    call()  # warm
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1000)
    print(f"{name:<34} median {statistics.median(times):7.2f} ms   max {max(times):7.2f} ms")


def run(store: Store, n: int, limit: int, rounds: int) -> None:
    deep = f"p{n // 2:07d}"
    measure("first page", lambda: store.list_page(limit=limit), rounds)
    measure("a page in the middle", lambda: store.list_page(after=deep, limit=limit), rounds)
    measure("prefix p05 (10 000 names)", lambda: store.list_page(prefix="p05", limit=limit),
            rounds)  # fmt: skip
    for state in ("active", "revoked", "disabled", "expired"):
        measure(f"state={state}", lambda s=state: store.list_page(state=s, limit=limit), rounds)  # type: ignore[misc]
    measure("state=revoked, from the middle",
            lambda: store.list_page(state="revoked", after=deep, limit=limit), rounds)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=1_000_000)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        if args.store == "sqlite":
            url = fill_sqlite(Path(tmp) / "peers.db", args.peers)
            server = None
        else:
            from tests.pgserver import PostgresServer

            server = PostgresServer()
            server.start()
            url = server.create_database()
            fill_postgres(url, args.peers)
        print(f"{args.store}: {args.peers} peers written in {time.perf_counter() - t:.1f} s;"
              f" pages of {args.limit}, {args.rounds} rounds")  # fmt: skip
        try:
            with open_store(url) as store:
                run(store, args.peers, args.limit, args.rounds)
        finally:
            if server is not None:
                server.close()


if __name__ == "__main__":
    main()
