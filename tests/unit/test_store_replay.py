"""Stores keep anti-replay on both backends: a claim is never lost when another gateway
releases or claims the same peer half-way through it."""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from wgjit.addr import parse_networks
from wgjit.keys import PrivateKey, PublicKey
from wgjit.store import Store, open_store
from wgjit.store.postgres import PostgresStore
from wgjit.store.sqlite import SQLiteStore

NETS = parse_networks("100.65.0.2/32")


def tai64n(seconds: int, nanos: int = 0) -> bytes:
    return struct.pack(">QI", 2**62 + seconds, nanos)


def new_key() -> PublicKey:
    return PrivateKey.generate().public_key()


@pytest.fixture(params=["sqlite", "postgresql"])
def open_same(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Opens another connection to one store of each backend (another gateway, the CLI)."""
    opened: list[Store] = []
    if request.param == "sqlite":
        url = f"sqlite://{tmp_path}/peers.db"
    else:
        url = request.getfixturevalue("pg_url")

    def make() -> Store:
        s = open_store(url)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(open_same: Callable[[], Store]) -> Store:
    return open_same()


def mark_of(store: Store, name: str) -> bytes | None:
    peer = store.get_peer(name)
    assert peer is not None
    return peer.handshake_hwm


# -- the claim race (issue 11, item 5) ----------------------------------------------------------


def _backend(store: Store) -> str:
    return "sqlite" if isinstance(store, SQLiteStore) else "postgresql"


class _Interleave:
    """Runs `action` on another thread (another connection) right after the first statement
    about peer_claims that this thread's store call sends, and lets that call go on once the
    action has finished or has been blocked for `patience` seconds (by a lock the call holds:
    then it finishes after the call commits). Records which finished first."""

    def __init__(self, action: Callable[[], object], patience: float = 0.3) -> None:
        self.action = action
        self.patience = patience
        self.thread_id = threading.get_ident()
        self.fired = False
        self.order: list[str] = []
        self.result: list[object] = []
        self._worker: threading.Thread | None = None

    def after(self, sql: object) -> None:
        if self.fired or threading.get_ident() != self.thread_id:
            return
        if "peer_claims" not in str(sql):
            return
        self.fired = True

        def run() -> None:
            self.result.append(self.action())
            self.order.append("action")

        self._worker = threading.Thread(target=run)
        self._worker.start()
        self._worker.join(self.patience)

    def join(self) -> None:
        assert self.fired, "the call never touched peer_claims"
        assert self._worker is not None
        self._worker.join(10)
        assert not self._worker.is_alive()


class _TracedConnection:
    """An sqlite3 connection whose execute() reports each statement after running it."""

    def __init__(self, conn: Any, after: Callable[[object], None]) -> None:
        self._conn = conn
        self._after = after

    def execute(self, sql: str, *params: Any) -> Any:
        cur = self._conn.execute(sql, *params)
        self._after(sql)
        return cur

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def interleaved(
    store: Store, monkeypatch: pytest.MonkeyPatch, action: Callable[[], object]
) -> _Interleave:
    """Arrange for `action` to run in the middle of the next claim on `store`."""
    il = _Interleave(action)
    if isinstance(store, SQLiteStore):
        monkeypatch.setattr(store, "_conn", _TracedConnection(store._conn, il.after))
    else:
        assert isinstance(store, PostgresStore)
        execute = psycopg.Connection.execute

        def traced(self: psycopg.Connection[Any], query: Any, *a: Any, **kw: Any) -> Any:
            cur = execute(self, query, *a, **kw)
            il.after(query)
            return cur

        monkeypatch.setattr(psycopg.Connection, "execute", traced)
    return il


def test_claim_survives_the_holder_releasing_half_way(
    open_same: Callable[[], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """gw-a holds the peer and lets it go (idle eviction) just as gw-b claims it: whatever the
    order, gw-b holds it afterwards (a release only ever drops the releaser's own claim)."""
    a, b = open_same(), open_same()
    k = new_key()
    a.add_peer("alice", k, NETS)
    a.heartbeat("gw-a")
    b.heartbeat("gw-b")
    assert a.claim(k, "gw-a") is None
    cursor = a.change_cursor()
    il = interleaved(b, monkeypatch, lambda: a.release([k], "gw-a"))
    previous = b.claim(k, "gw-b")
    il.order.append("claim")
    il.join()
    monkeypatch.undo()
    peer = a.lookup(k)
    assert peer is not None and peer.holder == "gw-b", (_backend(b), il.order)
    if previous == "gw-a":  # it took the claim over: gw-a hears of it
        assert a.changes_since(cursor)[0] == [k]
    else:  # gw-a had let go first
        assert previous is None and il.order == ["action", "claim"]


def test_claim_survives_another_gateway_claiming_half_way(
    open_same: Callable[[], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody holds the peer; gw-c claims it while gw-b's claim is under way. The claim that
    finishes last holds the peer, and it says whom it took the peer from (so that gateway
    hears of it through the feed); neither claim is lost."""
    b, c = open_same(), open_same()
    k = new_key()
    b.add_peer("alice", k, NETS)
    b.heartbeat("gw-b")
    c.heartbeat("gw-c")
    cursor = b.change_cursor()
    il = interleaved(b, monkeypatch, lambda: c.claim(k, "gw-c"))
    previous = b.claim(k, "gw-b")
    il.order.append("claim")
    il.join()
    monkeypatch.undo()
    (c_previous,) = il.result
    peer = b.lookup(k)
    assert peer is not None
    if il.order == ["action", "claim"]:  # gw-c first, then gw-b took it over
        assert (c_previous, previous, peer.holder) == (None, "gw-c", "gw-b"), _backend(b)
    else:  # gw-b first (gw-c waited for its lock), then gw-c took it over
        assert (previous, c_previous, peer.holder) == (None, "gw-b", "gw-c"), _backend(b)
    assert b.changes_since(cursor)[0] == [k]  # the takeover is announced either way


def test_claims_racing_on_threads(open_same: Callable[[], Store]) -> None:
    """Unscripted: gw-a lets go of the peer while gw-b claims it, 30 times over; gw-b holds
    it every time. (Rarely hits the window the scripted tests above hit every time.)"""
    a, b = open_same(), open_same()
    k = new_key()
    a.add_peer("alice", k, NETS)
    a.heartbeat("gw-a")
    b.heartbeat("gw-b")
    start = threading.Barrier(2)

    def release() -> None:
        start.wait()
        a.release([k], "gw-a")

    for _ in range(30):
        a.claim(k, "gw-a")
        t = threading.Thread(target=release)
        t.start()
        start.wait()
        b.claim(k, "gw-b")
        t.join()
        peer = b.lookup(k)
        assert peer is not None and peer.holder == "gw-b"
