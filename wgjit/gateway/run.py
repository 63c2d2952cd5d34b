"""The gateway's loop: the policy (core.py) wired to a completion mode, workers and signals.

Start-up, in this order: read the device, reconcile it with the store (run to completion
before anything is captured), then open the mode's capture (hold: its iptables rules go
live only now), then serve. While serving, one thread runs a reactor: it reads knocks,
hands them to the policy, gives verdicts, and sends every store and device call to worker
threads (store: `store_threads`, device: one, in order) whose results come back as events.
Nothing on that thread waits for the store or the device, so a slow database, a locked row or
a big sweep never holds a packet. SIGTERM/SIGINT/SIGHUP stop it cleanly; SIGUSR1 logs the
counters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from types import FrameType

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from wgjit.cookie import CookieChecker
from wgjit.device import Device
from wgjit.errors import WgjitError
from wgjit.events import EventLog
from wgjit.gateway import memory
from wgjit.gateway.core import GatewayConfig, Policy
from wgjit.gateway.effects import (
    DEVICE,
    STORE,
    SWEEP,
    Admit,
    Effect,
    Install,
    ReadChanges,
    Verdict,
    Verify,
    admit_all,
    install_all,
    perform,
    run_inline,
)
from wgjit.gateway.metrics import GatewayMetrics, MetricsError, MetricsServer
from wgjit.gateway.modes import Batch, Mode, ModeError, open_mode
from wgjit.gateway.outcome import Outcome
from wgjit.gateway.pool import LOST, Job, Result, VerifyPool, source_affinity
from wgjit.gateway.reactor import Reactor, Workers
from wgjit.handshake import Responder
from wgjit.keys import PrivateKey
from wgjit.sdnotify import notify as sd_notify
from wgjit.store import Store

# the GIL is handed over at least this often (seconds): a worker parsing a device dump holds
# the packet path for at most about this long at a time (Python's default is 5 ms)
SWITCH_INTERVAL = 0.001
# how long a clean stop waits for store/device calls in flight (e.g. the last handshake marks)
SHUTDOWN_WAIT = 5.0
# Python's cyclic garbage collector pauses the thread for a full collection in proportion to
# the heap: ~65 ms with 100 000 installed peers. Every GC_FREEZE_INTERVAL the loop collects
# (which scans only what is not frozen yet: well under a millisecond) and then freezes what
# survived (gc.freeze: out of the collector's sight; still freed by reference counting when
# dropped), so no collection ever scans the long-lived peers and no cyclic garbage is frozen.
GC_FREEZE_INTERVAL = 5.0
# hold mode: a judged knock still waiting for its release after this long (of the queue's 1 s
# hold limit) is a sign of load (see _on_knocks)
RELEASE_LOAD_DELAY = 0.6
# how often the loop looks for dead or hung verify workers
POOL_CHECK_INTERVAL = 0.25
# Verify jobs waiting for a worker slot (every worker has DEFAULT_INFLIGHT in flight): a herd
# waits here in order instead of getting fail-open verdicts the device cannot use (it does not
# know the peers yet). At most this many; a job that waited past the knock budget is let
# through (timeout) instead, since the queue releases its packet at 1 s anyway.
VERIFY_BACKLOG = 16384
# a verify worker that answers nothing for this long is killed and replaced (its knocks get
# fail-open verdicts); a healthy one answers a full in-flight window in milliseconds, but on a
# starved machine (CI, emulation) a healthy one may wait a second for a CPU. Held knocks do not
# wait for it: the queue releases them after 1 s (late verdicts are ignored)
POOL_HANG_TIMEOUT = 3.0


class GatewayError(WgjitError, RuntimeError):
    """The gateway cannot start; the message says why and what to do."""


def serve(
    device: Device,
    store: Store,
    config: GatewayConfig,
    log: EventLog,
    capture_interface: str | None = None,
    mode: str = "auto",
    queue_num: int | None = None,
    store_threads: int = 2,
    sweep_device: Device | None = None,
    metrics_listen: tuple[str, int] | None = None,
    more_stats: Callable[[], Mapping[str, int]] | None = None,
) -> int:
    """Run the gateway until SIGTERM/SIGINT/SIGHUP. `mode`: auto, hold, replay, invert (or
    none, for tests); `queue_num` (hold): the NFQUEUE number, default the listen port.
    `sweep_device`: a second handle on the same device for sweeps (read on their own thread
    while installs go on); without one, sweeps queue with the installs. `metrics_listen`:
    (host, port) to serve /metrics and /healthz on (503 until ready). `more_stats`: counters
    of other parts (hooks) for the stats line and /metrics."""
    memory.tune()
    if mode != "auto":
        config = dataclasses.replace(config, completion=mode)
    for w in config.validate():
        log.warning("config", message=w)
    state = device.read(peers=False)
    if state.private_key is None:
        raise GatewayError(
            f"interface {device.name} has no private key; set one with "
            f"`wg set {device.name} private-key FILE`"
        )
    if not state.listen_port:
        raise GatewayError(
            f"interface {device.name} has no listen port; set one with "
            f"`wg set {device.name} listen-port 51820`"
        )
    try:
        ifindex = socket.if_nametoindex(device.name)
    except OSError:
        ifindex = -1
    if not config.global_rate:
        config = dataclasses.replace(
            config, global_rate=measured_admission_rate(state.private_key, config.workers)
        )
    policy = Policy(
        Responder(state.private_key), config, log, wall=time.time, ignore_ifindex=ifindex
    )
    with contextlib.ExitStack() as stack:  # closed in reverse: capture first, signals last
        signals = stack.enter_context(_Signals())
        pool = None
        if config.workers > 1:
            # started first: their interpreters start while the gateway reconciles
            try:
                pool = VerifyPool(state.private_key, config.workers,
                                  hang_timeout=POOL_HANG_TIMEOUT, wait=False)  # fmt: skip
            except OSError as e:
                raise _no_workers(config.workers, e) from None
            stack.callback(pool.close)
        metrics = server = None
        if metrics_listen is not None:
            metrics = GatewayMetrics(device.name)
            try:
                server = MetricsServer(metrics, *metrics_listen)
            except MetricsError as e:
                raise GatewayError(str(e)) from None
            stack.callback(server.close)
            log.subscribe(metrics.on_event)
        # reconcile before anything is captured: the queue rules go live only once it is done
        started = time.monotonic()
        effects = policy.reconcile(device.handshakes(), started)
        run_inline(
            effects, lambda e, r, err: policy.on_done(e, r, err, time.monotonic()), store, device
        )
        del effects
        if policy.refused_start:
            raise GatewayError(policy.refused_start)
        if signals.stop_reason:  # asked to stop while reconciling: no capture to set up
            log.info("stopping", reason=signals.stop_reason)
            return 0
        reconcile_ms = round((time.monotonic() - started) * 1000)
        if pool is not None:
            try:
                pool.wait_ready()
            except OSError as e:
                raise _no_workers(config.workers, e) from None
        gc.collect()
        gc.freeze()
        memory.trim()

        stack.callback(sys.setswitchinterval, sys.getswitchinterval())
        sys.setswitchinterval(SWITCH_INTERVAL)
        reactor = Reactor()
        stack.callback(reactor.close)
        workers = Workers(reactor, {STORE: store_threads, DEVICE: 1, SWEEP: 1})
        loop = _Loop(policy, store, device, sweep_device, reactor, workers, log, metrics, pool)
        loop.more_stats = more_stats
        try:
            loop.mode = open_mode(
                stack,
                mode,
                port=state.listen_port,
                queue_num=queue_num,
                ifname=device.name,
                capture_interface=capture_interface,
                invert_delay=config.invert_delay,
                call_at=reactor.call_at,
                submit=loop.submit,
                log=log,
                release_rate=config.release_rate,
                release_window=config.release_window,
                source_limit=config.source_limit,
            )
        except ModeError as e:
            raise GatewayError(str(e)) from None
        if loop.mode.replier is not None:
            policy.cookies = CookieChecker(policy.responder.public_key)
        log.info(
            "ready",
            interface=device.name,
            public_key=str(state.public_key),
            listen_port=state.listen_port,
            mode=loop.mode.name,
            release_window=getattr(getattr(loop.mode, "window", None), "size", None),
            queue=getattr(getattr(loop.mode, "queue", None), "queue_num", None),
            source_limit=config.source_limit if getattr(loop.mode, "limits", None) else None,
            idle_timeout=config.idle_timeout,
            sweep_interval=config.sweep_interval,
            capture="nfqueue" if loop.mode.name == "hold" else capture_interface or "all",
            installed_now=len(policy.installed),
            verify_workers=pool.size if pool is not None else 0,
            admission_rate=config.global_rate,
            cookies=policy.cookies is not None,
            metrics=f"{metrics_listen[0]}:{server.port}" if server and metrics_listen else None,
            reconcile_ms=reconcile_ms,
        )
        if metrics is not None:
            metrics.watch(loop.stats)
            metrics.ready = True
        sd_notify(f"READY=1\nSTATUS=serving {device.name}, {len(policy.installed)} installed")
        loop.run(signals)
    return 0


class _Signals:
    """SIGTERM, SIGINT and SIGHUP ask for a clean stop; SIGUSR1 for a stats line. Caught from
    the start of start-up, not only once the loop runs: a signal's default action would kill
    the gateway with its queue rules and workers left behind, and a supervisor may stop a
    gateway that has just started. A stop asked for before the loop runs ends it as soon as
    it starts (or, during reconcile, before the capture is set up)."""

    def __init__(self) -> None:
        self.stop_reason = ""
        self._dump = False
        self._stop: Callable[[], None] | None = None
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._old_wakeup = -1
        self._old: dict[int, object] = {}

    def __enter__(self) -> _Signals:
        self._old_wakeup = signal.set_wakeup_fd(self._w.fileno())
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            self._old[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for s, h in self._old.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._r.close()
        self._w.close()

    def fileno(self) -> int:
        """Readable after any of the signals (the wake-up fd): the loop's select returns."""
        return self._r.fileno()

    def on_stop(self, stop: Callable[[], None]) -> None:
        """Call `stop` on a stop signal; at once if one came already."""
        self._stop = stop
        if self.stop_reason:
            stop()

    def take_dump(self) -> bool:
        """Whether SIGUSR1 came since the last call (and drain the wake-up bytes)."""
        with contextlib.suppress(BlockingIOError):
            self._r.recv(4096)
        dump, self._dump = self._dump, False
        return dump

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGUSR1:
            self._dump = True
            return
        self.stop_reason = signal.Signals(signum).name
        if self._stop is not None:
            self._stop()


def measured_admission_rate(key: PrivateKey, workers: int, seconds: float = 0.02) -> float:
    """The admission budget this host can pay: a new peer's knock costs two X25519s, so half
    the rate one core does them (measured now, for `seconds`), times the processes that do
    them. Without workers the loop's process also does everything else: half that again."""
    x = key.x25519()
    other = X25519PublicKey.from_public_bytes(PrivateKey.generate().public_key().raw)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 20:
        x.exchange(other)
        n += 1
    per_core = n / elapsed / 2
    return float(max(1000, round(per_core * workers if workers > 1 else per_core / 2, -2)))


def _no_workers(n: int, e: OSError) -> GatewayError:
    return GatewayError(
        f"the {n} verify workers did not start ({e}); --workers 0 verifies in the gateway's "
        "own process"
    )


class _Loop:
    """Carries out the policy's effects: verdicts through the mode, the rest on workers."""

    def __init__(
        self,
        policy: Policy,
        store: Store,
        device: Device,
        sweep_device: Device | None,
        reactor: Reactor,
        workers: Workers,
        log: EventLog,
        metrics: GatewayMetrics | None = None,
        pool: VerifyPool | None = None,
    ) -> None:
        self.policy = policy
        self.pool = pool
        self._backlog: deque[Job] = deque()  # see VERIFY_BACKLOG
        self._pool_fds: list[int] = []
        self._pool_restarts = 0
        self._pool_down = 0
        self.metrics = metrics
        self.more_stats: Callable[[], Mapping[str, int]] | None = None
        self.store = store
        self.device = device
        self.sweep_device = sweep_device
        self.reactor = reactor
        self.workers = workers
        self.log = log
        self.mode: Mode = None  # type: ignore[assignment]  # set by serve() before run()
        self._store_fd: int | None = None
        self._installs: list[Install] = []
        self._admits: list[Admit] = []

    # -- effects --------------------------------------------------------------------------

    def apply(self, effects: list[Effect]) -> None:
        refused: list[tuple[Job, Result | Outcome]] = []
        jobs = 0
        for e in effects:
            if isinstance(e, Verdict):
                self.mode.verdict(e)
            elif isinstance(e, Verify):
                jobs += 1
                self._verify(e, refused)
            else:
                self.submit(e)
        if jobs:
            assert self.pool is not None
            refused.extend(self.pool.flush())
            self._watch_pool()
        self.mode.flush()
        if refused:
            self._verified(refused)

    # -- the verify pool ------------------------------------------------------------------

    def _verify(self, e: Verify, refused: list[tuple[Job, Result | Outcome]]) -> None:
        pool = self.pool
        if pool is None:  # cannot happen: the policy offloads only with --workers > 1
            refused.append((Job(e.knock.payload, 0, context=e), Outcome.ERROR))
            return
        src = e.knock.source
        job = Job(e.knock.payload, source_affinity(src.host.packed, src.port), e.opened,
                  context=e, worker=e.worker)  # fmt: skip
        if self._backlog or not pool.submit(job):
            if len(self._backlog) >= VERIFY_BACKLOG:
                refused.append((job, Outcome.OVERLOADED))
            else:
                self._backlog.append(job)

    def _submit_backlog(self, out: list[tuple[Job, Result | Outcome]]) -> None:
        """Hand waiting verify jobs to workers with free slots, in arrival order."""
        pool, backlog = self.pool, self._backlog
        assert pool is not None
        too_old = time.monotonic() - self.policy.config.knock_budget
        while backlog:
            job = backlog[0]
            v = job.context
            assert isinstance(v, Verify)
            if v.knock.received_at < too_old:
                out.append((backlog.popleft(), Outcome.TIMEOUT))
            elif pool.submit(job):
                backlog.popleft()
            else:
                break
        out.extend(pool.flush())

    def _verified(self, results: list[tuple[Job, Result | Outcome]]) -> None:
        """Results (or fail-open outcomes) of verify jobs, to the policy."""
        events: list[tuple[Verify, object]] = []
        for job, r in results:
            v = job.context
            assert isinstance(v, Verify)
            if r is LOST:
                events.append((v, Outcome.WORKER_LOST))
            else:
                # the worker it ran on: an AUTH job for the claimed key goes there too
                events.append((Verify(v.knock, v.ticket, v.opened, job.worker, v.waiter), r))
        self.apply(self.policy.on_verified(events, time.monotonic()))

    def _on_pool(self, fd: int) -> None:
        assert self.pool is not None
        results: list[tuple[Job, Result | Outcome]] = list(self.pool.read(fd))
        if self._backlog:
            self._submit_backlog(results)
        self._watch_pool()
        if results:
            self._verified(results)

    def _check_pool(self) -> None:
        assert self.pool is not None
        lost: list[tuple[Job, Result | Outcome]] = list(self.pool.check())
        if self._backlog:
            self._submit_backlog(lost)
        self._watch_pool()
        if lost:
            self._verified(lost)
        self.reactor.call_at(time.monotonic() + POOL_CHECK_INTERVAL, self._check_pool)

    def _pool_reader(self, fd: int) -> Callable[[], None]:
        def verify_results() -> None:  # (the reactor names a stall by its handler's name)
            self._on_pool(fd)

        return verify_results

    def _watch_pool(self) -> None:
        """(Re-)register the workers' sockets after a worker was replaced (a new socket may
        reuse the old one's number, which epoll dropped when it was closed)."""
        pool = self.pool
        if pool is None:
            return
        if pool.down != self._pool_down:
            self._pool_down = pool.down
            self.log.warning("verify_workers_down", down=pool.down, of=pool.size)
        if pool.restarts == self._pool_restarts and self._pool_fds:
            return
        if pool.restarts != self._pool_restarts:
            self.log.warning("verify_worker_replaced", restarts=pool.restarts)
        self._pool_restarts = pool.restarts
        for fd in self._pool_fds:
            self.reactor.remove_reader(fd)
        self._pool_fds = pool.fds()
        for fd in self._pool_fds:
            self.reactor.add_reader(fd, self._pool_reader(fd))

    def submit(self, effect: Effect) -> None:
        if isinstance(effect, Install):
            # installs of one reactor turn go to the device together, at the end of the turn
            if not self._installs:
                self.reactor.call_at(0.0, self._flush_installs)
            self._installs.append(effect)
            return
        if isinstance(effect, Admit):
            # and admissions to the store, in one transaction
            if not self._admits:
                self.reactor.call_at(0.0, self._flush_admits)
            self._admits.append(effect)
            return
        where, device = effect.where, self.device
        if where == SWEEP:
            if self.sweep_device is None:
                where = DEVICE  # one handle: in order with the installs
            else:
                device = self.sweep_device

        def done(result: object, error: Exception | None) -> None:
            if isinstance(effect, ReadChanges) and error is None:
                self._watch_store(getattr(result, "wakeup_fd", None))
            self.apply(self.policy.on_done(effect, result, error, time.monotonic()))

        self._call(where, effect.what, lambda: perform(effect, self.store, device), done)

    def _call(
        self,
        where: str,
        what: str,
        fn: Callable[[], object],
        done: Callable[[object, Exception | None], None],
    ) -> None:
        """Run `fn` on a `where` worker, then `done(result, error)` on the loop; store calls
        are timed for /metrics."""
        took = 0.0

        def call() -> object:
            nonlocal took
            start = time.monotonic()
            try:
                return fn()
            finally:
                took = time.monotonic() - start

        def timed_done(result: object, error: Exception | None) -> None:
            if self.metrics is not None and where == STORE:
                self.metrics.store_call(what, took, error)
            done(result, error)

        self.workers.submit(where, call, timed_done)

    def _flush_admits(self) -> None:
        batch, self._admits = self._admits, []

        def done(result: object, error: Exception | None) -> None:
            now = time.monotonic()
            results = result if isinstance(result, list) else [None] * len(batch)
            out: list[Effect] = []
            for e, r in zip(batch, results, strict=True):
                out.extend(self.policy.on_done(e, r, error, now))
            self.apply(out)

        self._call(STORE, "admit", lambda: admit_all(batch, self.store), done)

    def _flush_installs(self) -> None:
        batch, self._installs = self._installs, []

        def call() -> object:
            """One error per install (None: installed). A failed batch is tried again one
            by one, so one bad peer does not fail the others."""
            try:
                install_all(batch, self.device)
                return [None] * len(batch)
            except Exception as e:
                if len(batch) == 1:
                    return [e]
            errors: list[Exception | None] = []
            for one in batch:
                try:
                    install_all([one], self.device)
                    errors.append(None)
                except Exception as e:
                    errors.append(e)
            return errors

        def done(result: object, error: Exception | None) -> None:
            now = time.monotonic()
            errors = result if isinstance(result, list) else [error] * len(batch)
            out: list[Effect] = []
            for e, err in zip(batch, errors, strict=True):
                out.extend(self.policy.on_done(e, None, err, now))
            self.apply(out)

        self.workers.submit(DEVICE, call, done)

    # -- the reactor's handlers -----------------------------------------------------------

    def _on_knocks(self) -> None:
        batch: Batch = self.mode.read()
        if batch:
            now = time.monotonic()
            if self.mode.release_delay(now) > RELEASE_LOAD_DELAY:
                # judged knocks wait for the device: judging more now only makes them wait
                # past the hold limit (released at once then, pushing the device past its
                # mark); new senders get cookies, as if the queue itself were late
                self.policy.note_late(now, "release_delay")
            self.apply(self.policy.on_knocks(batch, now))

    def next_deadline(self) -> float:
        return self.policy.next_deadline()

    def tick(self, now: float) -> None:
        self.apply(self.policy.on_tick(now))

    def _on_store_news(self) -> None:
        # NOTIFY: read the feed now. The fd stays readable until the worker drains it, so
        # stop watching it until that read comes back (it re-registers the current fd).
        self.policy.wake_changes()
        self._watch_store(None)

    def _watch_store(self, fd: int | None) -> None:
        """Watch the store's wake-up fd (PostgreSQL's LISTEN socket). Registered afresh after
        every feed read: a reconnect may reuse the number, and a closed fd leaves epoll."""
        if self._store_fd is not None:
            self.reactor.remove_reader(self._store_fd)
        self._store_fd = fd
        if fd is not None:
            try:
                self.reactor.add_reader(fd, self._on_store_news)
            except (ValueError, KeyError, OSError):
                self._store_fd = None

    # -- running --------------------------------------------------------------------------

    def run(self, signals: _Signals) -> None:
        def on_wake() -> None:
            if signals.take_dump():
                self.log.info("stats", **self.stats())

        try:
            self.reactor.add_reader(signals.fileno(), on_wake)
            self.reactor.add_reader(self.mode.fileno(), self._on_knocks)
            for fd, on_readable in self.mode.readers():
                self.reactor.add_reader(fd, on_readable)
            self.reactor.add_ticker(self)
            self.reactor.add_ticker(self.mode)
            if self.pool is not None:
                self._watch_pool()
                self.reactor.call_at(time.monotonic() + POOL_CHECK_INTERVAL, self._check_pool)
            self._freeze_gc()
            self.apply([])  # nothing yet; the first tick starts the timers' work
            signals.on_stop(self.reactor.stop)
            self.reactor.run()
            self.log.info("stopping", reason=signals.stop_reason, **self.stats())
        finally:
            self.reactor.remove_reader(signals.fileno())
            for e in self.policy.shutdown():
                self.submit(e)
            if not self.workers.close(SHUTDOWN_WAIT):
                self.log.warning("shutdown_incomplete", waited_s=SHUTDOWN_WAIT)

    def _freeze_gc(self) -> None:
        gc.collect()
        gc.freeze()
        memory.trim()  # what a sweep's snapshot or a batch of look-ups left in malloc's heaps
        self.reactor.call_at(time.monotonic() + GC_FREEZE_INTERVAL, self._freeze_gc)

    def stats(self) -> dict[str, object]:
        p = self.policy
        out: dict[str, object] = {
            "installed_now": len(p.installed),  # not "installed": the outcome counter
            "pending": p.pending,
            "loop_max_stall_ms": round(self.reactor.max_stall * 1000, 1),
            "loop_max_stall_in": self.reactor.max_stall_what,
            "store_calls": self.workers.busy(STORE),
            "device_calls": self.workers.busy(DEVICE),
            "log_dropped": self.log.dropped,
        }
        if self.pool is not None:
            out["verify_inflight"] = self.pool.inflight
            out["verify_backlog"] = len(self._backlog)
            out["verify_worker_restarts"] = self.pool.restarts
            out["verify_workers_down"] = self.pool.down
        out.update(self.mode.stats())
        if self.more_stats is not None:
            out.update(self.more_stats())
        return {**out, **dict(sorted(p.counters.items()))}
