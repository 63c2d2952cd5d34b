"""The reactor and its workers: every result comes back, on the reactor's thread, however the
worker threads and the reactor interleave."""

from __future__ import annotations

import threading
import time

from wgjit.gateway.reactor import Reactor, Workers


def test_every_result_comes_back_under_contention() -> None:
    """Many short calls on several pools, each result submitting the next: a lost wake-up
    leaves results queued with nobody told (this found one)."""
    reactor = Reactor()
    workers = Workers(reactor, {"a": 2, "b": 1, "c": 1})
    main = threading.get_ident()
    done = 0
    wrong_thread = []
    target = 20000

    def job() -> int:
        return 1

    def back(result: object, error: Exception | None) -> None:
        nonlocal done
        if threading.get_ident() != main:
            wrong_thread.append(1)
        done += 1
        inflight = sum(workers.busy(p) for p in "abc")
        if done + inflight < target:
            workers.submit("abc"[done % 3], job, back)

    for i in range(50):
        workers.submit("abc"[i % 3], job, back)
    deadline = time.monotonic() + 30
    while done < target and time.monotonic() < deadline:
        reactor.run_once(0.5)
    assert done == target, f"{target - done} results never came back"
    assert not wrong_thread
    assert workers.close(5.0)


def test_errors_come_back_as_errors_and_timers_fire_in_order() -> None:
    reactor = Reactor()
    workers = Workers(reactor, {"a": 1})
    got: list[object] = []

    def fail() -> object:
        raise ValueError("boom")

    workers.submit("a", fail, lambda r, e: got.append(e))
    now = time.monotonic()
    reactor.call_at(now + 0.02, lambda: got.append("second"))
    reactor.call_at(now + 0.01, lambda: got.append("first"))
    deadline = now + 5
    while len(got) < 3 and time.monotonic() < deadline:
        reactor.run_once(0.05)
    errors = [g for g in got if isinstance(g, ValueError)]
    assert len(errors) == 1 and str(errors[0]) == "boom"
    assert [g for g in got if isinstance(g, str)] == ["first", "second"]
    workers.close(1.0)


def test_longest_step_is_measured() -> None:
    reactor = Reactor()
    reactor.call_at(time.monotonic(), lambda: time.sleep(0.05))
    reactor.run_once(0.1)
    assert reactor.max_stall >= 0.05 and reactor.max_stall_what == "timer"
