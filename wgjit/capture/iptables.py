"""The gateway's own NFQUEUE rules: one for iptables (IPv4), one for ip6tables (IPv6).

`rule_spec()` builds the rule (sans-IO). `QueueRules` inserts it at the top of the INPUT chain
and deletes it again, through the iptables commands; with a source limit, a hashlimit rule
above it drops what one address sends beyond the limit (`limit_spec()`) before it is queued.
Each rule carries a comment naming the gateway's interface, so a gateway restarted after a
crash first deletes whatever rules a previous run on the same interface left (never duplicates
them) and never touches other rules.

The rule queues only UDP datagrams to the listen port whose payload is exactly 148 bytes and
starts with 01 00 00 00 (a handshake initiation), with `--queue-bypass`: while nothing listens
on the queue, packets pass as if the rule were not there. IPv4: any header length, unfragmented
only. IPv6: only UDP directly after the fixed 40-byte header; extension headers are NOT
followed, so an initiation carrying one is not queued (it reaches the device untouched, which
answers it only if the peer is already installed).
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable

COMMENT_PREFIX = "wgjit-hold"
CHAIN = "INPUT"
MAX_SOURCE_LIMIT = 1_000_000  # hashlimit's own ceiling for a rate a second

# u32 programs (see iptables-extensions(8), u32): words are read big-endian at byte offsets.
# IPv4: fragment offset and MF flag zero; UDP length (at IHL+4) 156 = 8 + 148; first payload
# word (at IHL+8) 01 00 00 00.
U32_V4 = "4&0x3FFF=0 && 0>>22&0x3C@4>>16=0x9C && 0>>22&0x3C@8=0x01000000"
# IPv6: next header (byte 6) UDP; UDP length (at 44) 156; first payload word (at 48).
U32_V6 = "4>>8&0xFF=0x11 && 44>>16=0x9C && 48=0x01000000"

Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


class RuleError(RuntimeError):
    """The rule could not be installed; the message says why."""


def comment(interface: str) -> str:
    return f"{COMMENT_PREFIX} {interface}"


def _initiations(port: int, *, ipv6: bool) -> list[str]:
    """The match both rules share: handshake initiations to `port` (protocol, port, u32)."""
    return ["-p", "udp", "--dport", str(port), "-m", "u32", "--u32", U32_V6 if ipv6 else U32_V4]


def _check_ids(port: int, queue_num: int) -> None:
    if not 0 < port <= 0xFFFF or not 0 <= queue_num <= 0xFFFF:
        raise ValueError(f"bad port {port} or queue number {queue_num}")


def rule_spec(port: int, queue_num: int, interface: str, *, ipv6: bool) -> list[str]:
    """The rule's match and target, as iptables arguments after `-I CHAIN`."""
    _check_ids(port, queue_num)
    return [
        *_initiations(port, ipv6=ipv6),
        "-m", "comment", "--comment", comment(interface),
        "-j", "NFQUEUE", "--queue-num", str(queue_num), "--queue-bypass",
    ]  # fmt: skip


def limit_spec(port: int, queue_num: int, interface: str, limit: int, *, ipv6: bool
               ) -> list[str]:  # fmt: skip
    """The rule above the queue's that drops, in the kernel, what one source (an IPv4
    address, an IPv6 /64) sends beyond `limit` initiations a second (a second's worth may
    come at once): a flood from one address then costs the gateway nothing."""
    if not 0 < limit <= MAX_SOURCE_LIMIT:
        raise ValueError(f"source limit {limit} is not in 1..{MAX_SOURCE_LIMIT}")
    _check_ids(port, queue_num)
    return [
        *_initiations(port, ipv6=ipv6),
        "-m", "hashlimit", "--hashlimit-above", f"{limit}/sec", "--hashlimit-burst", str(limit),
        "--hashlimit-mode", "srcip", "--hashlimit-srcmask", "64" if ipv6 else "32",
        "--hashlimit-name", f"wgjit-{queue_num}",
        "-m", "comment", "--comment", comment(interface),
        "-j", "DROP",
    ]  # fmt: skip


def limited_packets(listing: str, interface: str) -> int:
    """What this interface's limit rules dropped, from `iptables -S CHAIN -v` output (its
    rules carry `-c PACKETS BYTES`)."""
    total = 0
    for rest in own_rules(listing, interface):
        if rest[-2:] == ["-j", "DROP"] and "-c" in rest:
            with contextlib.suppress(ValueError, IndexError):
                total += int(rest[rest.index("-c") + 1])
    return total


def own_rules(listing: str, interface: str) -> list[list[str]]:
    """The rules in `iptables -S CHAIN` output that carry this interface's comment, each as
    the argument list that follows `-A CHAIN` (ready for `-D CHAIN`)."""
    out: list[list[str]] = []
    for line in listing.splitlines():
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        if len(words) < 2 or words[0] != "-A" or words[1] != CHAIN:
            continue
        rest = words[2:]
        for i, w in enumerate(rest[:-1]):
            if w == "--comment" and rest[i + 1] == comment(interface):
                out.append(rest)
                break
    return out


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True)


class QueueRules:
    """Installs the IPv4 and IPv6 rules in this network namespace; `remove()` deletes them.
    With a `source_limit`, a limit rule goes above each queue rule (see limit_spec); if the
    kernel cannot have one (no xt_hashlimit), `limit_error` says why and the queue rules
    stand alone."""

    def __init__(self, port: int, queue_num: int, interface: str, *, source_limit: int = 0,
                 run: Runner = _run) -> None:  # fmt: skip
        self.port = port
        self.queue_num = queue_num
        self.interface = interface
        self.source_limit = source_limit
        self._run = run
        self.installed: list[list[str]] = []  # [tool, *spec] of each rule in place
        self.removed_stale = 0
        self.limit_error: str | None = None

    def _tool(self, ipv6: bool) -> str:
        name = "ip6tables" if ipv6 else "iptables"
        if self._run is _run and shutil.which(name) is None:
            raise RuleError(f"{name} not found; install it: apt-get install iptables")
        return name

    def install(self) -> None:
        """Remove rules a previous run left, then insert ours (IPv4 and IPv6)."""
        try:
            for ipv6 in (False, True):
                tool = self._tool(ipv6)
                self.removed_stale += self._remove_own(tool, ipv6)
                spec = rule_spec(self.port, self.queue_num, self.interface, ipv6=ipv6)
                p = self._run([tool, "-w", "-I", CHAIN, "1", *spec])
                if p.returncode != 0:
                    raise RuleError(f"{tool} could not insert the NFQUEUE rule: {p.stderr.strip()}")
                self.installed.append([tool, *spec])
                if self.source_limit and self.limit_error is None:
                    limit = limit_spec(self.port, self.queue_num, self.interface,
                                       self.source_limit, ipv6=ipv6)  # fmt: skip
                    p = self._run([tool, "-w", "-I", CHAIN, "1", *limit])
                    if p.returncode == 0:
                        self.installed.append([tool, *limit])
                    else:
                        self.limit_error = f"{tool}: {p.stderr.strip() or 'failed'}"
        except BaseException:
            self.remove()
            raise

    def limited(self) -> int:
        """Initiations the limit rules have dropped so far (runs the iptables commands)."""
        total = 0
        for tool in {r[0] for r in self.installed if r[-1] == "DROP"}:
            p = self._run([tool, "-w", "-S", CHAIN, "-v"])
            if p.returncode == 0:
                total += limited_packets(p.stdout, self.interface)
        return total

    def _remove_own(self, tool: str, ipv6: bool) -> int:
        """Delete every rule of this interface in the chain; returns how many."""
        removed = 0
        listing = self._run([tool, "-w", "-S", CHAIN])
        if listing.returncode == 0:
            for rest in own_rules(listing.stdout, self.interface):
                if self._run([tool, "-w", "-D", CHAIN, *rest]).returncode == 0:
                    removed += 1
            return removed
        # no listing: delete at least our exact rule, as often as it is there
        spec = rule_spec(self.port, self.queue_num, self.interface, ipv6=ipv6)
        for _ in range(16):
            if self._run([tool, "-w", "-D", CHAIN, *spec]).returncode != 0:
                break
            removed += 1
        return removed

    def remove(self) -> None:
        """Delete the rules `install()` inserted (one command each); never raises. Rules a
        crashed run left are the next `install()`'s business."""
        for tool, *spec in reversed(self.installed):
            with contextlib.suppress(OSError):
                self._run([tool, "-w", "-D", CHAIN, *spec])
        self.installed.clear()


class LimitCounter:
    """What the limit rules dropped, read every `interval` seconds on a daemon thread (the
    iptables commands fork: the loop must not wait for them). `value`: the last reading."""

    def __init__(self, rules: QueueRules, interval: float = 5.0) -> None:
        self.value = 0
        self._rules = rules
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._count, name="wgjit-limits", daemon=True)
        self._thread.start()

    def _count(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(OSError):
                self.value = self._rules.limited()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self._interval)
