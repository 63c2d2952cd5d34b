"""Handshake verification in worker processes: the X25519 of every knock off the loop's core.

The loop process keeps the policy and all its state, and does the cheap checks itself (header,
mac1, duplicates, cookies, rate limits); only the work that needs an X25519 comes here. A job is
one of two kinds:

- OPEN: a knock's packet. The worker decrypts the claimed static key (one X25519). If its own
  static-DH cache already holds that key (it authenticated it before), it finishes the
  authentication too, at no further X25519 cost, and answers VERIFIED; otherwise it answers
  OPENED with the claimed key and the handshake state (chaining key, hash), and stops: an
  unknown key costs a worker exactly one X25519.
- AUTH: a claimed key the policy knows (installed, or stored and on its way in), with the
  state from OPENED. The worker does the static-static DH (cached from then on) and the
  timestamp: VERIFIED or a reject. So with workers the loop's process does no X25519 at all.

Affinity. Before the first DH nobody knows the key, so OPEN jobs go to a worker chosen by the
knock's source (address and port: a client keeps both between rekeys, and a crowd behind one NAT
address still spreads over the workers by port). The AUTH job of a knock goes to the worker that
opened it, which then has the key's static DH cached, so the client's next rekeys from the same
source are VERIFIED in one job. (Routing AUTH by a hash of the key instead would keep the cache
warm in a worker that the next OPEN, routed by source, does not reach.) A worker at its in-flight
limit passes a job to the least busy worker with room (AUTH jobs carry their whole handshake
state, so any worker can do them; a cache miss costs one X25519 more).

Transport. Each worker is a fresh interpreter (`python -m wgjit.gateway.pool`, started with
subprocess: no fork of a threaded process) connected by a SOCK_SEQPACKET socket pair, whose
messages keep their boundaries: one message per batch of fixed-size records (struct), one send
per batch each way, nothing pickled. The gateway's private key goes to the worker once, as the
first message, never on a command line or in a log. Alternatives considered: multiprocessing
queues (a pickle and a lock per item, a feeder thread in the loop process); NFQUEUE
--queue-balance or PACKET_FANOUT, where each worker would capture its own share (the policy's
state - installed peers, rate limits, duplicates, pending look-ups - would then have to be
shared or split by key, which the kernel's fan-out cannot give before decryption).

Bounded: at most `inflight` jobs per worker (more go to another worker, or are refused: the
caller gives a fail-open verdict); a worker that dies, or answers nothing for `hang_timeout`
(`start_timeout` while it starts), is killed and started anew, and its in-flight jobs come back
as LOST (the caller gives them fail-open verdicts). One that dies before it is ready is started
again after a pause that doubles up to 30 s; a slot whose worker cannot be started (no
processes left) sends its share to the others until check() manages. close() ends and reaps
every worker (EOF on its socket; a worker also ends when the gateway dies).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from wgjit.handshake import (
    INITIATION_SIZE,
    BadMac1,
    BadStatic,
    BadTimestamp,
    HandshakeError,
    Malformed,
    Opened,
    Responder,
    Timestamp,
    Verified,
)
from wgjit.keys import PrivateKey, PublicKey

OPEN = 1
AUTH = 2
# job: kind, flags, ticket, packet, claimed static, chaining key, hash (the last three: AUTH)
_JOB = struct.Struct(f"<BBI{INITIATION_SIZE}s32s32s32s")
_MAC1_CHECKED = 1
# result: kind, reason, ticket, static, chaining key, hash, timestamp, sender index
_RESULT = struct.Struct("<BBI32s32s32s12sI")
R_OPENED = 1
R_VERIFIED = 2
R_REJECTED = 3
_REASONS: list[type[HandshakeError]] = [HandshakeError, Malformed, BadMac1, BadStatic,
                                        BadTimestamp]  # fmt: skip
_REASON_CODE = {cls: i for i, cls in enumerate(_REASONS)}
MAX_BATCH = 128  # jobs per message (~32 KB); a batch's results come back in one message
DEFAULT_INFLIGHT = 512
DEFAULT_HANG_TIMEOUT = 2.0
_KEY_MESSAGE = struct.Struct("<32sI")  # private key, static cache size
_HEADER = b"\x01\x00\x00\x00"
_READY = b"R"  # a worker's first message: it holds the key and takes jobs


class Lost:
    """The result of a job whose worker died or hung: it was not verified."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LOST"


LOST = Lost()
# what a job comes back with: the claimed key (OPEN of a key the worker has not authenticated
# before), the claimed key and its proof, a reason it is not an initiation for us, or LOST
Result = Opened | tuple[Opened, Verified] | HandshakeError | Lost


@dataclass(slots=True, eq=False)
class Job:
    """One knock's crypto. `context` is the caller's (the policy puts its effect there)."""

    packet: bytes = field(repr=False)
    affinity: int  # OPEN: hash of the source; AUTH: ignored (goes to `worker`)
    opened: Opened | None = None  # set: an AUTH job
    mac1_checked: bool = True
    context: object = field(default=None, repr=False)
    worker: int = -1  # set by submit()


def source_affinity(host: bytes, port: int) -> int:
    """The affinity of a knock from (packed address, port)."""
    return zlib.crc32(host, port)


@dataclass(slots=True)
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    inflight: dict[int, Job] = field(default_factory=dict)
    outbox: list[Job] = field(default_factory=list)
    # when the oldest unanswered batch was sent (monotonic), or None
    waiting_since: float | None = None
    started_at: float = 0.0
    ready: bool = False  # its _READY was read (until then a job may wait for its start)
    dead: bool = False  # it died and no successor could be started yet (check() tries again)


class VerifyPool:
    """`workers` worker processes verifying initiations for one gateway key."""

    def __init__(
        self,
        private_key: PrivateKey,
        workers: int,
        *,
        inflight: int = DEFAULT_INFLIGHT,
        hang_timeout: float = DEFAULT_HANG_TIMEOUT,
        static_cache_size: int = 65536,
        clock: Callable[[], float] = time.monotonic,
        start_timeout: float = 120.0,
        wait: bool = True,
    ) -> None:
        """Start the workers and (`wait`) wait until each holds the key and takes jobs; OSError
        if one does not within `start_timeout`. Without `wait`, call wait_ready() later: the
        workers start meanwhile (a gateway overlaps that with its own start-up)."""
        if workers < 1:
            raise ValueError("a pool needs at least one worker")
        self._key = private_key
        self._cache_size = static_cache_size
        self._limit = inflight
        self._hang = hang_timeout
        self._start_timeout = start_timeout
        # a slot whose worker died before it was ready: when to start it again, and the pause
        self._retry_at: dict[int, float] = {}
        self._backoff: dict[int, float] = {}
        self._clock = clock
        self._ticket = 0
        self._dying: list[subprocess.Popen[bytes]] = []
        self.restarts = 0
        self.lost = 0
        self._workers: list[_Worker] = []
        self._by_fd: dict[int, _Worker] = {}
        try:
            for i in range(workers):
                self._workers.append(self._start(i))
            if wait:
                self.wait_ready()
        except BaseException:
            self.close(timeout=0)
            raise
        self._by_fd = {w.sock.fileno(): w for w in self._workers}

    # -- workers --------------------------------------------------------------------------

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every worker has started (OSError if one does not within `timeout`).
        A fresh interpreter takes a while to import its crypto (~0.3 s, far more under
        emulation): the first knocks must not wait for that, so a gateway is ready only
        once its workers are."""
        if timeout is None:
            timeout = self._start_timeout
        deadline = time.monotonic() + timeout
        for w in self._workers:
            if w.ready or w.dead:
                continue
            w.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                ready = w.sock.recv(16)
            except TimeoutError:
                raise OSError(f"no answer from a worker within {timeout:g} s") from None
            finally:
                w.sock.setblocking(False)
            if ready != _READY:
                raise OSError("a worker exited at start")
            w.ready = True

    def _start(self, index: int) -> _Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "wgjit.gateway.pool", str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        with contextlib.suppress(OSError):  # room for the in-flight window (best effort)
            parent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        with contextlib.suppress(OSError):  # it died at once: found dead (and replaced) later
            parent.sendall(_KEY_MESSAGE.pack(self._key.raw, self._cache_size))
        parent.setblocking(False)
        return _Worker(index, proc, parent, started_at=self._clock())

    def _replace(self, w: _Worker) -> list[tuple[Job, Result]]:
        """Kill `w` and start its successor; `w`'s in-flight and queued jobs come back LOST.
        If no successor can be started (no memory, no processes left), the slot stays dead:
        jobs go to the other workers (or are refused) and check() tries again."""
        lost: list[tuple[Job, Result]] = [(j, LOST) for j in (*w.inflight.values(), *w.outbox)]
        w.inflight.clear()
        w.outbox.clear()
        self.lost += len(lost)
        now = self._clock()
        if not w.dead:
            self._by_fd.pop(w.sock.fileno(), None)
            w.sock.close()
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            self._dying.append(w.proc)
            w.dead = True
            if not w.ready:
                # it died before it could take jobs (a broken install, say): start it again
                # after a pause that doubles each time, not four times a second forever
                self._backoff[w.index] = min(2 * self._backoff.get(w.index, 0.5), 30.0)
                self._retry_at[w.index] = now + self._backoff[w.index]
        if now < self._retry_at.get(w.index, 0.0):
            return lost
        try:
            new = self._start(w.index)
        except OSError:
            return lost
        self.restarts += 1
        self._retry_at.pop(w.index, None)
        self._workers[w.index] = new
        self._by_fd[new.sock.fileno()] = new
        return lost

    def _reap(self) -> None:
        self._dying = [p for p in self._dying if p.poll() is None]

    @property
    def size(self) -> int:
        return len(self._workers)

    def fds(self) -> list[int]:
        """The sockets to watch for results (they change when a worker is replaced)."""
        return list(self._by_fd)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if not w.dead]

    @property
    def down(self) -> int:
        """Worker slots without a live worker (one could not be started yet)."""
        return sum(w.dead for w in self._workers)

    @property
    def inflight(self) -> int:
        return sum(len(w.inflight) + len(w.outbox) for w in self._workers)

    # -- jobs -----------------------------------------------------------------------------

    def submit(self, job: Job) -> bool:
        """Queue a job (sent at flush()). False: every worker it may go to is full."""
        workers = self._workers
        if job.opened is not None and 0 <= job.worker < len(workers):
            w = workers[job.worker]
        else:
            w = workers[job.affinity % len(workers)]
        if w.dead or len(w.inflight) + len(w.outbox) >= self._limit:
            # elsewhere: a cache miss (one X25519 more) rather than a refusal
            alive = [x for x in workers if not x.dead]
            if not alive:
                return False
            w = min(alive, key=lambda x: len(x.inflight) + len(x.outbox))
            if len(w.inflight) + len(w.outbox) >= self._limit:
                return False
        job.worker = w.index
        w.outbox.append(job)
        return True

    def flush(self) -> list[tuple[Job, Result]]:
        """Send every queued job, in batches; what comes back LOST (a worker that cannot
        take a message is replaced)."""
        lost: list[tuple[Job, Result]] = []
        now = self._clock()
        for w in list(self._workers):
            while w.outbox:
                batch, w.outbox = w.outbox[:MAX_BATCH], w.outbox[MAX_BATCH:]
                buf = bytearray(_JOB.size * len(batch))
                tickets = []
                for i, job in enumerate(batch):
                    self._ticket = t = (self._ticket + 1) & 0xFFFFFFFF
                    o = job.opened
                    _JOB.pack_into(
                        buf, i * _JOB.size,
                        AUTH if o is not None else OPEN,
                        _MAC1_CHECKED if job.mac1_checked else 0,
                        t, job.packet,
                        *((o.public_key.raw, o.chaining_key, o.hash) if o is not None
                          else (b"", b"", b"")),
                    )  # fmt: skip
                    tickets.append(t)
                try:
                    w.sock.send(buf)
                except BlockingIOError:  # it does not read: sent later (or it counts as hung)
                    w.outbox[:0] = batch
                    if w.waiting_since is None:
                        w.waiting_since = now
                    break
                except OSError:  # gone
                    w.outbox[:0] = batch
                    lost.extend(self._replace(w))
                    break
                for t, job in zip(tickets, batch, strict=True):
                    w.inflight[t] = job
                if w.waiting_since is None:
                    w.waiting_since = now
        return lost

    def read(self, fd: int) -> list[tuple[Job, Result]]:
        """The results waiting on `fd` (one of fds()); a worker found dead is replaced and
        its jobs come back LOST."""
        w = self._by_fd.get(fd)
        if w is None:
            return []
        out: list[tuple[Job, Result]] = []
        while True:
            try:
                data = w.sock.recv(_RESULT.size * MAX_BATCH)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:  # the worker is gone
                out.extend(self._replace(w))
                return out
            if data == _READY and not w.ready:
                w.ready = True
                self._backoff.pop(w.index, None)
                continue
            self._results(w, data, out)
        w.waiting_since = self._clock() if w.inflight else None
        return out

    def _results(self, w: _Worker, data: bytes, out: list[tuple[Job, Result]]) -> None:
        for off in range(0, len(data) - _RESULT.size + 1, _RESULT.size):
            kind, reason, ticket, static, ck, h, stamp, index = _RESULT.unpack_from(data, off)
            job = w.inflight.pop(ticket, None)
            if job is None:
                continue
            if kind == R_REJECTED:
                cls = _REASONS[reason] if reason < len(_REASONS) else HandshakeError
                out.append((job, cls("rejected by a verify worker")))
                continue
            opened = job.opened
            if opened is None:
                opened = Opened(PublicKey.trusted(static), job.packet, ck, h)
            if kind == R_VERIFIED:
                v = Verified(opened.public_key, Timestamp.trusted(stamp), index)
                out.append((job, (opened, v)))
            else:
                out.append((job, opened))

    def check(self) -> list[tuple[Job, Result]]:
        """Replace workers that died or answer nothing for hang_timeout; reap the dead."""
        now = self._clock()
        lost: list[tuple[Job, Result]] = []
        for w in list(self._workers):
            if w.dead:
                lost.extend(self._replace(w))  # start it again
                continue
            # (a worker still starting gets as long as a start may take: a fresh interpreter
            # on a busy or emulated machine takes seconds)
            limit = self._hang if w.ready else max(self._hang, self._start_timeout)
            hung = w.waiting_since is not None and now - w.waiting_since > limit
            if hung or w.proc.poll() is not None:
                lost.extend(self._replace(w))
        self._reap()
        lost.extend(self.flush())  # what a full socket held back
        return lost

    def close(self, timeout: float = 2.0) -> None:
        """End every worker (EOF, then a kill after `timeout`) and reap it."""
        for w in self._workers:
            if w.dead:
                continue
            w.sock.setblocking(True)
            with contextlib.suppress(OSError):
                w.sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        procs = [w.proc for w in self._workers if not w.dead] + self._dying
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for w in self._workers:
            w.sock.close()
        self._by_fd.clear()
        self._dying = []

    def __enter__(self) -> VerifyPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- synchronous use (tests, benchmarks) ----------------------------------------------

    def run(self, jobs: list[Job], timeout: float = 10.0) -> list[tuple[Job, Result]]:
        """Submit `jobs`, wait for all their results (in completion order)."""
        import selectors

        out: list[tuple[Job, Result]] = []
        want = 0
        for j in jobs:
            if not self.submit(j):
                raise RuntimeError("pool full")
            want += 1
        out.extend(self.flush())
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            while len(out) < want:
                left = deadline - time.monotonic()
                if left <= 0:
                    out.extend(self.check())
                    if len(out) < want:
                        raise TimeoutError(f"{want - len(out)} jobs unanswered")
                    break
                fds = self.fds()
                for fd in fds:
                    sel.register(fd, selectors.EVENT_READ)
                for key, _ in sel.select(min(left, 0.2)):
                    out.extend(self.read(key.fd))
                for fd in fds:
                    sel.unregister(fd)
                out.extend(self.check())
        return out


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def bench_pool(private_key: PrivateKey, workers: int, packets: list[bytes]
               ) -> Iterator[tuple[Callable[[], int], Callable[[], float]]]:  # fmt: skip
    """For benchmarks/verify.py: a callable that verifies `packets` through a pool of
    `workers` and returns how many it verified, and one that says how much CPU time the
    workers have used. The static DH is cached, as for installed peers rekeying (a first pass
    warms the workers' caches): each packet is one OPEN job, answered VERIFIED. Jobs are fed
    as the gateway's loop feeds them: results are read as they come and each frees room for a
    new job, up to two batches in flight per worker."""
    import selectors

    with VerifyPool(private_key, workers) as pool, selectors.DefaultSelector() as sel:
        affinity = [source_affinity(i.to_bytes(4, "big"), 51820) for i in range(len(packets))]
        window = 2 * MAX_BATCH * workers
        for fd in pool.fds():
            sel.register(fd, selectors.EVENT_READ)

        def one_pass(rounds: int = 4) -> int:
            # `rounds` times over the packets per pass: the pipeline fills and drains once
            verified = 0
            sent = answered = 0
            n = len(packets)
            total = n * rounds
            while answered < total:
                while sent < total and sent - answered < window:
                    i = sent % n
                    if not pool.submit(Job(packets[i], affinity[i])):
                        break
                    sent += 1
                if pool.flush():
                    raise RuntimeError("a verify worker died during the benchmark")
                for key, _ in sel.select(10.0):
                    for _, r in pool.read(key.fd):
                        answered += 1
                        verified += isinstance(r, tuple)
            return verified

        # warm: every worker authenticates its clients once (OPEN, then AUTH)
        for start in range(0, len(packets), MAX_BATCH):
            jobs = [Job(p, affinity[start + i])
                    for i, p in enumerate(packets[start : start + MAX_BATCH])]  # fmt: skip
            auth = [Job(j.packet, 0, r, worker=j.worker)
                    for j, r in pool.run(jobs) if isinstance(r, Opened)]  # fmt: skip
            pool.run(auth)
        if one_pass(1) != len(packets):
            raise RuntimeError("the pool did not verify every packet")
        pids = pool.pids()
        yield one_pass, lambda: sum(cpu_seconds(pid) for pid in pids)


# -- the worker process ------------------------------------------------------------------------


def _serve(sock: socket.socket) -> None:
    key, cache_size = _KEY_MESSAGE.unpack(sock.recv(_KEY_MESSAGE.size))
    responder = Responder(PrivateKey(key), cache_size)
    del key
    sock.sendall(_READY)
    open_raw, cached, auth = responder.open_raw, responder.cached, responder.authenticate_raw
    check_mac1 = responder.check_mac1
    job_unpack, pack, size = _JOB.unpack_from, _RESULT.pack_into, _RESULT.size
    empty = bytes(32)
    while data := sock.recv(_JOB.size * MAX_BATCH):
        n = len(data) // _JOB.size
        out = bytearray(size * n)
        for i in range(n):
            kind, flags, ticket, packet, static, ck, h = job_unpack(data, i * _JOB.size)
            try:
                if not flags & _MAC1_CHECKED:
                    check_mac1(packet)
                elif packet[:4] != _HEADER:
                    raise Malformed("not an initiation")
                if kind == OPEN:
                    static, ck, h = open_raw(packet)
                    if not cached(static):
                        pack(out, i * size, R_OPENED, 0, ticket, static, ck, h, b"", 0)
                        continue
                stamp, index = auth(static, packet, ck, h)
                pack(out, i * size, R_VERIFIED, 0, ticket, static, ck, h, stamp, index)
            except HandshakeError as e:
                code = _REASON_CODE.get(type(e), 0)
                pack(out, i * size, R_REJECTED, code, ticket, empty, empty, empty, b"", 0)
        sock.sendall(out)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m wgjit.gateway.pool FD (started by the gateway)", file=sys.stderr)
        return 2
    # the gateway's Ctrl-C reaches its whole process group: the worker ends when the gateway
    # closes its socket (or dies), not before the gateway has its results
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError, ConnectionResetError):
        _serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
