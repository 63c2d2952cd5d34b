"""A small single-threaded reactor: readable fds, one-shot timers on a heap, and tickers.

It knows nothing of WireGuard. Handlers must not block: slow work belongs on a worker thread
(`Workers`) whose results come back through a wake-up socket as callbacks on this thread. The
reactor measures the longest single step it ran (`max_stall`), which is how long the packet
path was held at worst.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import queue
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol


class Ticker(Protocol):
    def next_deadline(self) -> float | None:
        """When tick() next has work (monotonic), or None."""
        ...

    def tick(self, now: float) -> None: ...


class Reactor:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._tickers: list[Ticker] = []
        self.stopped = False
        self.max_stall = 0.0  # seconds: the longest one handler, timer or tick ran
        self.max_stall_what = ""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._sel.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(fd)

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), callback))

    def add_ticker(self, ticker: Ticker) -> None:
        self._tickers.append(ticker)

    def stop(self) -> None:
        self.stopped = True

    def run(self) -> None:
        while not self.stopped:
            self.run_once()

    def run_once(self, max_wait: float = 1.0) -> None:
        now = self.clock()
        due = now + max_wait
        if self._timers:
            due = min(due, self._timers[0][0])
        for t in self._tickers:
            d = t.next_deadline()
            if d is not None and d < due:
                due = d
        for key, _ in self._sel.select(max(0.0, due - now)):
            self._step(key.data, key.data.__qualname__)
            if self.stopped:
                return
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, cb = heapq.heappop(self._timers)
            self._step(cb, "timer")
        for t in self._tickers:
            d = t.next_deadline()
            if d is not None and d <= now:
                self._step(functools.partial(t.tick, now), f"{type(t).__name__}.tick")

    def _step(self, fn: Callable[[], None], what: str) -> None:
        start = self.clock()
        fn()
        took = self.clock() - start
        if took > self.max_stall:
            self.max_stall = took
            self.max_stall_what = what

    def close(self) -> None:
        self._sel.close()


class Workers:
    """Daemon threads for blocking calls; each result comes back as a callback on the reactor's
    thread. `submit(pool, fn, done)` runs fn() on one of the pool's threads and later
    done(result, error) on the reactor's. A one-thread pool runs calls in submission order
    (a device's changes must). Daemon threads: a call stuck on a frozen server cannot keep the
    process from exiting."""

    def __init__(self, reactor: Reactor, pools: dict[str, int]) -> None:
        self._queues: dict[str, queue.SimpleQueue[_Job | None]] = {}
        self._threads: list[threading.Thread] = []
        self._busy = dict.fromkeys(pools, 0)
        self._done: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._signalled = False
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        reactor.add_reader(self._r.fileno(), self._drain)
        self._reactor = reactor
        for name, n in pools.items():
            q: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
            self._queues[name] = q
            for i in range(n):
                t = threading.Thread(
                    target=self._work, args=(q,), name=f"wgjit-{name}-{i}", daemon=True
                )
                t.start()
                self._threads.append(t)

    def busy(self, pool: str) -> int:
        """Calls submitted to `pool` whose result has not come back yet."""
        return self._busy[pool]

    def submit(
        self,
        pool: str,
        fn: Callable[[], object],
        done: Callable[[object, Exception | None], None],
    ) -> None:
        self._busy[pool] += 1

        def back(result: object, error: Exception | None) -> None:
            self._busy[pool] -= 1
            done(result, error)

        self._queues[pool].put((fn, back))

    def _work(self, q: queue.SimpleQueue[_Job | None]) -> None:
        while (job := q.get()) is not None:
            fn, back = job
            try:
                result, error = fn(), None
            except Exception as e:
                result, error = None, e
            self._done.append(functools.partial(back, result, error))
            with self._lock:
                if self._signalled:
                    continue
                self._signalled = True
            with contextlib.suppress(BlockingIOError, OSError):
                self._w.send(b"\0")

    def _drain(self) -> None:
        # In this order: read the wake-up bytes, then clear the flag, then take the results.
        # A result queued before the flag is cleared is taken now (its worker may have seen
        # the flag set and sent nothing); one queued after finds it clear and sends a byte,
        # which wakes the reactor again. (Clearing first loses results: a worker that sees
        # the flag set by a worker whose byte was then read here would never wake anyone.)
        with contextlib.suppress(BlockingIOError):
            while self._r.recv(4096):
                pass
        with self._lock:
            self._signalled = False
        for _ in range(len(self._done)):
            self._done.popleft()()

    def close(self, timeout: float) -> bool:
        """Finish the submitted calls (running their callbacks) for at most `timeout`
        seconds; True if all finished. Threads still stuck are left behind (daemons)."""
        for q in self._queues.values():
            for _ in range(len(self._threads)):
                q.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        while self._done:
            self._done.popleft()()
        self._reactor.remove_reader(self._r.fileno())
        self._r.close()
        self._w.close()
        return not any(t.is_alive() for t in self._threads)


_Job = tuple[Callable[[], object], Callable[[object, Exception | None], None]]
