"""PacketCapture on real kernel sockets: two network namespaces joined by a veth pair.

The capture runs in namespace A (a child process under `ip netns exec`), datagrams come from
namespace B. Needs root and iproute2; namespaces are removed by name even when a test fails.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
PORT = 51820
V4_A, V4_B = "198.18.97.1", "198.18.97.2"
V6_A, V6_B = "fd00:97::1", "fd00:97::2"
INIT = "01000000" + "ab" * 144  # hex of a 148-byte type-1 message


def _require_root_and_ip() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "capture tests need root (network namespaces, AF_PACKET): run them with sudo",
            pytrace=False,
        )
    if shutil.which("ip") is None:
        pytest.fail(
            "`ip` not found: apt-get install --no-install-recommends iproute2", pytrace=False
        )


def _ip(*argv: str, check: bool = True) -> str:
    p = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"ip {' '.join(argv)} failed: {p.stderr.strip()}")
    return p.stdout


@dataclass
class Pair:
    a: str  # namespace names
    b: str
    veth_a: str
    veth_b: str
    ifindex_a: int  # of veth_a, inside a


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    _require_root_and_ip()
    pid = os.getpid()
    a, b = f"wjt-cap-a-{pid}", f"wjt-cap-b-{pid}"
    va, vb = f"wjca{pid}", f"wjcb{pid}"  # <= 15 characters
    try:
        for ns in (a, b):
            _ip("netns", "del", ns, check=False)  # a leftover from a crashed run with our pid
            _ip("netns", "add", ns)
        _ip("link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
        _ip("-n", a, "addr", "add", f"{V4_A}/24", "dev", va)
        _ip("-n", b, "addr", "add", f"{V4_B}/24", "dev", vb)
        _ip("-n", a, "addr", "add", f"{V6_A}/64", "dev", va, "nodad")
        _ip("-n", b, "addr", "add", f"{V6_B}/64", "dev", vb, "nodad")
        for ns, dev in ((a, va), (b, vb), (a, "lo"), (b, "lo")):
            _ip("-n", ns, "link", "set", dev, "up")
        link_a = json.loads(_ip("-n", a, "-j", "link", "show", "dev", va))[0]
        # static neighbours: no resolution queue, so datagrams arrive in the order they are sent
        _ip("-n", b, "neigh", "replace", V4_A, "lladdr", link_a["address"], "dev", vb,
            "nud", "permanent")  # fmt: skip
        _ip("-n", b, "neigh", "replace", V6_A, "lladdr", link_a["address"], "dev", vb,
            "nud", "permanent")  # fmt: skip
        yield Pair(a, b, va, vb, int(link_a["ifindex"]))
    finally:
        for ns in (a, b):
            _ip("netns", "del", ns, check=False)


CAPTURER = r"""
import json, select, sys
from wgjit.capture.afpacket import PacketCapture, CaptureError
iface = sys.argv[2] or None
try:
    cap = PacketCapture(int(sys.argv[1]), interface=iface)
except CaptureError as e:
    print(json.dumps({"error": str(e)}), flush=True)
    sys.exit(3)
with cap:
    print(json.dumps({"ready": True}), flush=True)
    while True:
        r, _, _ = select.select([cap, sys.stdin], [], [])
        if cap in r:
            for k in cap.recv_batch():
                print(json.dumps({"source": str(k.source), "destination": str(k.destination),
                                  "ifindex": k.ifindex, "payload": k.payload.hex()}), flush=True)
        if sys.stdin in r and not sys.stdin.buffer.read1(1):
            packets, drops = cap.stats()
            print(json.dumps({"packets": packets, "drops": drops}), flush=True)
            break
"""

SENDER = r"""
import json, os, socket, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one CPU: one backlog, no reordering
for family, src, sport, dst, dport, payload in json.loads(sys.argv[1]):
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.bind((src, sport))
        s.sendto(bytes.fromhex(payload), (dst, dport))
"""


class Capturer:
    """A PacketCapture in a namespace, reporting each knock as a JSON line."""

    def __init__(self, ns: str, interface: str | None = None, port: int = PORT) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", CAPTURER, str(port), interface or ""],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.knocks: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def next(self, deadline: float) -> dict[str, Any]:
        try:
            msg = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError("timed out waiting for the capture process") from None
        if msg is None:
            self.proc.wait(5)
            assert self.proc.stderr is not None
            raise AssertionError(f"capture process exited: {self.proc.stderr.read().decode()}")
        return msg

    def wait_ready(self, timeout: float = 10.0) -> None:
        msg = self.next(time.monotonic() + timeout)
        assert msg == {"ready": True}, msg

    def wait_for(self, sources: set[str], timeout: float = 5.0) -> None:
        """Collect knocks until one from each of `sources` has been seen."""
        deadline = time.monotonic() + timeout
        while not sources <= {k["source"] for k in self.knocks}:
            msg = self.next(deadline)
            assert "source" in msg, msg
            self.knocks.append(msg)

    def stop(self) -> dict[str, int]:
        """Ends the capture; returns its final stats (reading any knocks still reported)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        deadline = time.monotonic() + 5
        while "packets" not in (msg := self.next(deadline)):
            self.knocks.append(msg)
        assert self.proc.wait(5) == 0
        return msg

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def capturers() -> Iterator[list[Capturer]]:
    started: list[Capturer] = []
    yield started
    for c in started:
        c.kill()


def send(ns: str, datagrams: list[tuple[int, str, int, str, int, str]]) -> None:
    """(family, src, sport, dst, dport, payload hex) datagrams, in order, from namespace ns."""
    p = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", SENDER, json.dumps(datagrams)],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr


def test_captures_initiations_and_nothing_else(pair: Pair, capturers: list[Capturer]) -> None:
    cap = Capturer(pair.a)
    capturers.append(cap)
    cap.wait_ready()
    v4 = (4, V4_B)
    v6 = (6, V6_B)
    decoys = [
        (*v4, 40010, V4_A, PORT, "02000000" + "ab" * 144),  # 148 bytes of type 2
        (*v6, 40011, V6_A, PORT, "02000000" + "ab" * 144),
        (*v4, 40012, V4_A, PORT, INIT[:-2]),  # 147 bytes
        (*v6, 40013, V6_A, PORT, INIT[:-2]),
        (*v4, 40014, V4_A, PORT, INIT + "00"),  # 149 bytes
        (*v4, 40015, V4_A, PORT + 1, INIT),  # type 1 to another port
        (*v6, 40016, V6_A, PORT + 1, INIT),
        (*v4, 40017, V4_A, 9, INIT),
        (*v4, 40018, V4_A, PORT, "01000000" + "00" * 88),  # type 1 at response size
    ]
    wanted = [(*v4, 40001, V4_A, PORT, INIT), (*v6, 40002, V6_A, PORT, INIT)]
    # a last knock per family: once both are seen, everything sent earlier has been read
    sentinels = [(*v4, 40099, V4_A, PORT, INIT), (*v6, 40099, V6_A, PORT, INIT)]
    send(pair.b, decoys + wanted + sentinels)
    cap.wait_for({f"{V4_B}:40099", f"[{V6_B}]:40099"})
    stats = cap.stop()

    got = sorted((k["source"], k["destination"]) for k in cap.knocks)
    assert got == sorted(
        [
            (f"{V4_B}:40001", f"{V4_A}:{PORT}"),
            (f"[{V6_B}]:40002", f"[{V6_A}]:{PORT}"),
            (f"{V4_B}:40099", f"{V4_A}:{PORT}"),
            (f"[{V6_B}]:40099", f"[{V6_A}]:{PORT}"),
        ]
    )
    assert {k["payload"] for k in cap.knocks} == {INIT}
    assert {k["ifindex"] for k in cap.knocks} == {pair.ifindex_a}
    assert stats == {"packets": 4, "drops": 0}  # the decoys never passed the filter


def test_loopback_knock_is_captured_once_not_as_outgoing(
    pair: Pair, capturers: list[Capturer]
) -> None:
    """On lo every datagram passes twice (outgoing, then incoming): only one knock may result."""
    cap = Capturer(pair.a)
    capturers.append(cap)
    cap.wait_ready()
    send(pair.a, [(4, "127.0.0.1", 40001, "127.0.0.1", PORT, INIT),
                  (4, "127.0.0.1", 40099, "127.0.0.1", PORT, INIT)])  # fmt: skip
    cap.wait_for({"127.0.0.1:40099"})
    cap.stop()
    assert [k["source"] for k in cap.knocks] == ["127.0.0.1:40001", "127.0.0.1:40099"]
    assert {k["ifindex"] for k in cap.knocks} == {1}


def test_bound_to_one_interface(pair: Pair, capturers: list[Capturer]) -> None:
    on_lo = Capturer(pair.a, interface="lo")
    on_veth = Capturer(pair.a, interface=pair.veth_a)
    capturers += [on_lo, on_veth]
    on_lo.wait_ready()
    on_veth.wait_ready()
    send(pair.b, [(4, V4_B, 40001, V4_A, PORT, INIT), (6, V6_B, 40002, V6_A, PORT, INIT)])
    send(pair.a, [(4, "127.0.0.1", 40003, "127.0.0.1", PORT, INIT)])
    on_veth.wait_for({f"{V4_B}:40001", f"[{V6_B}]:40002"})
    on_lo.wait_for({"127.0.0.1:40003"})
    on_veth.stop()
    on_lo.stop()
    assert [k["source"] for k in on_lo.knocks] == ["127.0.0.1:40003"]
    assert len(on_veth.knocks) == 2


def test_unknown_interface_is_a_clear_error(pair: Pair, capturers: list[Capturer]) -> None:
    cap = Capturer(pair.a, interface="wjt-no-such")
    capturers.append(cap)
    msg = cap.next(time.monotonic() + 10)
    assert msg == {"error": "no network interface named 'wjt-no-such' to capture on"}


def test_without_cap_net_raw_the_error_says_so(pair: Pair) -> None:
    if shutil.which("setpriv") is None:
        pytest.fail("`setpriv` not found: apt-get install util-linux", pytrace=False)
    code = (
        "from wgjit.capture.afpacket import PacketCapture, CaptureError\n"
        "try:\n    PacketCapture(51820)\n"
        "except CaptureError as e:\n    print(e)\n"
    )
    drop = ["setpriv", "--bounding-set=-net_raw", "--inh-caps=-net_raw"]
    p = subprocess.run(
        [*drop, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("capturing needs root or CAP_NET_RAW"), p.stdout
