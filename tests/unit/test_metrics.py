"""The metrics a scrape reads and the health check's states, without a gateway."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from wgjit.gateway.metrics import GatewayMetrics, MetricsError, parse_listen
from wgjit.store import StoreError


def test_scrape_reads_the_loops_stats() -> None:
    m = GatewayMetrics("wg0")
    m.watch(lambda: {"installed": 4, "installs": 4, "installed_now": 3, "cookie": 2,
                     "queue_accepted": 7, "hooks_run": 3, "hooks_timed_out": 1,
                     "verify_inflight": 5, "verify_worker_restarts": 1,
                     "worker_lost": 2, "under_load": 1, "running_late": 4, "repeated_bodies": 9,
                     "device_answers": 9, "device_cookies": 1,
                     "release_window": 32, "release_inflight": 6,
                     "reinjected": 5, "reinject_missed": 1,
                     "device_cookies_resent": 3})  # fmt: skip
    m.on_event("evict", {"reason": "idle"})
    m.on_event("install", {"took_ms": 2.5})
    m.store_call("lookup", 0.002, None)
    text = generate_latest(m.registry).decode()
    for line in (
        'wgjit_knocks_total{outcome="installed"} 4.0',
        'wgjit_knocks_total{outcome="unknown"} 0.0',
        'wgjit_knocks_total{outcome="worker_lost"} 2.0',
        "wgjit_verify_jobs_in_flight 5.0",
        "wgjit_verify_worker_restarts_total 1.0",
        "wgjit_installs_total 4.0",
        "wgjit_peers_installed 3.0",
        "wgjit_cookie_replies_total 2.0",
        "wgjit_under_load_total 1.0",
        "wgjit_running_late_total 4.0",
        "wgjit_repeated_bodies_total 9.0",
        'wgjit_device_answers_total{kind="response"} 9.0',
        'wgjit_device_answers_total{kind="cookie_reply"} 1.0',
        "wgjit_release_window 32.0",
        "wgjit_releases_in_flight 6.0",
        "wgjit_releases_unanswered_total 0.0",
        'wgjit_reinjections_total{result="sent"} 5.0',
        'wgjit_reinjections_total{result="missed"} 1.0',
        "wgjit_device_cookies_resent_total 3.0",
        'wgjit_held_packets_total{verdict="accept"} 7.0',
        'wgjit_hooks_total{result="run"} 3.0',
        'wgjit_hooks_total{result="timed_out"} 1.0',
        'wgjit_evictions_total{reason="idle"} 1.0',
        "wgjit_install_duration_seconds_count 1.0",
        'wgjit_store_call_duration_seconds_count{call="lookup"} 1.0',
    ):
        assert line in text, line


def test_health_follows_start_and_store() -> None:
    m = GatewayMetrics("wg0")
    assert m.health() == (False, "starting")
    m.ready = True
    assert m.health() == (True, "ok")
    m.store_call("heartbeat", 2.0, StoreError("cannot reach the database"))
    ok, why = m.health()
    assert not ok and "cannot reach the database" in why
    m.store_call("heartbeat", 0.001, None)
    assert m.health() == (True, "ok")


@pytest.mark.parametrize("text", ["9586", "localhost:9586", "127.0.0.1:0x", "[::1]"])
def test_listen_address_errors_name_the_flag(text: str) -> None:
    with pytest.raises(MetricsError, match="--metrics-listen"):
        parse_listen(text)
    assert parse_listen("[::1]:9586") == ("::1", 9586)
