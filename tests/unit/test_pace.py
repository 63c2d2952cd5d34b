"""Hold mode's release window (wgjit.gateway.pace) and hold mode paced by it: sans-IO, the clock
passed in. No sockets: the queue is the fake of test_hold_replay, answers are given directly."""

from __future__ import annotations

import contextlib
import errno
import io

import pytest

from tests.unit.test_gateway_core import knock
from tests.unit.test_hold_replay import _Dummy, _queue_with, _refuse, _verdicts
from wgjit.addr import Endpoint
from wgjit.capture import nfqueue as nq
from wgjit.capture.afpacket import CaptureError
from wgjit.capture.answers import COOKIE_REPLY, RESPONSE, Answer
from wgjit.events import EventLog, parse_logfmt
from wgjit.gateway import modes, pace
from wgjit.gateway.core import FALLBACK_RELEASE_RATE
from wgjit.gateway.effects import Verdict
from wgjit.gateway.outcome import Outcome
from wgjit.gateway.pace import ReleaseWindow, sender_index

# -- the window ------------------------------------------------------------------------------


def test_releases_wait_for_answers_and_an_answer_frees_its_own_slot() -> None:
    w = ReleaseWindow(4)
    for i in range(4):
        assert w.room(0.0) == 4 - i
        w.release(i, 0.0)
    assert w.room(0.001) == 0 and len(w) == 4
    assert w.answer(2, False, 0.002)  # the device answered initiation 2
    assert w.room(0.002) == 1
    assert not w.answer(2, False, 0.002)  # a second copy of that frame: matches nothing
    assert not w.answer(99, False, 0.002)  # a rekey of an installed peer: not ours
    assert w.answered == 1 and w.room(0.002) == 1


def test_a_lost_release_never_stalls_the_window_and_a_late_answer_is_counted() -> None:
    w = ReleaseWindow(2)
    w.release(1, 10.0)
    w.release(2, 10.0)
    assert w.room(10.0 + pace.INITIAL_TIMEOUT - 0.001) == 0
    assert w.next_expiry() == pytest.approx(10.0 + pace.INITIAL_TIMEOUT)
    assert w.room(10.0 + pace.INITIAL_TIMEOUT) == 2  # neither answered: both time out
    assert w.unanswered == 2 and w.next_expiry() is None
    assert w.answer(1, False, 10.3)  # answered after all: matched, counted as late
    assert w.late == 1 and w.answered == 1 and w.room(10.3) == 2
    assert not w.answer(2, False, 10.0 + pace.LATE_MEMORY + 1)  # forgotten by then


def test_cookies_halve_the_window_once_per_timeout_and_answers_grow_it_back() -> None:
    w = ReleaseWindow(64)
    for i in range(64):
        w.release(i, 0.0)
    assert w.answer(0, True, 0.010)  # the device passed its under-load mark
    assert w.cookies == 1 and w.limit == 32 and w.backoffs == 1
    assert w.answer(1, True, 0.011)  # the same episode: not halved again
    assert w.limit == 32 and w.cookies == 2
    # not before one answer timeout has passed (it follows the answer times: 10 ms here)
    assert w.answer(2, True, 0.011 + w.timeout) and w.limit == 16
    for i in range(3, 40):
        w.answer(i, True, 1.0 + i)
    assert w.limit == pace.MIN_WINDOW  # never below
    before = w.limit
    for i in range(100, 400):
        w.release(i, 50.0)
        w.answer(i, False, 50.001)
    assert before < w.limit <= 64
    for i in range(400, 5000):
        w.release(i, 60.0)
        w.answer(i, False, 60.001)
    assert w.limit == 64  # and no further


def test_the_timeout_follows_measured_answer_times_within_bounds() -> None:
    w = ReleaseWindow(8)
    assert w.timeout == pace.INITIAL_TIMEOUT
    for i in range(50):
        w.release(i, float(i))
        w.answer(i, False, i + 0.002)
    assert w.timeout == pace.MIN_TIMEOUT  # 2 ms answers: the floor
    for i in range(50, 100):
        w.release(i, float(i))
        w.answer(i, False, i + 0.2)
    assert 0.2 <= w.timeout <= pace.MAX_TIMEOUT
    for i in range(100, 150):
        w.release(i, float(i))
        w.answer(i, False, i + 3.0)
    assert w.timeout == pace.MAX_TIMEOUT


def test_late_memory_is_bounded() -> None:
    w = ReleaseWindow(2)
    for i in range(1000):
        w.release(i, 0.0)  # forced ones (the hold limit) may exceed the window
    w.expire(1.0)
    assert len(w._late) <= 16 * 2


def test_window_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ReleaseWindow(0)


def test_sender_index_is_what_answers_carry_back() -> None:
    init = b"\x01\x00\x00\x00" + bytes([0x78, 0x56, 0x34, 0x12]) + bytes(140)
    assert sender_index(init) == 0x12345678


# -- hold mode paced by the window -------------------------------------------------------------


def _init(i: int) -> bytes:
    return b"\x01\x00\x00\x00" + i.to_bytes(4, "little") + bytes(140)


_Mode = tuple[modes.HoldMode, list[bytes], list[float]]


def _mode(n: int, window: int, rate: float = 0.0) -> _Mode:
    clock = [100.0]
    q, sock = _queue_with({i: 100.0 for i in range(n)})
    mode = modes.HoldMode(q, EventLog(io.StringIO()), None, rate, window=ReleaseWindow(window),
                          clock=lambda: clock[0])  # fmt: skip
    return mode, sock.sent, clock


def _accepted(sent: list[bytes]) -> list[int]:
    return [pid for v, pid in _verdicts(sent, range(201)) if v == nq.NF_ACCEPT]


def _verdict(mode: modes.HoldMode, i: int, outcome: Outcome = Outcome.INSTALLED) -> None:
    k = knock(_init(i), 100.0)
    mode.verdict(Verdict(nq.Held(k, i), outcome, k))


def test_hold_mode_releases_in_verdict_order_as_the_device_answers() -> None:
    mode, sent, clock = _mode(201, 8)
    for i in range(200):
        _verdict(mode, i)
    _verdict(mode, 200, Outcome.UNKNOWN)  # a drop is not paced
    mode.flush()
    assert _accepted(sent) == list(range(8))
    assert (nq.NF_DROP, 200) in _verdicts(sent, range(201))
    assert mode.next_deadline() == pytest.approx(100.0 + pace.INITIAL_TIMEOUT)  # or an answer
    clock[0] = 100.005
    mode.on_answers([Answer(RESPONSE, 3), Answer(RESPONSE, 5), Answer(RESPONSE, 3)], clock[0])
    assert _accepted(sent) == list(range(10))  # two slots freed (the copy of 3 freed none)
    answered = 2
    while len(_accepted(sent)) < 200:
        clock[0] += 0.001
        released = _accepted(sent)
        mode.on_answers([Answer(RESPONSE, i) for i in released[answered - 2 :]], clock[0])
        answered = len(released) + 2
        window = mode.window
        assert window is not None and len(window) <= 8
    assert _accepted(sent) == list(range(200))  # all of them, in verdict order
    s = mode.stats()
    assert s["queue_paced"] == 192 and s["release_inflight_max"] == 8
    assert s["device_answers"] >= 190 and s["device_cookies"] == 0 and s["queue_expired"] == 0


def test_hold_mode_backs_off_on_the_devices_cookies() -> None:
    mode, sent, clock = _mode(100, 16)
    for i in range(100):
        _verdict(mode, i)
    mode.flush()
    assert _accepted(sent) == list(range(16))
    clock[0] = 100.01
    # the device cookies two of ours: it passed its mark; the window halves to 8, so the
    # two freed slots release nothing while 14 are still in flight
    mode.on_answers([Answer(COOKIE_REPLY, 0), Answer(COOKIE_REPLY, 1)], clock[0])
    assert _accepted(sent) == list(range(16))
    s = mode.stats()
    assert s["device_cookies"] == 2 and s["release_window"] == 8 and s["release_backoffs"] == 1
    mode.on_answers([Answer(RESPONSE, i) for i in range(2, 9)], clock[0])
    assert _accepted(sent) == list(range(17))  # 7 in flight now: one more fits


def test_unanswered_releases_time_out_on_tick() -> None:
    mode, sent, clock = _mode(20, 4)
    for i in range(20):
        _verdict(mode, i)
    mode.flush()
    assert _accepted(sent) == [0, 1, 2, 3]
    deadline = mode.next_deadline()
    assert deadline == pytest.approx(100.0 + pace.INITIAL_TIMEOUT)
    clock[0] = deadline
    mode.tick(clock[0])  # the device answered none of them (lost): the window moves on
    assert _accepted(sent) == list(range(8))
    assert mode.stats()["release_unanswered"] == 4


def test_the_hold_limit_wins_over_the_window_and_is_counted_in_it() -> None:
    mode, sent, clock = _mode(50, 4)
    for i in range(50):
        _verdict(mode, i)
    mode.flush()
    clock[0] = 101.0  # nobody answered; the queue's 1 s limit is reached for all
    mode.tick(clock[0])
    assert sorted(_accepted(sent)) == list(range(50)) and len(_accepted(sent)) == 50
    s = mode.stats()
    # the first 4 timed out, so 4 more went through the window; the other 42 reached the
    # limit and went whatever the window said
    assert s["queue_expired"] == 42
    window = mode.window
    assert window is not None and len(window) == 46  # and on their way to the device
    assert s["release_inflight_max"] == 4
    assert mode.next_deadline() == pytest.approx(101.0 + window.timeout)


def test_a_rate_cap_applies_on_top_of_the_window() -> None:
    mode, sent, clock = _mode(200, 128, rate=1000.0)
    for i in range(200):
        _verdict(mode, i)
    mode.flush()
    assert _accepted(sent) == list(range(modes.RELEASE_BURST))  # the cap's burst, not 128
    clock[0] = 100.010
    mode.tick(clock[0])
    assert len(_accepted(sent)) == modes.RELEASE_BURST + 10


def test_release_delay_is_how_long_the_oldest_judged_knock_waits() -> None:
    mode, sent, clock = _mode(20, 4)
    assert mode.release_delay(100.5) == 0.0  # nothing waits
    for i in range(20):
        _verdict(mode, i)  # knocks received at 100.0
    mode.flush()
    assert mode.release_delay(100.6) == pytest.approx(0.6)
    mode.queue.expire(101.0)  # the queue let them all go (1 s): nothing waits any more
    assert mode.release_delay(101.0) == 0.0


def test_released_at_once_when_the_window_has_room() -> None:
    mode, sent, clock = _mode(3, 8)
    for i in range(3):
        _verdict(mode, i, Outcome.ALREADY_INSTALLED)
    mode.flush()
    assert _accepted(sent) == [0, 1, 2] and mode.stats()["queue_paced"] == 0


# -- opening: a window if the answers can be watched, else one warning and the rate -----------


def _open(stack: contextlib.ExitStack, out: io.StringIO, **kw: object) -> modes.Mode:
    return modes.open_mode(
        stack, "hold", port=51820, queue_num=None, ifname="wg0", capture_interface=None,
        invert_delay=0.005, call_at=lambda w, c: None, submit=lambda e: None,
        log=EventLog(out), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _no(self: object) -> None:
    pass


class _Answers(_Dummy):
    def fileno(self) -> int:
        return 42


def test_open_hold_mode_with_a_window_or_falls_back_to_the_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(modes, "NfQueue", _Dummy)
    rules = type("Rules", (_Dummy,), {"install": _no, "remove": _no, "removed_stale": 0,
                                      "limit_error": None})
    monkeypatch.setattr(modes, "QueueRules", rules)
    monkeypatch.setattr(modes, "Reinjector", _Dummy)
    monkeypatch.setattr(modes, "AnswerCapture", _Answers)
    out = io.StringIO()
    with contextlib.ExitStack() as stack:
        m = _open(stack, out, release_window=64)
        assert isinstance(m, modes.HoldMode) and m.window is not None and m.window.size == 64
        assert m._cap is None and m.readers()[0][0] == 42
        m = _open(stack, out, release_window=64, release_rate=500.0)
        assert isinstance(m, modes.HoldMode) and m._cap is not None and m._cap.rate == 500.0
        assert out.getvalue() == ""
        monkeypatch.setattr(modes, "AnswerCapture", _refuse(CaptureError(errno.EPERM, "no")))
        m = _open(stack, out, release_window=64)
        assert isinstance(m, modes.HoldMode) and m.window is None and m.readers() == []
        assert m._cap is not None and m._cap.rate == FALLBACK_RELEASE_RATE
        m = _open(stack, out, release_window=64, release_rate=300.0)
        assert isinstance(m, modes.HoldMode) and m._cap is not None and m._cap.rate == 300.0
        m = _open(stack, out, release_window=0)  # no window asked: no watch, no warning
        assert isinstance(m, modes.HoldMode) and m.window is None and m._cap is None
    warnings = [parse_logfmt(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e["release_rate"]) for e in warnings] == [
        ("release_window_unavailable", f"{FALLBACK_RELEASE_RATE:g}"),
        ("release_window_unavailable", "300"),
    ]
    assert all(e["reason"] == "no" for e in warnings)


def test_a_release_passed_over_leaves_once_later_ones_are_answered() -> None:
    """The device ignores an initiation (a key it does not have): its slot is free once
    REORDER later releases were answered, long before the timeout."""
    w = ReleaseWindow(16)
    for i in range(12):
        w.release(i, 0.0)
    for i in range(1, pace.REORDER):  # answers for 1..REORDER-1: 0 may just be late
        w.answer(i, False, 0.001)
    assert w.room(0.001) == 16 - 12 + pace.REORDER - 1
    w.answer(pace.REORDER, False, 0.001)  # REORDER later ones answered: 0 was passed over
    assert w.room(0.001) == 16 - 12 + pace.REORDER + 1
    assert w.unanswered == 1 and len(w) == 12 - pace.REORDER - 1
    assert w.answer(0, False, 0.002) and w.late == 1  # if it comes after all: counted late


# -- late installs: re-injected once installed, paced, recognised when they come back ----------


class _Replier:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, k: object) -> None:
        self.sent.append(k.payload)  # type: ignore[attr-defined]

    def answer(self, k: object, payload: bytes) -> None:
        pass


def _late_mode(n: int, window: int) -> tuple[modes.HoldMode, list[bytes], _Replier, list[float]]:
    mode, sent, clock = _mode(n, window)
    replier = _Replier()
    mode.replier = replier  # type: ignore[assignment]
    return mode, sent, replier, clock


def _installed_late(mode: modes.HoldMode, i: int, ticket: nq.Held | None = None) -> None:
    """The policy's verdict for knock `i` whose install finished after it had a verdict."""
    k = knock(_init(i), 100.0)
    held = nq.Held(k, i)
    if ticket is None:
        mode.verdict(Verdict(None, Outcome.INSTALLED, k, had=held))
    else:
        mode.verdict(Verdict(held, Outcome.INSTALLED, k))


def test_a_late_install_reinjects_its_initiation_and_lets_the_copy_through() -> None:
    mode, sent, replier, clock = _late_mode(2, 8)
    _verdict(mode, 0, Outcome.TIMEOUT)  # fail-open at the knock budget: released at once
    mode.flush()
    assert _accepted(sent) == [0] and replier.sent == []
    clock[0] = 101.5  # the install finishes 1.5 s after the knock: the device ignored it
    _installed_late(mode, 0)
    assert replier.sent == [_init(0)]
    assert mode.stats()["reinjected"] == 1
    # the copy comes back through the queue: released as is, never judged again; the same
    # bytes from another source (someone racing it to move the peer's endpoint) are judged
    echo = knock(_init(0), 101.5)
    stranger = knock(_init(1), 101.5)
    racer = knock(_init(0), 101.5, Endpoint.parse("198.18.0.66:40000"))
    mode.queue._held.update({6: 101.5, 7: 101.5, 8: 101.5})
    mode.queue.recv_batch = lambda: [  # type: ignore[method-assign]
        nq.Held(racer, 6), nq.Held(echo, 7), nq.Held(stranger, 8)
    ]
    assert mode.read() == [(racer, nq.Held(racer, 6)), (stranger, nq.Held(stranger, 8))]
    assert (nq.NF_ACCEPT, 7) in _verdicts(sent, range(9))
    mode.queue.recv_batch = lambda: [nq.Held(echo, 9)]  # type: ignore[method-assign]
    mode.queue._held[9] = 101.6
    assert mode.read() == [(echo, nq.Held(echo, 9))]  # a second copy is judged (a replay)


def test_a_knock_released_by_the_hold_limit_is_reinjected_once_installed() -> None:
    mode, sent, replier, clock = _late_mode(1, 8)
    clock[0] = 101.0
    mode.tick(clock[0])  # nothing decided in 1 s: the queue let it go
    assert _accepted(sent) == [0] and mode.stats()["queue_expired"] == 1
    clock[0] = 101.2
    _installed_late(mode, 0, ticket=nq.Held(knock(_init(0), 100.0), 0))
    assert replier.sent == [_init(0)]


def test_a_fail_open_release_still_paced_is_not_reinjected_too() -> None:
    mode, sent, replier, clock = _late_mode(3, 2)
    for i in range(3):
        _verdict(mode, i, Outcome.TIMEOUT)
    mode.flush()
    assert _accepted(sent) == [0, 1]  # 2 waits for the window
    clock[0] = 100.9
    _installed_late(mode, 2)  # its packet is still held: it goes to the installed peer itself
    assert replier.sent == [] and mode.stats()["reinject_missed"] == 0
    mode.on_answers([Answer(RESPONSE, 0)], clock[0])
    assert _accepted(sent) == [0, 1, 2]


def _held_at(mode: modes.HoldMode, i: int, at: float) -> None:
    """Knock `i`, queued at `at`, judged INSTALLED in time (paced if the window is full)."""
    k = knock(_init(i), at)
    mode.queue._held[i] = at
    mode.verdict(Verdict(nq.Held(k, i), Outcome.INSTALLED, k))


def test_what_waits_for_the_window_goes_oldest_first_and_ages_out() -> None:
    mode, sent, replier, clock = _late_mode(5, 2)
    for i in range(2):
        _verdict(mode, i, Outcome.TIMEOUT)  # knocks of 100.0 fill the window
    mode.flush()
    clock[0] = 100.2  # (before the window's first timeout)
    _installed_late(mode, 0)
    _installed_late(mode, 1)
    _held_at(mode, 2, 100.05)  # a younger knock, on time: paced
    del mode.queue._held[4]  # knock 4 of 100.15 left the queue before its install
    k4 = knock(_init(4), 100.15)
    mode.verdict(Verdict(None, Outcome.INSTALLED, k4, had=nq.Held(k4, 4)))
    assert replier.sent == [] and _accepted(sent) == [0, 1]  # the window is full
    mode.on_answers([Answer(RESPONSE, 0)], clock[0])
    assert replier.sent == [_init(0)]  # the oldest first
    mode.on_answers([Answer(RESPONSE, 1)], clock[0])
    assert replier.sent == [_init(0), _init(1)]
    mode.on_answers([Answer(RESPONSE, 0)], clock[0])
    assert _accepted(sent) == [0, 1, 2] and len(replier.sent) == 2  # 100.05 before 100.15
    clock[0] = 100.15 + modes.LATE_WITHIN + 0.01  # knock 4's client sends a new one soon
    mode.on_answers([Answer(RESPONSE, 1)], clock[0])
    assert len(replier.sent) == 2
    s = mode.stats()
    assert s["reinjected"] == 2 and s["reinject_missed"] == 1
    clock[0] += modes.ECHO_WITHIN
    mode.tick(clock[0])
    assert mode._echoes == {}  # the copies never came back: forgotten


def _cookie(mode: modes.HoldMode, i: int, at: float) -> None:
    mode.on_answers([Answer(COOKIE_REPLY, i)], at)


def _echo_back(mode: modes.HoldMode, i: int, packet_id: int) -> None:
    """The re-sent copy of knock `i` comes back through the queue (and passes unjudged)."""
    echo = knock(_init(i), 100.0)
    mode.queue._held[packet_id] = 100.0
    mode.queue.recv_batch = lambda: [nq.Held(echo, packet_id)]  # type: ignore[method-assign]
    assert mode.read() == []


def test_a_release_the_device_cookies_is_sent_again_up_to_a_limit() -> None:
    mode, sent, replier, clock = _late_mode(3, 8)
    _held_at(mode, 0, 100.0)  # released at once
    _verdict(mode, 1, Outcome.TIMEOUT)  # fail-open: the device does not have this peer
    mode.flush()
    assert _accepted(sent) == [0, 1]
    clock[0] = 100.01
    _cookie(mode, 1, clock[0])  # nothing to gain by sending it again
    assert replier.sent == []
    for n in range(modes.MAX_RESENDS):
        _cookie(mode, 0, clock[0])  # the device was past its mark: the peer is installed
        assert replier.sent == [_init(0)] * (n + 1), n
        _echo_back(mode, 0, 100 + n)  # and on to the device, which may cookie it again
        clock[0] += 0.01
    _cookie(mode, 0, clock[0])  # enough: its client retries
    assert len(replier.sent) == modes.MAX_RESENDS
    s = mode.stats()
    assert s["device_cookies_resent"] == modes.MAX_RESENDS and s["reinject_missed"] == 1
    # a response ends it; a cookie for an index nobody released changes nothing
    _held_at(mode, 2, clock[0])
    mode.on_answers([Answer(RESPONSE, 2)], clock[0])
    _cookie(mode, 2, clock[0])
    _cookie(mode, 77, clock[0])
    assert len(replier.sent) == modes.MAX_RESENDS and mode._installed_releases == {}


def test_a_late_install_without_a_raw_socket_or_too_old_is_counted_missed() -> None:
    mode, sent, clock = _mode(1, 8)  # no replier (cookies_unavailable)
    mode2, _, replier, clock2 = _late_mode(1, 8)
    for m in (mode, mode2):
        _verdict(m, 0, Outcome.TIMEOUT)
    clock2[0] = 100.0 + modes.LATE_WITHIN + 0.1
    for m in (mode, mode2):
        _installed_late(m, 0)
    assert replier.sent == []
    assert mode.stats()["reinject_missed"] == mode2.stats()["reinject_missed"] == 1


def test_releases_never_answered_are_forgotten_once_too_old_to_send_again() -> None:
    mode, sent, replier, clock = _late_mode(3, 8)
    _held_at(mode, 0, 100.0)  # a rekey the device never answers (a copy it ignores)
    _held_at(mode, 1, 100.5)
    assert list(mode._installed_releases) == [0, 1]
    _held_at(mode, 2, 100.0 + modes.LATE_WITHIN + 0.1)  # every installed peer's rekey passes
    assert list(mode._installed_releases) == [1, 2]


def test_a_cookie_seen_twice_is_re_sent_once() -> None:
    """The answer watch sees a frame on a bridge and on its port: the second copy of a cookie
    must not send the initiation again while the first copy's re-send is on its way (its
    copy back through the queue would be judged a duplicate and dropped)."""
    mode, sent, replier, clock = _late_mode(1, 8)
    _held_at(mode, 0, 100.0)
    mode.flush()
    mode.on_answers([Answer(COOKIE_REPLY, 0), Answer(COOKIE_REPLY, 0)], 100.01)
    assert replier.sent == [_init(0)] and mode.stats()["device_cookies_resent"] == 1
    assert list(mode._echoes) == [_init(0)]
