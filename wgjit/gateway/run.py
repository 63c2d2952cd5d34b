"""The gateway's event loop: capture socket, timers and signals around the policy in core.py.

One thread, one selector: knocks are handled as they arrive, the change feed is polled every
`change_poll_interval`, idle peers are swept every `sweep_interval`. SIGTERM/SIGINT stop it
cleanly; SIGUSR1 logs the counters. A bad packet or a failed device/store call is logged and
counted, never fatal.
"""

from __future__ import annotations

import contextlib
import selectors
import signal
import socket
import time
import traceback
from types import FrameType

from wgjit.capture.afpacket import PacketCapture
from wgjit.device import Device, DeviceError
from wgjit.events import EventLog
from wgjit.gateway.core import Gateway, GatewayConfig
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
) -> int:
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
    gw = Gateway(device, store, config, log, Responder(state.private_key), ignore_ifindex=ifindex)
    gw.start()

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
        with PacketCapture(state.listen_port, interface=capture_interface) as cap:
            sel.register(cap.fileno(), selectors.EVENT_READ, "capture")
            sel.register(wake_r, selectors.EVENT_READ, "wake")
            log.info(
                "ready",
                interface=device.name,
                public_key=str(state.public_key),
                listen_port=state.listen_port,
                mode="invert",
                idle_timeout=config.idle_timeout,
                sweep_interval=config.sweep_interval,
                capture=capture_interface or "all",
            )
            next_poll = time.monotonic() + config.change_poll_interval
            next_sweep = time.monotonic() + config.sweep_interval
            while not stop:
                due = min(next_poll, next_sweep, gw.next_completion() or next_poll)
                timeout = max(0.0, due - time.monotonic())
                for key, _ in sel.select(timeout):
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            wake_r.recv(4096)
                        continue
                    for knock in cap.recv_batch():
                        _guarded(log, "handle", gw.handle, knock)
                now = time.monotonic()
                _guarded(log, "complete", gw.complete_due, now)
                if now >= next_poll:
                    _guarded(log, "poll_changes", gw.poll_changes)
                    next_poll = now + config.change_poll_interval
                if now >= next_sweep:
                    _guarded(log, "sweep", gw.sweep)
                    next_sweep = now + config.sweep_interval
                if dump:
                    dump = False
                    log.info("stats", **_stats(gw, cap))
            log.info("stopping", **_stats(gw, cap))
    finally:
        sel.close()
        signal.set_wakeup_fd(old_wakeup)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        wake_r.close()
        wake_w.close()
        _guarded(log, "shutdown", gw.shutdown)
    return 0


def _stats(gw: Gateway, cap: PacketCapture) -> dict[str, int]:
    packets, drops = cap.stats()
    return {
        "installed": len(gw.installed),
        "captured": packets,
        "capture_drops": drops,
        **dict(sorted(gw.counters.items())),
    }


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
