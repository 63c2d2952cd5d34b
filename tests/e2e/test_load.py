"""Under load, at CI scale (issue 10): a herd, a flood, a cookie round. Correctness, not timing.

Real wireguard-go gateway in hold mode, SQLite store, `benchmarks/loadgen.py` (run as a
process of its own, in a namespace of its own plugged into the lab's bridge) and stock
wireguard-go clients. Each test starts its own gateway on its own store, with an empty device.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.loadgen import make_keys, read_keys
from wgjit.lab import Client, GatewayProcess, Host, Lab, wait_for

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
N_CLIENTS = 5


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lb:
        lb.add_gateway()
        for _ in range(N_CLIENTS):
            lb.add_client()
        yield lb


def gw_host(lab: Lab) -> Host:
    assert lab.gateway is not None
    return lab.gateway


@pytest.fixture
def store_url(tmp_path: Path, lab: Lab) -> str:
    lab.reset()  # every test starts with an empty device
    return f"sqlite:///{tmp_path / 'peers.db'}"


def wgjit(store_url: str, *args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "wgjit", "--store", store_url, *args],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr


def stored_keys(store_url: str, tmp_path: Path, n: int) -> Path:
    """`n` loadgen keys, imported into the store the way an operator would."""
    keys = tmp_path / "lg.keys"
    csv = make_keys(n, keys)
    assert keys.stat().st_mode & 0o777 == 0o600
    wgjit(store_url, "peer", "import", str(csv))
    return keys


def add_client(store_url: str, c: Client, name: str) -> None:
    wgjit(store_url, "peer", "add", name, "--allowed-ips", f"{c.tunnel_ip}/32",
          "--public-key", c.public_key.b64())  # fmt: skip


def loadgen(lab: Lab, tmp_path: Path, *args: str, timeout: float = 60) -> dict[str, object]:
    gw = gw_host(lab)
    out = tmp_path / "loadgen.json"
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.loadgen", "--gateway-netns", gw.ns,
         "--gateway-key", gw.public_key.b64(), "--json", str(out), "--seed", "10", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=timeout,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    print(p.stdout)
    report: dict[str, object] = json.loads(out.read_text())
    return report


def stats(g: GatewayProcess) -> dict[str, str]:
    before = len(g.events("stats"))
    g.proc.send_signal(signal.SIGUSR1)
    wait_for("stats line", lambda: len(g.events("stats")) > before)
    return g.events("stats")[-1]


def rss_kb(g: GatewayProcess) -> int:
    # `ip netns exec` execs the gateway in place: the pid is the gateway's
    for line in Path(f"/proc/{g.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def public_keys(keys: Path) -> set[str]:
    return {k.public_key().b64() for k in read_keys(keys)}


@pytest.fixture
def gateway_factory(lab: Lab, store_url: str) -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for g in started:
        assert g.stop() == 0, "gateway did not stop cleanly:\n" + "\n".join(g.lines[-20:])


def test_herd_of_500(lab: Lab, store_url: str, tmp_path: Path,
                     gateway_factory: list[GatewayProcess]) -> None:  # fmt: skip
    """500 stored peers knock within 1 s: every one answered (with a client's retries),
    exactly those installed."""
    keys = stored_keys(store_url, tmp_path, 500)
    g = lab.start_gateway(store_url, "--mode", "hold")
    gateway_factory.append(g)
    r = loadgen(lab, tmp_path, "--keys", str(keys), "--clients", "500", "--spread", "1")
    assert r["answered"] == 500, r
    received = r["received"]
    assert isinstance(received, dict)
    assert received.get("response_unmatched", 0) == 0, r
    device = set(gw_host(lab).peers())
    assert device == public_keys(keys)  # nobody else, nobody unknown
    answered = r["answered_keys"]
    assert isinstance(answered, list) and set(answered) == device
    s = stats(g)
    assert int(s["installed_now"]) == r["answered"] == 500, s
    assert "unknown" not in s, s


def test_crowd_behind_three_addresses(lab: Lab, store_url: str, tmp_path: Path,
                                      gateway_factory: list[GatewayProcess]) -> None:  # fmt: skip
    """300 stored peers behind 3 addresses (carrier-grade NAT) knock within 1 s: 100 a
    second from one address is over the per-source limit (20/s), which applies only under
    load, as in the kernel. Every one is answered, none rate-limited, nobody else installed."""
    keys = stored_keys(store_url, tmp_path, 300)
    g = lab.start_gateway(store_url, "--mode", "hold")
    gateway_factory.append(g)
    r = loadgen(lab, tmp_path, "--keys", str(keys), "--clients", "300", "--addresses", "3",
                "--spread", "1")  # fmt: skip
    assert r["answered"] == 300, r
    assert set(gw_host(lab).peers()) == public_keys(keys)
    s = stats(g)
    assert int(s["installed_now"]) == 300, s
    assert "rate_limited" not in s and "unknown" not in s, s


def test_paced_releases_lose_nobody(lab: Lab, store_url: str, tmp_path: Path,
                                    gateway_factory: list[GatewayProcess]) -> None:  # fmt: skip
    """A herd released at a pace far below its arrival (--release-rate 40): releases wait
    their turn (some past the queue's 1 s limit, which then lets them go), and still every
    stored peer is installed and answered, and nobody else."""
    keys = stored_keys(store_url, tmp_path, 200)
    g = lab.start_gateway(store_url, "--mode", "hold", "--release-rate", "40")
    gateway_factory.append(g)
    r = loadgen(lab, tmp_path, "--keys", str(keys), "--clients", "200", "--spread", "0.5")
    assert r["answered"] == 200, r
    assert set(gw_host(lab).peers()) == public_keys(keys)
    s = stats(g)
    assert int(s["queue_paced"]) > 0 and int(s["queue_paced_max"]) > 64, s
    assert int(s["installed_now"]) == 200, s


def test_windowed_releases_lose_nobody(lab: Lab, store_url: str, tmp_path: Path,
                                       gateway_factory: list[GatewayProcess]) -> None:  # fmt: skip
    """A herd released through a small window (--release-window 2): releases wait for the
    device's answers, seen leaving the gateway (on the bridge and on its port: each counted
    once), and still every stored peer is installed and answered, and nobody else; the window
    was never exceeded and the device sent no cookie replies."""
    keys = stored_keys(store_url, tmp_path, 300)
    g = lab.start_gateway(store_url, "--mode", "hold", "--release-window", "2")
    gateway_factory.append(g)
    assert g.events("ready")[-1]["release_window"] == "2"
    assert not g.events("release_window_unavailable")
    r = loadgen(lab, tmp_path, "--keys", str(keys), "--clients", "300", "--spread", "0.3")
    assert r["answered"] == 300, r
    assert set(gw_host(lab).peers()) == public_keys(keys)
    s = stats(g)
    print(s)
    assert int(s["installed_now"]) == 300, s
    assert int(s["queue_paced"]) > 0, s  # the window held some back
    assert 0 < int(s["release_inflight_max"]) <= 2, s
    # every answered client's response was seen and matched to its release, once (late
    # answers, after their release timed out, included)
    assert 300 <= int(s["device_answers"]) <= int(s["queue_accepted"]), s
    assert int(s["device_cookies"]) == 0, s


HERD = 2000  # over 0.2 s: enough to pass wireguard-go's own mark in every run here


def test_releases_the_device_cookies_are_sent_again(lab: Lab, store_url: str, tmp_path: Path,
                                                    gateway_factory: list[GatewayProcess]
                                                    ) -> None:  # fmt: skip
    """A window far over wireguard-go's own under-load mark (128 waiting): a herd's releases
    reach it in bursts and it answers some with cookie replies. The gateway sends those
    initiations again (raw socket, through `lo`), each copy comes back through the queue and
    passes unjudged (none is taken for a duplicate and dropped), and still every stored peer
    is installed and answered, and nobody else. (What the re-sends are worth to clients is
    measured on the 10 000 herd: docs/benchmarks.md, "Device cookies re-sent".)"""
    keys = stored_keys(store_url, tmp_path, HERD)
    g = lab.start_gateway(store_url, "--mode", "hold", "--release-window", "4096")
    gateway_factory.append(g)
    r = loadgen(lab, tmp_path, "--keys", str(keys), "--clients", str(HERD), "--spread", "0.2")
    assert r["answered"] == HERD, r
    assert set(gw_host(lab).peers()) == public_keys(keys)
    s = stats(g)
    print(s, r["answered_by_attempt"])
    cookied, resent = int(s["device_cookies"]), int(s["device_cookies_resent"])
    assert cookied > 0, f"the device never went under load: {s}"
    assert 0 < resent <= cookied and int(s["reinjected"]) > 0, s
    assert "duplicate" not in s and "unknown" not in s, s


def test_flood_while_clients_connect(lab: Lab, store_url: str, tmp_path: Path,
                                     gateway_factory: list[GatewayProcess]) -> None:  # fmt: skip
    """5 s of unknown keys, bad mac1, malformed packets and spoofed forgeries of stored keys at
    a few thousand pkt/s: five stock clients still connect, the forged keys and unknown keys
    are never installed, repeated bodies cost no budget, the gateway's memory stays bounded."""
    keys = stored_keys(store_url, tmp_path, 64)  # the forgeries' victims, never knocking
    for i, c in enumerate(lab.clients):
        add_client(store_url, c, f"client-{i}")
    g = lab.start_gateway(store_url, "--mode", "hold")
    gateway_factory.append(g)
    rss_before = rss_kb(g)
    gw = gw_host(lab)
    rtts: dict[int, float | None] = {}

    def connect(i: int, c: Client) -> None:
        # 12 s: the client's own retries (5 s apart) count; a stock client keeps trying
        rtts[i] = c.ping(gw.tunnel_ip, timeout=12)

    result: dict[str, object] = {}

    def flood() -> None:
        result.update(loadgen(lab, tmp_path, "--keys", str(keys),
                              "--flood", "unknown,bad_mac1,spoofed,malformed",
                              "--flood-rate", "3000", "--flood-seconds", "5"))  # fmt: skip

    f = threading.Thread(target=flood)
    f.start()
    wait_for("the flood to begin", lambda: stats(g).get("bad_mac1"), timeout=15)
    threads = [threading.Thread(target=connect, args=(i, c)) for i, c in enumerate(lab.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    f.join()
    rss_after = rss_kb(g)
    s = stats(g)
    print(f"\nfirst pings during the flood: {rtts}\nRSS {rss_before} -> {rss_after} kB\n{s}")
    assert all(rtts[i] is not None for i in range(N_CLIENTS)), rtts
    sent = result["sent"]
    assert isinstance(sent, dict) and sent["spoofed"] > 1000, result
    assert int(s["bad_mac1"]) >= 1000, s
    assert int(s["forged"]) + int(s.get("timeout", 0)) + int(s.get("cookie", 0)) > 0, s
    # the flood resends 64 forgeries and 64 made-up keys under fresh sender indexes: repeats
    # are judged from memory, and nothing but the first of each spends the admission budget
    assert int(s.get("repeated_bodies", 0)) > 1000, s
    assert not s.get("rate_limited"), s
    device = set(gw.peers())
    assert device == {c.public_key.b64() for c in lab.clients}, "only the clients installed"
    assert device.isdisjoint(public_keys(keys))
    received = result["received"]
    assert isinstance(received, dict) and not received.get("response_to_flood"), result
    assert rss_after - rss_before < 50_000, f"RSS grew by {rss_after - rss_before} kB"


def test_cookie_round(lab: Lab, store_url: str, tmp_path: Path,
                      gateway_factory: list[GatewayProcess]) -> None:  # fmt: skip
    """Always under load: a stock client gets a cookie reply, retries with mac2 and is
    admitted; so are the load generator's clients, which follow cookies the same way."""
    alice = lab.clients[0]
    add_client(store_url, alice, "alice")
    keys = stored_keys(store_url, tmp_path, 20)
    g = lab.start_gateway(store_url, "--mode", "hold", "--testing-always-under-load")
    gateway_factory.append(g)
    assert any("never use in production" in line for line in g.lines)
    gw = gw_host(lab)
    # one cookie round is one client retry (5 s + jitter); allow a second round, as WireGuard
    # itself may need it (a cookie reply lost or arriving after the retry was sent)
    rtt = alice.ping(gw.tunnel_ip, timeout=20)
    if rtt is None:
        alice_wg = alice.wg("show", alice.ifname, "dump")
        pytest.fail(
            f"the client never got in after its cookie: {stats(g)}\n{alice_wg}\n"
            + "\n".join(g.lines[-30:])
        )
    print(f"\nfirst ping through the cookie round: {rtt} ms")
    s = stats(g)
    assert int(s["cookie"]) >= 1 and int(s["installed"]) >= 1, s
    assert alice.public_key.b64() in gw.peers()
    r = loadgen(lab, tmp_path, "--keys", str(keys), "--clients", "20", "--spread", "0.2")
    assert r["answered"] == 20 and r["peers_with_cookie"] == 20, r
    assert r["answered_first_attempt"] == 0, "without mac2 nobody is admitted under load"
    s = stats(g)
    assert int(s["installed_now"]) == 21, s


def test_late_knocks_get_cookies_only_while_knocks_cost_work(
    lab: Lab, store_url: str, tmp_path: Path, gateway_factory: list[GatewayProcess]
) -> None:
    """With --load-delay 10 us every knock is late. A stock client knocking when nothing
    costly goes on (no installs, no refused keys) is no sign of load: no cookie reply, so its
    first initiation is answered (a cookie would cost it its 5 s retry). Then 400 made-up
    keys, each new: once about 16 are refused after an X25519 and a look-up, late knocks mean
    load and the rest get cookie replies, with no X25519."""
    c = lab.clients[0]
    add_client(store_url, c, "client-0")
    g = lab.start_gateway(store_url, "--mode", "hold", "--load-delay", "0.00001")
    gateway_factory.append(g)
    gw = gw_host(lab)
    assert c.ping(gw.tunnel_ip, timeout=4) is not None
    s = stats(g)
    assert "cookie" not in s and "under_load" not in s and int(s["running_late"]) >= 1, s
    r = loadgen(lab, tmp_path, "--flood", "unknown", "--flood-pool", "400",
                "--flood-rate", "200", "--flood-seconds", "2")  # fmt: skip
    s = stats(g)
    print(f"\n{r}\n{s}")
    assert [e["sign"] for e in g.events("under_load")] == ["queue_delay"], s
    assert int(s["unknown"]) < 400 and int(s["cookie"]) > 0, s  # ~16 judged at a cost
    received = r["received"]
    assert isinstance(received, dict) and received.get("cookie_reply_to_flood"), r
    assert set(gw.peers()) == {c.public_key.b64()}, "only the client installed"


def test_a_flood_of_fresh_bodies_spends_the_budget_then_gets_cookies(
    lab: Lab, store_url: str, tmp_path: Path, gateway_factory: list[GatewayProcess]
) -> None:
    """Made-up keys in 2 000 distinct initiations (no copies to drop for free) at 1 500 pkt/s
    against an admission budget of 100/s: the spent budget puts the gateway under load, the
    flood's knocks over it are dropped (never passed to the device) and then answered with
    cookie replies instead of any X25519; a stock client still gets in (its cookie round
    included), and no made-up key is installed."""
    c = lab.clients[0]
    add_client(store_url, c, "client-0")
    g = lab.start_gateway(store_url, "--mode", "hold", "--admission-rate", "100")
    gateway_factory.append(g)
    gw = gw_host(lab)
    result: dict[str, object] = {}

    def flood() -> None:
        result.update(loadgen(lab, tmp_path, "--flood", "unknown", "--flood-pool", "2000",
                              "--flood-rate", "1500", "--flood-seconds", "6"))  # fmt: skip

    f = threading.Thread(target=flood)
    f.start()
    wait_for("the budget to run out", lambda: g.events("under_load", sign="admission_budget"),
             timeout=30)  # fmt: skip
    rtt = c.ping(gw.tunnel_ip, timeout=15)
    f.join()
    s = stats(g)
    print(f"\nfirst ping during the flood: {rtt}\n{s}")
    assert rtt is not None
    assert int(s.get("rate_limited", 0)) > 0 and int(s.get("cookie", 0)) > 0, s
    assert int(s.get("queue_dropped", 0)) >= int(s["rate_limited"]), "rate-limited passed on"
    received = result["received"]
    assert isinstance(received, dict) and received.get("cookie_reply_to_flood"), result
    assert not received.get("response_to_flood"), result
    assert set(gw.peers()) == {c.public_key.b64()}, "only the client installed"


def test_the_kernel_drops_what_one_source_sends_beyond_the_source_limit(
    lab: Lab, store_url: str, tmp_path: Path, gateway_factory: list[GatewayProcess]
) -> None:
    """--source-limit 100: a bad-mac1 flood of 1 500 pkt/s from one address reaches the
    gateway at ~100/s (the kernel's hashlimit rule drops the rest before the queue, and the
    gateway counts them), while a stock client from another address gets in at once."""
    c = lab.clients[0]
    add_client(store_url, c, "client-0")
    g = lab.start_gateway(store_url, "--mode", "hold", "--source-limit", "100")
    gateway_factory.append(g)
    assert g.events("ready")[0]["source_limit"] == "100"
    gw = gw_host(lab)
    r = loadgen(lab, tmp_path, "--flood", "bad_mac1", "--flood-rate", "1500",
                "--flood-seconds", "3")  # fmt: skip
    sent = r["sent"]
    assert isinstance(sent, dict) and sent["bad_mac1"] > 3000, r
    assert c.ping(gw.tunnel_ip, timeout=4) is not None
    judged = int(stats(g)["bad_mac1"])
    # a second's burst, then 100/s over the ~3 s of the flood (slack for the timing)
    assert 100 <= judged <= 100 + 100 * 5, judged
    # read every 5 s on a thread of its own: wait for the reading that covers the flood
    wait_for("the kernel's drops counted", lambda: int(stats(g).get("source_limited", 0))
             >= sent["bad_mac1"] - judged - 100, timeout=15)  # fmt: skip
    assert set(gw.peers()) == {c.public_key.b64()}
