"""Hooks: the listener only enqueues; hook threads run real commands (sh) with the peer in
their environment, in order per peer, with a timeout that kills the whole process group."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from wgjit.addr import parse_networks
from wgjit.events import EventLog, parse_logfmt
from wgjit.gateway.hooks import HookError, HookRunner, parse_command, run_with_timeout
from wgjit.keys import PrivateKey
from wgjit.store import Peer


def _peer(name: str, ips: str = "100.65.0.2/32") -> Peer:
    return Peer(name, PrivateKey.generate().public_key(), parse_networks(ips))


def _log() -> tuple[EventLog, io.StringIO]:
    stream = io.StringIO()
    return EventLog(stream), stream


def _events(stream: io.StringIO, event: str) -> list[dict[str, str]]:
    return [e for e in map(parse_logfmt, stream.getvalue().splitlines()) if e["event"] == event]


def _env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _wait_for(path: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().endswith("\n"):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.01)


def _dead(pid: int, within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # a zombie is dead too
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.01)
    return False


def _dump_env(tmp_path: Path) -> list[str]:
    """A hook that writes its environment to DIR/EVENT-PEER (complete once it exists)."""
    f = f'"{tmp_path}/$WGJIT_EVENT-$WGJIT_PEER"'
    return ["sh", "-c", f"env > {f}.tmp && mv {f}.tmp {f}"]


def test_parse_command() -> None:
    assert parse_command("sh -c 'ip route add \"$X\"'") == ["sh", "-c", 'ip route add "$X"']
    assert parse_command("/bin/true --flag") == ["/bin/true", "--flag"]
    for bad, says in (("", "empty"), ("  ", "empty"), ("sh -c 'unclosed", "quotation"),
                      ("no-such-program-wgjit x", "no such executable")):  # fmt: skip
        with pytest.raises(HookError, match=says):
            parse_command(bad)


def test_install_and_evict_get_the_peer_in_their_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WGJIT_STORE", "postgresql://u:secret@db/wgjit")
    monkeypatch.setenv("PGPASSWORD", "secret")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("HOOK_TEST_KEPT", "yes")
    log, _ = _log()
    cmd = _dump_env(tmp_path)
    runner = HookRunner({"install": cmd, "evict": cmd}, log, interface="wg7", gateway_id="gw-a")
    log.subscribe(runner)
    p = _peer("alice", "100.65.0.2/32,fd00::2/128")
    key = p.public_key.short()
    log.info("install", peer="alice", key=key, endpoint="[2001:db8::7]:41641", took_ms=1.0,
             _peer=p)  # fmt: skip
    _wait_for(tmp_path / "install-alice")
    log.info("evict", reason="idle", peer="alice", key=key, idle_s=301)
    _wait_for(tmp_path / "evict-alice")
    runner.close()
    inst = _env_file(tmp_path / "install-alice")
    assert {k: v for k, v in inst.items() if k.startswith("WGJIT_")} == {
        "WGJIT_EVENT": "install",
        "WGJIT_INTERFACE": "wg7",
        "WGJIT_GATEWAY_ID": "gw-a",
        "WGJIT_PEER": "alice",
        "WGJIT_KEY": p.public_key.b64(),
        "WGJIT_ALLOWED_IPS": "100.65.0.2/32,fd00::2/128",
        "WGJIT_ENDPOINT": "[2001:db8::7]:41641",
    }
    assert inst["HOOK_TEST_KEPT"] == "yes"
    assert "PGPASSWORD" not in inst and "NOTIFY_SOCKET" not in inst
    ev = _env_file(tmp_path / "evict-alice")
    # the evict hook is told what the install hook was told (to withdraw what it announced)
    assert {k: v for k, v in ev.items() if k.startswith("WGJIT_")} == {
        "WGJIT_EVENT": "evict",
        "WGJIT_INTERFACE": "wg7",
        "WGJIT_GATEWAY_ID": "gw-a",
        "WGJIT_PEER": "alice",
        "WGJIT_KEY": p.public_key.b64(),
        "WGJIT_ALLOWED_IPS": "100.65.0.2/32,fd00::2/128",
        "WGJIT_ENDPOINT": "[2001:db8::7]:41641",
        "WGJIT_REASON": "idle",
    }


def test_without_the_peer_in_the_event_the_store_is_asked_by_name(tmp_path: Path) -> None:
    log, _ = _log()
    alice, bob_now = _peer("alice"), _peer("bob", "100.65.0.3/32")
    asked: list[str] = []

    def lookup(name: str) -> Peer | None:
        asked.append(name)
        if name == "-":
            raise ValueError("invalid peer name '-'")
        return {"alice": alice, "bob": bob_now}.get(name)

    cmd = _dump_env(tmp_path)
    runner = HookRunner({"install": cmd, "evict": cmd}, log, interface="wg0", lookup=lookup)
    log.subscribe(runner)
    log.info("install", peer="alice", key=alice.public_key.short(), endpoint="192.0.2.1:5")
    # bob was rotated since: the stored key is not the one installed, so no key is guessed
    log.info("install", peer="bob", key="AAAAAAAA", endpoint="192.0.2.2:5")
    # a store that fails (down, or a name it refuses): the hook runs all the same
    log.info("evict", reason="reconcile", peer="-", key="BBBBBBBB")
    _wait_for(tmp_path / "install-alice")
    _wait_for(tmp_path / "install-bob")
    _wait_for(tmp_path / "evict--")
    runner.close()
    assert _env_file(tmp_path / "evict--")["WGJIT_REASON"] == "reconcile"
    a = _env_file(tmp_path / "install-alice")
    assert a["WGJIT_KEY"] == alice.public_key.b64()
    assert a["WGJIT_ALLOWED_IPS"] == "100.65.0.2/32"
    b = _env_file(tmp_path / "install-bob")
    assert "WGJIT_KEY" not in b and "WGJIT_ALLOWED_IPS" not in b
    assert b["WGJIT_ENDPOINT"] == "192.0.2.2:5" and b["WGJIT_PEER"] == "bob"
    assert sorted(asked) == ["-", "alice", "bob"]


def test_a_hung_hook_never_blocks_the_emitting_thread_and_drops_are_counted(
    tmp_path: Path,
) -> None:
    log, stream = _log()
    runner = HookRunner({"install": ["sleep", "30"]}, log, interface="wg0", threads=2,
                        queue_size=5, timeout=30)  # fmt: skip
    log.subscribe(runner)
    t = time.monotonic()
    for i in range(1000):
        log.info("install", peer=f"p{i}", key=f"k{i:07d}", endpoint="192.0.2.1:5")
    took = time.monotonic() - t
    # 1000 log lines (to a StringIO) and enqueues: ~50 ms; a loaded CI machine may take a
    # second or two, but waiting for a hook would take 30 s
    assert took < 5, took
    # two hooks running (one per thread), 5 waiting per thread; the rest dropped
    assert 1000 - 12 <= runner.counts["dropped"] <= 1000 - 10
    t = time.monotonic()
    runner.close(wait=0.3)  # the hooks still running then are killed
    assert time.monotonic() - t < 2
    dropped = _events(stream, "hook_dropped")
    assert dropped and int(dropped[-1]["total"]) == runner.counts["dropped"]
    assert runner.counts["run"] + runner.counts["dropped"] == 1000
    assert 1 <= runner.counts["run"] <= 2 and runner.counts["failed"] == runner.counts["run"]
    assert {e["why"] for e in _events(stream, "hook_failed")} == {
        "killed: the gateway is stopping"}  # fmt: skip


def test_timeout_kills_the_process_group_and_is_logged(tmp_path: Path) -> None:
    log, stream = _log()
    pids = tmp_path / "pids"
    # sh and its child sleep: both must die
    cmd = ["sh", "-c", f'sleep 30 & echo "$$ $!" > {pids}; echo about to hang; wait']
    runner = HookRunner({"evict": cmd}, log, interface="wg0", timeout=0.5)
    log.subscribe(runner)
    t = time.monotonic()
    log.info("evict", reason="revoked", peer="alice", key="abcdefgh")
    _wait_for(pids)
    runner.close(wait=5)
    assert time.monotonic() - t < 3
    for pid in map(int, pids.read_text().split()):
        assert _dead(pid), pid
    (failed,) = _events(stream, "hook_failed")
    assert failed["hook"] == "evict" and failed["peer"] == "alice" and failed["key"] == "abcdefgh"
    assert failed["timeout_s"] == "0.5" and failed["output"] == "about to hang"
    assert runner.counts == {"run": 1, "failed": 1, "timed_out": 1, "dropped": 0}


def test_failures_are_logged_rate_limited() -> None:
    now = [100.0]
    log, stream = _log()
    runner = HookRunner({"install": ["sh", "-c", "echo no route >&2; exit 3"]}, log,
                        interface="wg0", threads=1, clock=lambda: now[0])  # fmt: skip
    log.subscribe(runner)
    for i in range(5):
        log.info("install", peer=f"p{i}", key="samekey0", endpoint="192.0.2.1:5")
    deadline = time.monotonic() + 10
    while runner.counts["failed"] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    now[0] += 1.0
    log.info("install", peer="p5", key="samekey0", endpoint="192.0.2.1:5")
    runner.close()
    lines = _events(stream, "hook_failed")
    assert [(e["peer"], e.get("suppressed")) for e in lines] == [("p0", None), ("p5", "4")]
    assert lines[0]["status"] == "3" and lines[0]["output"] == "no route"
    assert runner.counts["failed"] == 6


def test_one_peer_s_hooks_run_in_order(tmp_path: Path) -> None:
    log, _ = _log()
    out = tmp_path / "order"
    cmd = ["sh", "-c", f'echo "$WGJIT_PEER $WGJIT_EVENT" >> {out}']
    runner = HookRunner({"install": cmd, "evict": cmd}, log, interface="wg0", threads=4)
    log.subscribe(runner)
    for round_ in range(3):
        for i in range(8):
            log.info("install", peer=f"p{i}", key=f"key{i:05d}", endpoint="192.0.2.1:5")
            log.info("evict", reason="idle", peer=f"p{i}", key=f"key{i:05d}")
        del round_
    runner.close(wait=20)
    lines = out.read_text().splitlines()
    assert len(lines) == 48
    for i in range(8):
        assert [ln.split()[1] for ln in lines if ln.split()[0] == f"p{i}"] == [
            "install", "evict"] * 3  # fmt: skip


def test_events_without_a_hook_and_after_close_are_ignored() -> None:
    log, _ = _log()
    runner = HookRunner({"install": ["true"]}, log, interface="wg0")
    log.subscribe(runner)
    log.info("evict", reason="idle", peer="a", key="k")
    log.info("reject", reason="unknown", key="k")
    runner.close()
    log.info("install", peer="a", key="k", endpoint="192.0.2.1:5")
    assert runner.counts == {"run": 0, "failed": 0, "timed_out": 0, "dropped": 0}
    with pytest.raises(ValueError, match="no such hook event"):
        HookRunner({"connect": ["true"]}, log, interface="wg0")


def test_run_with_timeout_returns_when_the_hook_exits_not_when_its_children_do() -> None:
    t = time.monotonic()
    rc, out = run_with_timeout(["sh", "-c", "sleep 3 >/dev/null 2>&1 & echo started"],
                               dict(os.environ), 10)  # fmt: skip
    assert (rc, out) == (0, "started")
    rc, out = run_with_timeout(["sh", "-c", "sleep 3 & echo holds the pipe"], dict(os.environ), 10)
    assert (rc, out) == (0, "holds the pipe")
    assert time.monotonic() - t < 2
