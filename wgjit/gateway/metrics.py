"""Prometheus metrics and a health check for a running gateway, served on their own thread.

`/metrics` (Prometheus text format, prometheus-client) and `/healthz` (200 once ready and the
store answers, 503 otherwise, with the reason). Serving never touches the packet path: a scrape
reads snapshots (a copy of the policy's counters, lengths of its tables) on the server's
thread; the loop only records events (`GatewayMetrics.on_event`, a log listener) and store-call
durations, each a few dictionary or lock operations.

Names follow Prometheus conventions: `wgjit_` prefix, `_total` counters, base units.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from wgjit import __version__
from wgjit.addr import Endpoint, InvalidAddress
from wgjit.errors import WgjitError
from wgjit.gateway.outcome import Outcome

# a store that answered nothing for this long makes /healthz say 503
STORE_SILENT_AFTER = 5.0
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class MetricsError(WgjitError, ValueError):
    """--metrics-listen is not HOST:PORT, or the address cannot be bound."""


def parse_listen(text: str) -> tuple[str, int]:
    """`127.0.0.1:9586` or `[::1]:9586` -> (host, port); MetricsError with the fix."""
    try:
        ep = Endpoint.parse(text)
    except InvalidAddress as e:
        raise MetricsError(f"--metrics-listen: {e}") from None
    return str(ep.host), ep.port


class GatewayMetrics:
    """What the gateway counts, and the snapshot sources read at scrape time."""

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self.registry = CollectorRegistry(auto_describe=True)
        self.ready = False
        self._store_ok_at = time.monotonic()
        self._store_error: str | None = None
        self._snapshot: Callable[[], Mapping[str, Any]] = dict
        self.evictions = Counter(
            "wgjit_evictions_total", "Peers removed from the device, by reason", ["reason"],
            registry=self.registry,
        )  # fmt: skip
        self.install_seconds = Histogram(
            "wgjit_install_duration_seconds",
            "From a knock's arrival to its peer being on the device",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.store_seconds = Histogram(
            "wgjit_store_call_duration_seconds", "Store calls, by call", ["call"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.store_errors = Counter(
            "wgjit_store_call_errors_total", "Store calls that failed, by call", ["call"],
            registry=self.registry,
        )  # fmt: skip
        self.registry.register(_Snapshot(self))

    def watch(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        """Where scrapes read counters and gauges from (the loop's stats())."""
        self._snapshot = snapshot

    # -- recorded by the loop (cheap) -----------------------------------------------------

    def on_event(self, event: str, fields: dict[str, Any]) -> None:
        if event == "evict":
            self.evictions.labels(str(fields.get("reason", "unknown"))).inc()
        elif event == "install":
            took = fields.get("took_ms")
            if isinstance(took, int | float):
                self.install_seconds.observe(took / 1000)

    def store_call(self, call: str, seconds: float, error: Exception | None) -> None:
        self.store_seconds.labels(call).observe(seconds)
        if error is None:
            self._store_ok_at = time.monotonic()
            self._store_error = None
        else:
            self.store_errors.labels(call).inc()
            self._store_error = str(error) or type(error).__name__

    # -- read by the server ---------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        if not self.ready:
            return False, "starting"
        if self._store_error is not None:
            return False, f"store unreachable: {self._store_error}"
        silent = time.monotonic() - self._store_ok_at
        if silent > STORE_SILENT_AFTER:
            return False, f"store silent for {silent:.0f} s"
        return True, "ok"

    def snapshot(self) -> Mapping[str, Any]:
        return self._snapshot()


def _by_label(s: Mapping[str, Any], name: str, doc: str, label: str, **keys: str
              ) -> CounterMetricFamily:  # fmt: skip
    """A counter family with one `label` value per keyword: label value=the stats key."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, key in keys.items():
        family.add_metric([value], float(s.get(key, 0)))
    return family


class _Snapshot(Collector):
    """Counters and gauges read from the loop's stats at scrape time."""

    def __init__(self, m: GatewayMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.m.snapshot()
        knocks = CounterMetricFamily(
            "wgjit_knocks", "Captured initiations, by what became of them", labels=["outcome"]
        )
        for o in Outcome:
            knocks.add_metric([o.value], float(s.get(o.value, 0)))
        yield knocks
        yield _by_label(
            s, "wgjit_held_packets", "Held initiations by how they left the queue", "verdict",
            accept="queue_accepted", drop="queue_dropped", released_late="queue_expired",
            malformed="queue_malformed",
        )  # fmt: skip
        yield _by_label(
            s, "wgjit_device_answers",
            "Hold mode: the device's answers to released initiations, seen leaving (a cookie "
            "reply: the device passed its own under-load mark, and the release window backs off)",
            "kind", response="device_answers", cookie_reply="device_cookies",
        )  # fmt: skip
        yield _by_label(
            s, "wgjit_reinjections",
            "Hold mode: installed peers' initiations sent to the device again (an install that "
            "finished after its initiation left the queue, a release the device cookied): sent, "
            "or missed (too old or re-sent enough: the client retries)",
            "result", sent="reinjected", missed="reinject_missed",
        )  # fmt: skip
        yield _by_label(
            s, "wgjit_hooks", "Install/evict hook runs, by result", "result",
            **{r: f"hooks_{r}" for r in ("run", "failed", "timed_out", "dropped")},
        )  # fmt: skip
        for name, key, doc in (
            ("wgjit_installs", "installs", "Peers installed on the device"),
            ("wgjit_cookie_replies", "cookie", "Cookie replies sent under load"),
            ("wgjit_under_load", "under_load", "Times the gateway went under load (queue delay "
             "or a spent admission budget): cookie replies and per-source limits for a second"),
            ("wgjit_running_late", "running_late", "Times knocks ran late while few were "
             "judged at a cost (cheap junk: replays, bad mac1): no cookie replies, which would "
             "spare nothing"),
            ("wgjit_repeated_bodies", "repeated_bodies", "Initiations whose body (ephemeral, "
             "static, timestamp) was seen before: judged from memory, no X25519"),
            ("wgjit_releases_unanswered", "release_unanswered",
             "Hold mode: releases the device did not answer in time"),
            ("wgjit_device_cookies_resent", "device_cookies_resent", "Hold mode: releases of "
             "installed peers' initiations the device answered with a cookie reply, queued to "
             "be sent again"),
            ("wgjit_source_limited", "source_limited", "Hold mode: initiations the kernel "
             "dropped before queueing them: their source (an IPv4 address, an IPv6 /64) sent "
             "more than --source-limit a second (read every 5 s)"),
            ("wgjit_verify_worker_restarts", "verify_worker_restarts",
             "Verify workers replaced (died or hung)"),
        ):  # fmt: skip
            yield CounterMetricFamily(name, doc, value=float(s.get(key, 0)))
        for name, key, doc in (
            ("wgjit_peers_installed", "installed_now", "Peers on the device now"),
            ("wgjit_knocks_pending", "pending", "Knocks waiting for the store or the device"),
            ("wgjit_store_calls_in_flight", "store_calls", "Store calls not finished"),
            ("wgjit_device_calls_in_flight", "device_calls", "Device calls not finished"),
            ("wgjit_verify_jobs_in_flight", "verify_inflight",
             "Knocks on the verify workers (--workers), not answered yet"),
            ("wgjit_release_window", "release_window",
             "Hold mode: released initiations the device may have unanswered now"),
            ("wgjit_releases_in_flight", "release_inflight",
             "Hold mode: released initiations the device has not answered yet"),
        ):  # fmt: skip
            yield GaugeMetricFamily(name, doc, value=float(s.get(key, 0)))
        yield GaugeMetricFamily(
            "wgjit_loop_max_stall_seconds", "The longest single step of the packet loop",
            value=float(s.get("loop_max_stall_ms", 0)) / 1000,
        )  # fmt: skip
        ok, _ = self.m.health()
        yield GaugeMetricFamily("wgjit_up", "1 when /healthz answers 200", value=float(ok))
        info = GaugeMetricFamily(
            "wgjit_build", "Build information", labels=["version", "interface"]
        )
        info.add_metric([__version__, self.m.interface], 1.0)
        yield info


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """An HTTP server on its own threads: GET /metrics, GET /healthz."""

    def __init__(self, metrics: GatewayMetrics, host: str, port: int) -> None:
        m = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    body, ctype, code = generate_latest(m.registry), CONTENT_TYPE_LATEST, 200
                elif self.path == "/healthz":
                    ok, reason = m.health()
                    body = json.dumps({"ok": ok, "status": reason}).encode() + b"\n"
                    ctype, code = "application/json", 200 if ok else 503
                else:
                    body, ctype, code = b"not found: try /metrics or /healthz\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes are not events

        try:
            server_class = _V6Server if ":" in host else ThreadingHTTPServer
            self._server = server_class((host, port), Handler)
        except OSError as e:
            raise MetricsError(
                f"--metrics-listen {host}:{port}: cannot listen there: {e.strerror}"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="wgjit-metrics", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
