"""Log lines: logfmt round trip, and a background writer that never blocks its caller."""

from __future__ import annotations

import io
import threading
import time

from wgjit.events import EventLog, format_logfmt, parse_logfmt


def test_logfmt_round_trip() -> None:
    fields = {"event": "install", "peer": "a b", "quote": 'x"y', "n": 3, "none": None}
    assert parse_logfmt(format_logfmt(fields)) == {
        "event": "install", "peer": "a b", "quote": 'x"y', "n": "3",
    }  # fmt: skip


class _StuckStream(io.StringIO):
    """A stream whose reader stopped reading: every write waits until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, s: str) -> int:
        self.release.wait(10)
        return super().write(s)


def test_background_log_never_blocks_and_counts_what_it_drops() -> None:
    stream = _StuckStream()
    log = EventLog(stream, background=True)
    n = EventLog.QUEUE_LINES + 500
    t = time.monotonic()
    for i in range(n):
        log.info("knock", i=i)
    assert time.monotonic() - t < 5.0  # it would hang for ever if a write blocked the caller
    assert log.dropped >= 499  # the queue holds QUEUE_LINES (+1 in the writer's hands)
    stream.release.set()
    log.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == n - log.dropped
    assert parse_logfmt(lines[0])["i"] == "0"


def test_listeners_see_every_event_with_its_fields() -> None:
    seen: list[tuple[str, dict[str, object]]] = []
    log = EventLog(io.StringIO())
    log.subscribe(lambda event, fields: seen.append((event, fields)))
    log.info("install", peer="a")
    log.debug("knock", outcome="duplicate")  # not written, still seen
    assert seen == [("install", {"peer": "a"}), ("knock", {"outcome": "duplicate"})]
