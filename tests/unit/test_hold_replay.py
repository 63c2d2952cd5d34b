"""Sans-IO parts of hold and replay: nfnetlink_queue messages, NFQUEUE rules, re-injected
datagrams, and the policy's verdict for each outcome. No sockets, no privileges."""

from __future__ import annotations

import io
import shlex
import struct
import subprocess
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_gateway_core import DST, SRC, initiation, knock
from wgjit.addr import Endpoint
from wgjit.capture import nfqueue as nq
from wgjit.capture.iptables import QueueRules, limit_spec, limited_packets, own_rules, rule_spec
from wgjit.capture.packet import Knock, parse_knock
from wgjit.capture.replay import build_datagram, internet_checksum
from wgjit.events import EventLog, parse_logfmt
from wgjit.gateway import modes
from wgjit.gateway.core import GatewayConfig
from wgjit.gateway.effects import Invert, Verdict
from wgjit.gateway.outcome import Outcome
from wgjit.keys import PrivateKey, PublicKey

# -- nfnetlink_queue messages ----------------------------------------------------------------


def packet_message(
    queue: int, packet_id: int, ifindex: int, payload: bytes, stamp: tuple[int, int] = (0, 0)
) -> bytes:
    """A NFQNL_MSG_PACKET as the kernel sends it (the attributes the client reads, plus one
    it ignores)."""
    attrs = (
        nq._attr(nq.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 1))
        + nq._attr(nq.NFQA_IFINDEX_INDEV, struct.pack("!I", ifindex))
        + nq._attr(nq.NFQA_TIMESTAMP, struct.pack("!QQ", *stamp))
        + nq._attr(16, bytes(4))  # NFQA_CT_INFO, ignored
        + nq._attr(nq.NFQA_PAYLOAD, payload)
    )
    return nq._message(nq.NFQNL_MSG_PACKET, 0, 0, queue, attrs, 2)


def test_config_and_verdict_messages_layout() -> None:
    m = nq.config_message(51820, 7, nq.cmd_attr(nq.NFQNL_CFG_CMD_BIND))
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", m)
    assert (length, kind, flags, seq, pid) == (len(m), 0x0302, 0x05, 7, 0)
    assert m[16:20] == bytes([0, 0]) + struct.pack("!H", 51820)  # family, version, queue (BE)
    assert m[20:28] == struct.pack("=HH", 8, 1) + bytes([1, 0, 0, 0])  # CFG_CMD bind, pf 0
    v = nq.verdict_message(3, 0x01020304, accept=True)
    assert struct.unpack_from("=HH", v, 4) == (0x0301, 0x01)  # verdict, request, no ack
    assert v[20:32] == struct.pack("=HH", 12, 2) + struct.pack("!II", 1, 0x01020304)
    assert nq.verdict_message(3, 9, accept=False)[24:28] == bytes(4)  # NF_DROP
    for accept in (True, False):  # what flush() sends: a cached head and the id
        assert nq._verdict_head(3, accept) + bytes([1, 2, 3, 4]) == nq.verdict_message(
            3, 0x01020304, accept
        )
    assert len(nq.params_attr(256)) == 12  # 4 + 5 bytes, padded to 4


def test_parse_packets_and_acks_in_one_datagram() -> None:
    payload = build_datagram(SRC, DST, b"\x01\x00\x00\x00" + bytes(144))
    ack = struct.pack("=IHHII", 36, nq.NLMSG_ERROR, 0, 5, 0) + struct.pack("=i", 0) + bytes(16)
    err = struct.pack("=IHHII", 36, nq.NLMSG_ERROR, 0, 6, 0) + struct.pack("=i", -16) + bytes(16)
    data = packet_message(51820, 42, 7, payload, (1_700_000_000, 250_000)) + ack + err
    msgs = list(nq.parse_messages(data))
    assert msgs[0] == nq.QueuedPacket(51820, 42, 7, payload, 1_700_000_000.25)
    assert msgs[1:] == [nq.NetlinkError(5, 0), nq.NetlinkError(6, -16)]
    k = parse_knock(msgs[0].payload, port=51820)  # type: ignore[union-attr]
    assert k is not None and k.source == SRC and k.destination == DST


@given(st.binary(max_size=400))
def test_parse_messages_is_total(data: bytes) -> None:
    for m in nq.parse_messages(data):
        assert isinstance(m, nq.QueuedPacket | nq.NetlinkError)


def test_truncated_packet_message_is_cut_not_raised() -> None:
    m = packet_message(1, 1, 1, bytes(100))
    for n in range(len(m)):
        list(nq.parse_messages(m[:n]))


# -- re-injected datagrams ---------------------------------------------------------------------


def _ones_sum_ok(data: bytes) -> bool:
    return internet_checksum(data) == 0


def test_replayed_datagram_has_valid_checksums_and_parses_back() -> None:
    payload = initiation(PrivateKey.generate(), PrivateKey.generate(), 1e9)
    for src, dst in [
        (SRC, DST),
        (Endpoint.parse("[fd18::11]:40000"), Endpoint.parse("[fd18::1]:51820")),
    ]:
        pkt = build_datagram(src, dst, payload)
        k = parse_knock(pkt, port=51820)
        assert k is not None and (k.source, k.destination, k.payload) == (src, dst, payload)
        s, d = src.host.packed, dst.host.packed
        if src.host.version == 4:
            assert len(pkt) == 20 + 8 + 148 and _ones_sum_ok(pkt[:20])
            udp = pkt[20:]
            pseudo = s + d + struct.pack("!BBH", 0, 17, len(udp))
        else:
            assert len(pkt) == 40 + 8 + 148
            udp = pkt[40:]
            pseudo = s + d + struct.pack("!I3xB", len(udp), 17)
        assert udp[6:8] != b"\x00\x00"
        assert _ones_sum_ok(pseudo + udp)


# -- NFQUEUE rules ---------------------------------------------------------------------------


def test_rule_spec_queues_only_initiations_with_bypass() -> None:
    v4 = rule_spec(51820, 7, "wg0", ipv6=False)
    v6 = rule_spec(51820, 7, "wg0", ipv6=True)
    for spec in (v4, v6):
        assert spec[:4] == ["-p", "udp", "--dport", "51820"]
        assert spec[-4:] == ["NFQUEUE", "--queue-num", "7", "--queue-bypass"]
        assert "--queue-bypass" in spec and "wgjit-hold wg0" in spec
    assert "0x9C" in v4[v4.index("--u32") + 1] and "0x01000000" in v4[v4.index("--u32") + 1]
    assert v6[v6.index("--u32") + 1].startswith("4>>8&0xFF=0x11")  # no extension headers


LISTING = """-P INPUT ACCEPT
-A INPUT -s 10.0.0.0/8 -j ACCEPT
-A INPUT -p udp -m udp --dport 51820 -m comment --comment "wgjit-hold wg0" -j NFQUEUE --queue-num 51820 --queue-bypass
-A INPUT -p udp -m comment --comment "wgjit-hold wg1" -j NFQUEUE --queue-num 1
-A INPUT -m comment --comment "unbalanced quote
"""  # noqa: E501


def test_own_rules_finds_only_this_interfaces_rules() -> None:
    rules = own_rules(LISTING, "wg0")
    assert len(rules) == 1 and rules[0][-1] == "--queue-bypass"
    assert own_rules(LISTING, "wg2") == []


class FakeIptables:
    """Keeps a rule list per tool like iptables would (insert at 1, -D exact, -S listing)."""

    def __init__(self) -> None:
        self.rules: dict[str, list[list[str]]] = {"iptables": [], "ip6tables": []}

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        tool, rest = argv[0], argv[1:]
        assert rest[0] == "-w"
        op, chain, args = rest[1], rest[2], rest[3:]
        assert chain == "INPUT"
        rules = self.rules[tool]
        rc, out = 0, ""
        if op == "-I":
            rules.insert(int(args[0]) - 1, args[1:])
        elif op == "-D":
            if args in rules:
                rules.remove(args)
            else:
                rc = 1
        elif op == "-S":
            out = "-P INPUT ACCEPT\n" + "".join("-A INPUT " + shlex.join(r) + "\n" for r in rules)
        return subprocess.CompletedProcess(argv, rc, out, "")


def test_rules_installed_once_removed_and_never_duplicated_after_a_crash() -> None:
    ipt = FakeIptables()
    other = ["-p", "tcp", "-j", "ACCEPT"]
    ipt.rules["iptables"].append(other)
    first = QueueRules(51820, 51820, "wg0", run=ipt)
    first.install()
    assert [len(r) for r in ipt.rules.values()] == [2, 1]
    # crash: no remove(); a new run on the same interface replaces, never duplicates
    second = QueueRules(51820, 51820, "wg0", run=ipt)
    second.install()
    assert second.removed_stale == 2
    assert [len(r) for r in ipt.rules.values()] == [2, 1]
    # a gateway on another interface keeps its own rules
    QueueRules(51821, 51821, "wg1", run=ipt).install()
    second.remove()
    assert ipt.rules["iptables"][-1] == other
    assert all("wgjit-hold wg0" not in r for rs in ipt.rules.values() for r in rs)
    assert [len(r) for r in ipt.rules.values()] == [2, 1]


def test_limit_rule_drops_what_one_source_sends_beyond_the_limit() -> None:
    for ipv6, mask in ((False, "32"), (True, "64")):
        queue = rule_spec(51820, 7, "wg0", ipv6=ipv6)
        limit = limit_spec(51820, 7, "wg0", 1000, ipv6=ipv6)
        assert limit[:8] == queue[:8]  # the same initiations: protocol, port, u32
        assert limit[-2:] == ["-j", "DROP"] and "wgjit-hold wg0" in limit
        for flag, value in (("--hashlimit-above", "1000/sec"), ("--hashlimit-burst", "1000"),
                            ("--hashlimit-mode", "srcip"), ("--hashlimit-srcmask", mask),
                            ("--hashlimit-name", "wgjit-7")):  # fmt: skip
            assert limit[limit.index(flag) + 1] == value
    with pytest.raises(ValueError):
        limit_spec(51820, 7, "wg0", 0, ipv6=False)


def test_limit_rules_go_above_the_queue_rules_and_leave_with_them() -> None:
    ipt = FakeIptables()
    rules = QueueRules(51820, 51820, "wg0", source_limit=500, run=ipt)
    rules.install()
    for tool in ("iptables", "ip6tables"):
        assert [r[-1] for r in ipt.rules[tool]] == ["DROP", "--queue-bypass"]
    assert rules.limit_error is None
    again = QueueRules(51820, 51820, "wg0", source_limit=500, run=ipt)  # after a crash
    again.install()
    assert again.removed_stale == 4 and [len(r) for r in ipt.rules.values()] == [2, 2]
    again.remove()
    assert ipt.rules == {"iptables": [], "ip6tables": []}


def test_a_kernel_without_hashlimit_keeps_the_queue_rules() -> None:
    ipt = FakeIptables()

    def no_hashlimit(argv: list[str]) -> subprocess.CompletedProcess[str]:
        if "hashlimit" in argv:
            return subprocess.CompletedProcess(argv, 2, "", "Couldn't load match `hashlimit'")
        return ipt(argv)

    rules = QueueRules(51820, 51820, "wg0", source_limit=500, run=no_hashlimit)
    rules.install()
    assert rules.limit_error == "iptables: Couldn't load match `hashlimit'"
    assert [[r[-1] for r in rs] for rs in ipt.rules.values()] == [["--queue-bypass"]] * 2


def test_limited_packets_sums_this_interfaces_drop_rules() -> None:
    listing = """-P INPUT ACCEPT -c 5 300
-A INPUT -p udp -m hashlimit --hashlimit-above 1000/sec -m comment --comment "wgjit-hold wg0" -c 1234 5678 -j DROP
-A INPUT -p udp -m comment --comment "wgjit-hold wg0" -c 99 9 -j NFQUEUE --queue-num 7 --queue-bypass
-A INPUT -p udp -m hashlimit --hashlimit-above 10/sec -m comment --comment "wgjit-hold wg1" -c 7 7 -j DROP
"""  # noqa: E501
    assert limited_packets(listing, "wg0") == 1234
    assert limited_packets(listing, "wg2") == 0


# -- the verdicts the policy's outcomes call for -------------------------------------------------


def test_verdicts_for_outcomes() -> None:
    # fail-open: what is not known to be unwanted goes on to the device, which authenticates
    # every initiation itself
    for accept in (
        "installed", "already_installed", "own_interface", "timeout",
        "overloaded", "store_unavailable", "install_failed", "error",
    ):  # fmt: skip
        assert Outcome(accept).accepts
    for drop in ("unknown", "revoked", "forged", "replay", "bad_mac1", "bad_static",
                 "negative_cached", "duplicate", "malformed", "rate_limited"):  # fmt: skip
        assert not Outcome(drop).accepts


def _verdict(outcome: Outcome, key: PublicKey | None = None) -> Verdict:
    k = knock(b"x" * 148, 100.0)
    return Verdict(k, outcome, k, key)


def test_invert_initiates_back_after_the_delay_and_only_for_installs() -> None:
    timers: list[tuple[float, object]] = []
    submitted: list[Invert] = []
    mode = modes.InvertMode(
        object(),  # type: ignore[arg-type]  # the capture is not used by verdict()
        0.005,
        lambda when, cb: timers.append((when, cb)),
        submitted.append,
    )
    key = PrivateKey.generate().public_key()
    mode.verdict(_verdict(Outcome.ALREADY_INSTALLED, key))
    mode.verdict(_verdict(Outcome.UNKNOWN))
    assert timers == []
    mode.verdict(_verdict(Outcome.INSTALLED, key))
    [(when, cb)] = timers
    assert when == 100.005  # the knock's arrival + the delay
    cb()  # type: ignore[operator]
    assert [i.key for i in submitted] == [key]


def test_replay_reinjects_only_installs() -> None:
    sent: list[Knock] = []

    class Reinjector:
        sent_count = 0

        def send(self, k: Knock) -> None:
            sent.append(k)

    mode = modes.ReplayMode(object(), Reinjector(), EventLog(io.StringIO()))  # type: ignore[arg-type]
    for o in (Outcome.ALREADY_INSTALLED, Outcome.TIMEOUT, Outcome.REPLAY):
        mode.verdict(_verdict(o))
    assert sent == []
    v = _verdict(Outcome.INSTALLED)
    mode.verdict(v)
    assert sent == [v.knock]


def test_no_completion_mode_warns() -> None:
    warnings = GatewayConfig(completion="none").validate()
    assert any("never use in production" in w for w in warnings)


class _FakeNetlink:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def fileno(self) -> int:
        return 99

    def close(self) -> None:
        pass


def _queue_with(held: dict[int, float], reads: list[bytes] | None = None
                ) -> tuple[nq.NfQueue, _FakeNetlink]:  # fmt: skip
    """A queue holding `held` (packet id -> when read) whose socket reads `reads`, in order."""
    q = object.__new__(nq.NfQueue)
    sock = _FakeNetlink()
    if reads is not None:

        def recv(n: int) -> bytes:
            if not reads:
                raise BlockingIOError
            return reads.pop(0)

        sock.recv = recv  # type: ignore[attr-defined]
    q.queue_num, q.port, q.hold_timeout = 5, 51820, 1.0
    q.malformed = q.expired = q.accepted = q.dropped = q.overruns = q.batched = 0
    q._held, q._out, q._seq, q._sock = dict(held), [], 0, sock  # type: ignore[assignment]
    return q, sock


def _verdicts(sent: list[bytes], held: Iterable[int] = ()) -> list[tuple[int, int]]:
    """(verdict, packet id) of every verdict message in the sent datagrams; a batch verdict
    for id N stands for each id of `held` up to N without a verdict before it."""
    out: list[tuple[int, int]] = []
    for data in sent:
        pos = 0
        while pos < len(data):
            length, kind = struct.unpack_from("=IH", data, pos)
            verdict, pid = struct.unpack_from("!II", data, pos + 24)
            if kind & 0xFF == nq.NFQNL_MSG_VERDICT_BATCH:
                done = {p for _, p in out}
                out += [(verdict, p) for p in sorted(held) if p <= pid and p not in done]
            else:
                out.append((verdict, pid))
            pos += length
    return out


def test_no_packet_is_held_for_ever() -> None:
    q, sock = _queue_with({1: 10.0, 2: 10.5})
    assert q.next_deadline() == 11.0
    assert q.expire(10.9) == 0 and sock.sent == []
    assert q.expire(11.0) == 1
    assert _verdicts(sock.sent) == [(nq.NF_ACCEPT, 1)]  # released, not dropped
    assert q.next_deadline() == 11.5
    q.close()  # what is still held is released too (closing would make the kernel drop it)
    assert _verdicts(sock.sent) == [(nq.NF_ACCEPT, 1), (nq.NF_ACCEPT, 2)]


def test_hold_time_counts_from_when_the_kernel_queued_the_packet() -> None:
    """A packet the gateway reads late (it was busy) is released 1 s after the kernel's
    timestamp, not 1 s after the read; an implausible stamp falls back to the read time."""
    import time as _time

    payload = build_datagram(SRC, DST, b"\x01\x00\x00\x00" + bytes(144))
    wall = _time.time()
    late = packet_message(5, 1, 7, payload, (int(wall - 0.6), int((wall - 0.6) % 1 * 1e6)))
    future = packet_message(5, 2, 7, payload, (int(wall + 3600), 0))
    q, sock = _queue_with({}, [late, future])
    before = _time.monotonic()
    held = q.recv_batch()
    after = _time.monotonic()
    assert [h.packet_id for h in held] == [1, 2]
    assert before - 0.65 <= held[0].knock.received_at <= after - 0.55
    assert before <= held[1].knock.received_at <= after
    deadline = q.next_deadline()
    assert deadline is not None and deadline <= after + 0.45


def test_a_lone_packet_and_one_among_other_messages_read_the_same() -> None:
    """recv_batch() parses the usual datagram (one queued packet) in place and any other
    shape with parse_messages(): both give the same knocks; junk is dropped and counted."""
    payload = build_datagram(SRC, DST, b"\x01\x00\x00\x00" + bytes(144))
    ack = struct.pack("=IHHII", 36, nq.NLMSG_ERROR, 0, 5, 0) + struct.pack("=i", 0) + bytes(16)
    lone, among = packet_message(5, 1, 7, payload), packet_message(5, 2, 7, payload) + ack
    junk = packet_message(5, 3, 7, build_datagram(SRC, DST, b"\x02" + bytes(147)))  # a response
    cut = packet_message(5, 4, 7, payload)[:-8]  # shorter than its own length field
    q, sock = _queue_with({}, [lone, among, junk, cut, packet_message(5, 5, 7, payload)[:20]])
    held = q.recv_batch()
    assert [h.packet_id for h in held] == [1, 2]
    for h in held:
        assert (h.knock.source, h.knock.destination, h.knock.ifindex) == (SRC, DST, 7)
        assert h.knock.payload == payload[28:]
    assert q.malformed == 1 and _verdicts(sock.sent) == [(nq.NF_DROP, 3)]


def test_verdicts_are_sent_together_and_once() -> None:
    q, sock = _queue_with({7: 0.0, 8: 0.0})
    k = knock(bytes(148), 0.0)
    q.verdict(nq.Held(k, 7), True)
    q.verdict(nq.Held(k, 8), False)
    q.verdict(nq.Held(k, 8), True)  # a second verdict for the same packet is ignored
    assert sock.sent == []
    q.flush()
    assert len(sock.sent) == 1
    assert _verdicts(sock.sent) == [(nq.NF_ACCEPT, 7), (nq.NF_DROP, 8)]


def _kinds(sent: list[bytes]) -> list[int]:
    return [struct.unpack_from("=H", data, 4)[0] & 0xFF for data in sent]


def test_a_floods_drops_go_as_one_batch_verdict_when_nothing_older_waits() -> None:
    q, sock = _queue_with({5: 0.0, 6: 0.0, 7: 0.0, 9: 0.0})
    k = knock(bytes(148), 0.0)
    for pid in (6, 7, 9):
        q.verdict(nq.Held(k, pid), False)
    q.flush()  # 5 still waits: a batch up to 9 would drop it too
    assert _kinds(sock.sent) == [nq.NFQNL_MSG_VERDICT]
    assert _verdicts(sock.sent) == [(nq.NF_DROP, 6), (nq.NF_DROP, 7), (nq.NF_DROP, 9)]
    q._held.update({10: 0.0, 11: 0.0, 12: 0.0, 13: 0.0})
    for pid in (5, 10, 11):
        q.verdict(nq.Held(k, pid), False)
    q.flush()  # nothing older than 11 waits (12 and 13 are newer): one message
    assert _kinds(sock.sent[1:]) == [nq.NFQNL_MSG_VERDICT_BATCH]
    assert _verdicts(sock.sent[1:], [5, 10, 11]) == [(nq.NF_DROP, p) for p in (5, 10, 11)]
    assert q.batched == 1
    q.verdict(nq.Held(k, 12), False)
    q.verdict(nq.Held(k, 13), True)
    q.flush()  # mixed: one message each
    assert _verdicts(sock.sent[2:]) == [(nq.NF_DROP, 12), (nq.NF_ACCEPT, 13)]
    assert q.stats()["queue_dropped"] == 7 and q.stats()["queue_accepted"] == 1


def test_paced_releases_keep_order_and_rate_and_drops_go_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A herd's 200 ACCEPTs at once leave in a burst of RELEASE_BURST, then at the release
    rate, in verdict order; a DROP is not paced; the queue's 1 s release still applies."""
    clock = [100.0]
    monkeypatch.setattr(modes.time, "monotonic", lambda: clock[0])
    q, sock = _queue_with({i: 100.0 for i in range(201)})
    mode = modes.HoldMode(q, EventLog(io.StringIO()), None, release_rate=1000.0)
    k = knock(bytes(148), 100.0)
    for i in range(200):
        mode.verdict(Verdict(nq.Held(k, i), Outcome.INSTALLED, k))
    mode.verdict(Verdict(nq.Held(k, 200), Outcome.FORGED, k))
    mode.flush()
    burst = modes.RELEASE_BURST
    assert _verdicts(sock.sent, range(201)) == [(nq.NF_ACCEPT, i) for i in range(burst)] + [
        (nq.NF_DROP, 200)
    ]
    assert mode.stats()["queue_paced"] == 200 - burst
    deadline = mode.next_deadline()
    assert deadline is not None and deadline == pytest.approx(100.001)  # the next token
    clock[0] = 100.0505  # 50.5 ms at 1000/s: 50 more
    mode.tick(clock[0])
    released = [pid for v, pid in _verdicts(sock.sent, range(201)) if v == nq.NF_ACCEPT]
    assert released == list(range(burst + 50))
    clock[0] = 101.0  # the 1 s limit releases the rest, paced or not
    mode.tick(clock[0])
    released = [pid for v, pid in _verdicts(sock.sent, range(201)) if v == nq.NF_ACCEPT]
    assert sorted(released) == list(range(200)) and len(released) == 200
    assert mode.next_deadline() is None


def test_unpaced_hold_mode_releases_at_once() -> None:
    q, sock = _queue_with({i: 0.0 for i in range(200)})
    mode = modes.HoldMode(q, EventLog(io.StringIO()), None)
    k = knock(bytes(148), 0.0)
    for i in range(200):
        mode.verdict(Verdict(nq.Held(k, i), Outcome.INSTALLED, k))
    mode.flush()
    assert len(_verdicts(sock.sent, range(201))) == 200


# -- choosing the mode -------------------------------------------------------------------------


class _Dummy:
    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __enter__(self) -> _Dummy:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass


def _refuse(exc: Exception) -> type:
    class Refused:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise exc

    return Refused


def test_auto_falls_back_hold_then_replay_then_invert(monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib
    import errno

    from wgjit.capture.nfqueue import QueueError
    from wgjit.capture.replay import ReplayError

    monkeypatch.setattr(modes, "PacketCapture", _Dummy)
    monkeypatch.setattr(modes, "NfQueue", _refuse(QueueError(errno.EPERM, "no NFQUEUE here")))
    out = io.StringIO()

    def open_mode(stack: contextlib.ExitStack, mode: str) -> modes.Mode:
        return modes.open_mode(
            stack, mode, port=51820, queue_num=None, ifname="wg0", capture_interface=None,
            invert_delay=0.005, call_at=lambda w, c: None, submit=lambda e: None,
            log=EventLog(out),
        )  # fmt: skip

    with contextlib.ExitStack() as stack:
        monkeypatch.setattr(modes, "Reinjector", _Dummy)
        assert isinstance(open_mode(stack, "auto"), modes.ReplayMode)
        monkeypatch.setattr(modes, "Reinjector", _refuse(ReplayError(errno.EPERM, "no raw")))
        assert isinstance(open_mode(stack, "auto"), modes.InvertMode)
        with pytest.raises(modes.ModeError, match="--mode hold: no NFQUEUE here"):
            open_mode(stack, "hold")
    reasons = [parse_logfmt(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e["mode"]) for e in reasons] == [
        ("mode_unavailable", "hold"),
        ("mode_unavailable", "hold"),
        ("mode_unavailable", "replay"),
    ]
