"""The gateway's event loop: capture socket, timers and signals around the policy in core.py.

One thread, one selector: knocks are handled as they arrive, the change feed is polled every
`change_poll_interval` (and at once when the store's wake-up fd, if it has one, becomes
readable), idle peers are swept every `sweep_interval`, a heartbeat goes to the store every
`heartbeat_interval`. SIGTERM/SIGINT stop it cleanly; SIGUSR1 logs the counters. A bad packet
or a failed device/store call is logged and counted, never fatal.

The mode (how a handshake is completed after an install) decides the capture source and what
the loop does with the outcome the policy returns: `hold` reads initiations from an NFQUEUE
(its own iptables rules, removed on exit) and issues the verdict; `replay` captures on
AF_PACKET and re-injects an installed peer's initiation; `invert` captures on AF_PACKET and lets
the policy make the device initiate back. `auto` picks the first that works, in that order.
The loop decides no verdict itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import selectors
import signal
import socket
import time
import traceback
from types import FrameType

from wgjit.capture.afpacket import PacketCapture
from wgjit.capture.iptables import QueueRules, RuleError
from wgjit.capture.nfqueue import NfQueue, QueueError
from wgjit.capture.packet import Knock
from wgjit.capture.replay import Reinjector, ReplayError
from wgjit.device import Device, DeviceError, DeviceState
from wgjit.events import EventLog
from wgjit.gateway.core import Gateway, GatewayConfig, release
from wgjit.handshake import Responder
from wgjit.store import Store, StoreError


class GatewayError(RuntimeError):
    """The gateway cannot start; the message says why and what to do."""


def serve(
    device: Device,
    store: Store,
    config: GatewayConfig,
    log: EventLog,
    capture_interface: str | None = None,
    mode: str = "auto",
    queue_num: int | None = None,
) -> int:
    """Run the gateway until SIGTERM/SIGINT. `mode`: auto, hold, replay, invert (or none,
    for tests); `queue_num` (hold): the NFQUEUE number, default the listen port."""
    if mode != "auto":
        config = dataclasses.replace(config, completion=mode)
    for w in config.validate():
        log.warning("config", message=w)
    state = device.read()
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
    with contextlib.ExitStack() as stack:
        sources = _open_sources(
            stack, mode, state.listen_port, queue_num, device.name, capture_interface, log
        )
        config = dataclasses.replace(config, completion=sources.mode)
        gw = Gateway(
            device, store, config, log, Responder(state.private_key), ignore_ifindex=ifindex
        )
        gw.start()
        return _loop(gw, sources, config, log, device.name, state, capture_interface)


@dataclasses.dataclass
class _Sources:
    mode: str
    capture: PacketCapture | None = None
    queue: NfQueue | None = None
    reinjector: Reinjector | None = None
    queue_num: int | None = None


def _open_sources(
    stack: contextlib.ExitStack,
    mode: str,
    port: int,
    queue_num: int | None,
    ifname: str,
    capture_interface: str | None,
    log: EventLog,
) -> _Sources:
    """Open what `mode` needs; for `auto`, the first of hold, replay, invert that works."""
    if mode in ("auto", "hold"):
        qnum = port if queue_num is None else queue_num
        try:
            queue = NfQueue(qnum, port)
            rules = QueueRules(port, qnum, ifname)
            try:
                rules.install()  # removes what it inserted if it fails half way
            except BaseException:
                queue.close()
                raise
            stack.enter_context(queue)
            stack.callback(rules.remove)  # runs before the queue is closed
            if rules.removed_stale:
                log.warning("stale_rules_removed", count=rules.removed_stale)
            return _Sources("hold", queue=queue, queue_num=qnum)
        except (QueueError, RuleError, OSError) as e:
            if mode == "hold":
                raise GatewayError(f"--mode hold: {e}") from None
            log.warning("mode_unavailable", mode="hold", reason=str(e))
    sources = _Sources(mode)
    if mode in ("auto", "replay"):
        try:
            sources.reinjector = Reinjector()
            stack.callback(sources.reinjector.close)
            sources.mode = "replay"
        except ReplayError as e:
            if mode == "replay":
                raise GatewayError(f"--mode replay: {e}") from None
            log.warning("mode_unavailable", mode="replay", reason=str(e))
            sources.mode = "invert"
    sources.capture = stack.enter_context(PacketCapture(port, interface=capture_interface))
    return sources


def _loop(
    gw: Gateway,
    sources: _Sources,
    config: GatewayConfig,
    log: EventLog,
    ifname: str,
    state: DeviceState,
    capture_interface: str | None,
) -> int:
    cap, queue, reinjector = sources.capture, sources.queue, sources.reinjector

    stop = False
    dump = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop, dump
        if signum == signal.SIGUSR1:
            dump = True
        else:
            stop = True

    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
    old_handlers = {
        s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    }
    sel = selectors.DefaultSelector()
    try:
        if cap is not None:
            sel.register(cap.fileno(), selectors.EVENT_READ, "capture")
        if queue is not None:
            sel.register(queue.fileno(), selectors.EVENT_READ, "queue")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        log.info(
            "ready",
            interface=ifname,
            public_key=str(state.public_key),
            listen_port=state.listen_port,
            mode=sources.mode,
            queue=sources.queue_num,
            idle_timeout=config.idle_timeout,
            sweep_interval=config.sweep_interval,
            capture="nfqueue" if queue is not None else capture_interface or "all",
        )
        next_poll = time.monotonic() + config.change_poll_interval
        next_sweep = time.monotonic() + config.sweep_interval
        next_beat = time.monotonic() + config.heartbeat_interval
        store_fd = _watch_store(sel, gw, None)
        while not stop:
            due = min(
                next_poll,
                next_sweep,
                next_beat,
                gw.next_completion() or next_poll,
                (queue.next_deadline() if queue else None) or next_poll,
            )
            timeout = max(0.0, due - time.monotonic())
            for key, _ in sel.select(timeout):
                if key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        wake_r.recv(4096)
                elif key.data == "store":
                    next_poll = 0.0  # the store has news (NOTIFY): read the feed now
                elif key.data == "queue":
                    assert queue is not None
                    _release_batch(gw, queue, log)
                else:
                    assert cap is not None
                    for knock in cap.recv_batch():
                        outcome = _handle(gw, log, knock)
                        if outcome == "installed" and reinjector is not None:
                            _guarded(log, "replay", reinjector.send, knock)
            now = time.monotonic()
            _guarded(log, "complete", gw.complete_due, now)
            if queue is not None and queue.expire(now):
                log.warning("held_too_long", released=queue.expired)
            if now >= next_poll:
                _guarded(log, "poll_changes", gw.poll_changes)
                next_poll = now + config.change_poll_interval
                store_fd = _watch_store(sel, gw, store_fd)
            if now >= next_beat:
                _guarded(log, "heartbeat", gw.heartbeat)
                next_beat = now + config.heartbeat_interval
            if now >= next_sweep:
                _guarded(log, "sweep", gw.sweep)
                next_sweep = now + config.sweep_interval
            if dump:
                dump = False
                log.info("stats", **_stats(gw, sources))
        log.info("stopping", **_stats(gw, sources))
    finally:
        sel.close()
        signal.set_wakeup_fd(old_wakeup)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        wake_r.close()
        wake_w.close()
        _guarded(log, "shutdown", gw.shutdown)
    return 0


def _watch_store(sel: selectors.BaseSelector, gw: Gateway, current: int | None) -> int | None:
    """(Re)register the store's wake-up fd, if it has one (PostgreSQL's LISTEN connection).
    Registered afresh each time: after a reconnect the new socket may reuse the old number,
    and a closed fd silently leaves epoll. Without one, the timer polls the feed."""
    if current is not None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            sel.unregister(current)
    try:
        fd = gw.store.wakeup_fd()
    except StoreError:
        fd = None
    if fd is not None:
        sel.register(fd, selectors.EVENT_READ, "store")
    return fd


def _handle(gw: Gateway, log: EventLog, knock: Knock) -> str:
    """gw.handle(knock); an unexpected error is logged and becomes outcome `error`."""
    try:
        return gw.handle(knock)
    except Exception as e:
        log.error(
            "handle_failed",
            error=f"{type(e).__name__}: {e}",
            where=traceback.extract_tb(e.__traceback__)[-1].line,
        )
        return "error"


def _release_batch(gw: Gateway, queue: NfQueue, log: EventLog) -> None:
    """Handle every queued initiation and give each the verdict its outcome calls for.

    An install's verdict is sent at once (the client is waiting); the others are sent
    together at the end of the batch."""
    for held in queue.recv_batch():
        outcome = _handle(gw, log, held.knock)
        queue.verdict(held, release(outcome))
        if outcome == "installed":
            queue.flush()
    queue.flush()


def _stats(gw: Gateway, sources: _Sources) -> dict[str, int]:
    out = {"installed": len(gw.installed)}
    if sources.capture is not None:
        packets, drops = sources.capture.stats()
        out.update(captured=packets, capture_drops=drops)
    if sources.queue is not None:
        out.update(sources.queue.stats())
    if sources.reinjector is not None:
        out.update(replayed=sources.reinjector.sent, replay_errors=sources.reinjector.errors)
    return {**out, **dict(sorted(gw.counters.items()))}


def _guarded(log: EventLog, what: str, fn: object, *args: object) -> None:
    """Run one step; log and carry on if it fails (the gateway must keep running)."""
    try:
        fn(*args)  # type: ignore[operator]
    except (DeviceError, StoreError) as e:
        log.error(f"{what}_failed", error=str(e))
    except Exception as e:
        log.error(
            f"{what}_failed",
            error=f"{type(e).__name__}: {e}",
            where=traceback.extract_tb(e.__traceback__)[-1].line,
        )
