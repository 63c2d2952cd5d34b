"""Hooks: operator commands run when the gateway installs or evicts a peer (to announce or
withdraw its routes with BIRD or `ip route`, tell a monitoring system, ...).

The gateway's events reach `HookRunner.__call__` on the thread that emits them, which is the
packet loop: there it only puts a job in a bounded queue (full: dropped and counted, logged
later by a hook thread). A few hook threads run the commands, each in a session (process
group) of its own with a timeout after which the whole group is killed. A hung or slow hook
costs hook threads, never a packet.

The jobs of one peer (by its key) always go to the same thread, so its install and evict
hooks run in the order they happened. A hook gets the peer in its environment (`ENV_*` below);
its output is read (the last few hundred bytes are kept for the failure log line).
"""

from __future__ import annotations

import contextlib
import os
import queue
import selectors
import shlex
import shutil
import signal
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wgjit.addr import format_networks
from wgjit.errors import WgjitError
from wgjit.events import EventLog
from wgjit.keys import PublicKey
from wgjit.store import Peer

EVENTS = ("install", "evict")
DEFAULT_TIMEOUT = 10.0
THREADS = 4
# jobs waiting per hook thread; more are dropped (and counted, and logged)
QUEUE_PER_THREAD = 256
# at most one hook_failed / hook_dropped line per this many seconds; the ones left out are
# counted in the next line's `suppressed=`
LOG_INTERVAL = 1.0
_STOPPING = "killed: the gateway is stopping"
# how much of a failed hook's output (stdout and stderr together) its log line shows
OUTPUT_TAIL = 200

# the gateway's environment variables a hook does not get (besides WGJIT_*): the store's
# credentials, and systemd's socket (a hook is not the service)
_HIDDEN = frozenset({"PGPASSWORD", "NOTIFY_SOCKET"})
# what a hook finds in its environment, besides the rest of the gateway's
ENV_EVENT = "WGJIT_EVENT"  # install | evict
ENV_INTERFACE = "WGJIT_INTERFACE"  # the gateway's WireGuard interface
ENV_GATEWAY_ID = "WGJIT_GATEWAY_ID"
ENV_PEER = "WGJIT_PEER"  # the peer's name
ENV_KEY = "WGJIT_KEY"  # its public key, base64 (unset if unknown; see README)
ENV_ALLOWED_IPS = "WGJIT_ALLOWED_IPS"  # comma-separated CIDRs, as installed
ENV_ENDPOINT = "WGJIT_ENDPOINT"  # ADDR:PORT ([ADDR]:PORT for IPv6) it knocked from
ENV_REASON = "WGJIT_REASON"  # evict: idle, revoked, disabled, expired, unknown, handoff, ...
ENV_FROM_GATEWAY = "WGJIT_FROM_GATEWAY"  # install: the gateway that held the peer before


class HookError(WgjitError, ValueError):
    """A hook command that cannot run (empty, bad quoting, no such program)."""


def parse_command(text: str) -> list[str]:
    """`text` split like a shell would split words (no shell runs it: write `sh -c '...'` for
    one); the program must exist now (an absolute path, or found on PATH)."""
    try:
        argv = shlex.split(text)
    except ValueError as e:
        raise HookError(f"{text!r}: {e}") from None
    if not argv:
        raise HookError("empty command")
    if shutil.which(argv[0]) is None:
        raise HookError(f"{argv[0]!r}: no such executable program (PATH or an absolute path)")
    return argv


@dataclass(slots=True)
class _Known:
    """What the install hook of a peer was told; its evict hook gets the same."""

    key: str
    allowed_ips: str
    endpoint: str


@dataclass(slots=True)
class _Job:
    event: str
    fields: dict[str, Any]


class _RateLimited:
    """One log line per LOG_INTERVAL at most; the rest counted into the next one."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._next = 0.0
        self._suppressed = 0
        self._lock = threading.Lock()

    def allow(self) -> int | None:
        """None: stay silent; else log now, with this many lines left out since the last."""
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._suppressed += 1
                return None
            self._next = now + LOG_INTERVAL
            n, self._suppressed = self._suppressed, 0
            return n


class HookRunner:
    """An EventLog listener (`log.subscribe(runner)`) that runs `commands[event]` (argv lists,
    from parse_command) for install and evict events. `lookup(name)` finds a stored peer for
    events that carry no `_peer` (its full key and allowed IPs); it runs on a hook thread.
    `close()` lets queued hooks run for a while, then kills what still runs."""

    def __init__(
        self,
        commands: Mapping[str, Sequence[str]],
        log: EventLog,
        *,
        interface: str,
        gateway_id: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        lookup: Callable[[str], Peer | None] | None = None,
        threads: int = THREADS,
        queue_size: int = QUEUE_PER_THREAD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        unknown = set(commands) - set(EVENTS)
        if unknown:
            raise ValueError(f"no such hook event: {', '.join(sorted(unknown))}")
        self.commands = {event: list(argv) for event, argv in commands.items() if argv}
        self.log = log
        self.interface = interface
        self.gateway_id = gateway_id
        self.timeout = timeout
        self.lookup = lookup
        self._clock = clock
        self._queues: list[queue.Queue[_Job | None]] = [
            queue.Queue(queue_size) for _ in range(max(1, threads))
        ]
        self._stop_at: float | None = None
        self._counts_lock = threading.Lock()
        self.counts = {"run": 0, "failed": 0, "timed_out": 0, "dropped": 0}
        self._dropped_logged = 0
        self._running: dict[int, int] = {}  # hook thread -> the process group it runs
        self._fail_log = _RateLimited(clock)
        self._drop_log = _RateLimited(clock)
        base = {
            k: v for k, v in os.environ.items() if not k.startswith("WGJIT_") and k not in _HIDDEN
        }
        base[ENV_INTERFACE] = interface
        if gateway_id:
            base[ENV_GATEWAY_ID] = gateway_id
        self._base_env = base
        self._threads = [
            threading.Thread(target=self._work, args=(q,), name=f"wgjit-hook-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        if self.commands:
            for t in self._threads:
                t.start()

    # -- on the emitting thread (the packet loop): take note, nothing else ------------------

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        if event not in self.commands or self._stop_at is not None:
            return
        key = fields.get("key")
        shard = zlib.crc32(str(key).encode()) % len(self._queues) if key else 0
        try:
            self._queues[shard].put_nowait(_Job(event, fields))
        except queue.Full:
            with self._counts_lock:
                self.counts["dropped"] += 1

    # -- hook threads -----------------------------------------------------------------------

    def _work(self, q: queue.Queue[_Job | None]) -> None:
        known: dict[str, _Known] = {}  # by short key: this thread's peers (see __call__)
        while True:
            if self._stop_at is None:
                job = q.get()
            else:
                try:
                    job = q.get_nowait()
                except queue.Empty:
                    return
            if job is None:
                return
            self._report_drops()
            try:
                self._run_job(job, known)
            except Exception as e:  # a hook thread must survive anything a job does
                self._failed(job, error=f"{type(e).__name__}: {e}")

    def _run_job(self, job: _Job, known: dict[str, _Known]) -> None:
        left = self.timeout
        if self._stop_at is not None:
            left = min(left, self._stop_at - self._clock())
            if left <= 0:
                with self._counts_lock:
                    self.counts["dropped"] += 1
                return
        env = self._environment(job, known)
        argv = self.commands[job.event]
        started = self._clock()
        me = threading.get_ident()

        def running(pid: int) -> None:
            with self._counts_lock:
                self._running[me] = pid

        try:
            rc, tail = run_with_timeout(argv, env, left, running)
        except OSError as e:
            self._failed(job, error=f"cannot run {argv[0]}: {e.strerror or e}")
            return
        finally:
            with self._counts_lock:
                self._running.pop(me, None)
        with self._counts_lock:
            self.counts["run"] += 1
        took = round((self._clock() - started) * 1000, 1)
        if rc is None:
            with self._counts_lock:
                self.counts["timed_out"] += 1
            # a hook started while the gateway stops has only what is left of close()'s wait
            stopping = self._stop_at is not None and left < self.timeout
            self._failed(job, timeout_s=round(left, 3), output=tail,
                         why=_STOPPING if stopping else None)  # fmt: skip
        elif rc != 0:
            stopping = rc == -signal.SIGKILL and self._stop_at is not None
            self._failed(job, status=rc, took_ms=took, output=tail,
                         why=_STOPPING if stopping else None)  # fmt: skip
        else:
            self.log.debug("hook_done", hook=job.event, peer=job.fields.get("peer"), took_ms=took)

    def _environment(self, job: _Job, known: dict[str, _Known]) -> dict[str, str]:
        f = job.fields
        name = str(f.get("peer") or "")
        short = str(f.get("key") or "")
        env = dict(self._base_env)
        env[ENV_EVENT] = job.event
        env[ENV_PEER] = name
        what: _Known | None = None
        peer = f.get("_peer")
        if isinstance(peer, Peer):
            what = _Known(peer.public_key.b64(), format_networks(peer.allowed_ips), "")
        elif job.event == "evict":
            what = known.pop(short, None)
        if what is None and self.lookup is not None and name:
            # off the packet path: a store call on this hook thread; the short key tells a
            # renamed or rotated peer (or another peer by that name) apart
            try:
                found = self.lookup(name)
            except Exception:  # the store down, a name it refuses ("-"): run without
                found = None
            if found is not None and found.public_key.short() == short:
                what = _Known(found.public_key.b64(), format_networks(found.allowed_ips), "")
        if job.event == "install":
            endpoint = str(f.get("endpoint") or "")
            if what is not None:
                what.endpoint = endpoint
                if "evict" in self.commands:
                    known[short] = what
            env[ENV_ENDPOINT] = endpoint
            if f.get("from_gateway"):
                env[ENV_FROM_GATEWAY] = str(f["from_gateway"])
        else:
            env[ENV_REASON] = str(f.get("reason") or "")
            if what is not None and what.endpoint:
                env[ENV_ENDPOINT] = what.endpoint
        if what is not None:
            env[ENV_KEY] = what.key
            env[ENV_ALLOWED_IPS] = what.allowed_ips
        elif isinstance(f.get("_key"), PublicKey):
            env[ENV_KEY] = f["_key"].b64()  # a peer the store no longer has: its key at least
        return env

    # -- logging ----------------------------------------------------------------------------

    def _failed(self, job: _Job, **fields: Any) -> None:
        with self._counts_lock:
            self.counts["failed"] += 1
        suppressed = self._fail_log.allow()
        if suppressed is None:
            return
        self.log.warning(
            "hook_failed",
            hook=job.event,
            peer=job.fields.get("peer"),
            key=job.fields.get("key"),
            **{k: v for k, v in fields.items() if v not in (None, "")},
            suppressed=suppressed or None,
        )

    def _report_drops(self, force: bool = False) -> None:
        with self._counts_lock:
            dropped = self.counts["dropped"]
        if dropped == self._dropped_logged:
            return
        if self._drop_log.allow() is None and not force:
            return
        with self._counts_lock:
            new = dropped - self._dropped_logged
            self._dropped_logged = dropped
        if new > 0:
            self.log.warning("hook_dropped", dropped=new, total=dropped,
                             why="hook queue full: hooks are slower than events")  # fmt: skip

    def stats(self) -> dict[str, int]:
        with self._counts_lock:
            return {f"hooks_{k}": v for k, v in self.counts.items()}

    # -- stopping ---------------------------------------------------------------------------

    def close(self, wait: float = 5.0) -> None:
        """Run what is queued for at most `wait` seconds (a hook still running then is
        killed, what is left is dropped), then stop the hook threads."""
        if self._stop_at is not None:
            return
        self._stop_at = self._clock() + wait
        for q in self._queues:
            with contextlib.suppress(queue.Full):
                q.put_nowait(None)  # full: the thread sees _stop_at once it has drained it
        if not self.commands:
            return
        deadline = time.monotonic() + wait
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        # hooks started before close() have their own timeout: stop them now
        with self._counts_lock:
            groups = list(self._running.values())
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for t in self._threads:
            t.join(1.0)
        self._report_drops(force=True)
        with self._counts_lock:
            counts = dict(self.counts)
        if counts["failed"] or counts["dropped"]:
            self.log.info("hooks", **counts)


def run_with_timeout(
    argv: Sequence[str],
    env: Mapping[str, str],
    timeout: float,
    started: Callable[[int], None] | None = None,
) -> tuple[int | None, str]:
    """Run `argv` (no shell) in a new session; its exit status (None: timed out, its whole
    process group killed) and the last OUTPUT_TAIL characters of its output. Returns when the
    process exits, even if something it started in the background still holds the output.
    `started(pid)` is called once it runs (its process group is `pid`)."""
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(
        list(argv),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: a timeout kills all of it
        close_fds=True,
    )
    assert proc.stdout is not None
    if started is not None:
        started(proc.pid)
    out = proc.stdout.fileno()
    os.set_blocking(out, False)
    tail = b""
    rc: int | None = None
    try:
        pidfd: int | None = os.pidfd_open(proc.pid)
    except OSError:
        pidfd = None  # old kernel: poll for the exit instead
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(out, selectors.EVENT_READ, "out")
            if pidfd is not None:
                sel.register(pidfd, selectors.EVENT_READ, "exit")
            while rc is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                ready = sel.select(left if pidfd is not None else min(left, 0.05))
                for k, _ in ready:
                    if k.data == "out":
                        chunk = _read(out)
                        if chunk is None:
                            continue
                        if not chunk:
                            sel.unregister(out)  # EOF; wait for the exit
                        tail = (tail + chunk)[-OUTPUT_TAIL * 4 :]
                rc = proc.poll()
            if rc is not None:
                while chunk := _read(out):  # what it wrote just before it exited
                    tail = (tail + chunk)[-OUTPUT_TAIL * 4 :]
    finally:
        if pidfd is not None:
            os.close(pidfd)
        if rc is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    text = tail.decode(errors="replace").strip()
    text = " ".join(text.splitlines()[-3:])[-OUTPUT_TAIL:]
    return rc, text


def _read(fd: int) -> bytes | None:
    """None: nothing to read now; b"": EOF."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None
