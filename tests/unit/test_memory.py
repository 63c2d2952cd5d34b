"""What the gateway keeps per installed peer, and that freed heap goes back to the kernel.

Issue 9's goal is a gateway of at most 100 MB with 100 000 installed peers; about 36 MB of
that is the interpreter and its libraries, so the policy may keep at most ~500 bytes per peer
(name, key, config hash, handshake marks, traffic counters accounted, prefix index: ~500 now).
These tests catch a field or an index that quietly doubles it, and a sweep that holds the
device's answer for every peer at once instead of a chunk of it.
"""

from __future__ import annotations

import gc
import io
import ipaddress
import os
import tracemalloc
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from tests.unit.policy_driver import SyncGateway
from wgjit.device import DeviceState, PeerConfig, PeerStats, SnapshotDump, StatsDump
from wgjit.events import EventLog
from wgjit.gateway import memory
from wgjit.gateway.core import GatewayConfig
from wgjit.handshake import Responder, Timestamp
from wgjit.keys import PrivateKey, PublicKey
from wgjit.store import Peer, open_store

PEERS = 20_000
BYTES_PER_PEER = 520


class DumpDevice:
    """A device holding PEERS peers whose dumps make new key objects every time, as the
    UAPI and netlink parsers do."""

    name = "wgmem0"

    def __init__(self, private_key: PrivateKey, raw_keys: bytes, last: float) -> None:
        self.private_key, self.raw, self.last = private_key, raw_keys, last
        self.traffic = 100_000

    def read(self, peers: bool = True) -> DeviceState:
        return DeviceState(self.name, self.private_key, 51820, {})

    def handshakes(self) -> dict[PublicKey, float]:
        raw = self.raw
        return {PublicKey(raw[i : i + 32]): self.last for i in range(0, len(raw), 32)}

    def stats(self) -> dict[PublicKey, PeerStats]:
        """Counters that moved (the policy keeps what it accounted) and an endpoint each."""
        raw, self.traffic = self.raw, self.traffic + 1000
        return {
            PublicKey(raw[i : i + 32]): (
                self.last, self.traffic + i, 2 * self.traffic + i, f"198.18.{i >> 13}.9:51820"
            )
            for i in range(0, len(raw), 32)
        }  # fmt: skip

    def stats_dump(self) -> StatsDump:
        return SnapshotDump(self.stats())

    def set_peer(self, config: PeerConfig) -> None:
        pass

    def set_peers(self, configs: Sequence[PeerConfig]) -> None:
        pass

    def remove_peers(self, keys: Iterable[PublicKey]) -> None:
        pass

    def identity(self) -> object:
        return 1

    def close(self) -> None:
        pass


def test_installed_peer_costs_at_most_520_bytes(tmp_path: Path) -> None:
    now = 1.8e9
    raw = os.urandom(32 * PEERS)
    mark = Timestamp.from_unix(now - 60).raw
    store = open_store(str(tmp_path / "peers.db"))
    store.import_peers([
        Peer(
            f"peer-{i:06d}", PublicKey(raw[32 * i : 32 * i + 32]),
            (ipaddress.ip_network(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}/32"),),
            handshake_hwm=mark,
        )
        for i in range(PEERS)
    ])  # fmt: skip
    gw = PrivateKey.generate()
    g = SyncGateway(
        DumpDevice(gw, raw, now - 10), store, GatewayConfig(), EventLog(io.StringIO()),
        Responder(gw), clock=lambda: now,
    )  # fmt: skip
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        g.start()
        g.sweep()
        g.sweep()  # a sweep's snapshot is dropped once worked through
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(g.installed) == PEERS
    peer = store.get_peer("peer-000001")  # the sweeps ran: they accounted its traffic
    assert peer is not None and peer.rx_bytes > 0 and peer.endpoint, peer
    assert kept / PEERS <= BYTES_PER_PEER, f"{kept / PEERS:.0f} bytes per installed peer"
    store.close()


class ChunkDump:
    """DumpDevice's stats as the real dumps hand them out (Device.stats_dump): each chunk's
    key objects, tuples and endpoint strings are made when it is taken."""

    def __init__(self, device: DumpDevice) -> None:
        self.device = device
        device.traffic += 1000
        self.offset = 0
        self.done = False
        self.complete = True

    def take(self, peers: int) -> dict[PublicKey, PeerStats]:
        d, start = self.device, self.offset
        end = self.offset = min(len(d.raw), start + 32 * peers)
        self.done = end == len(d.raw)
        return {
            PublicKey(d.raw[i : i + 32]): (
                d.last, d.traffic + i, 2 * d.traffic + i, f"198.18.{i >> 13}.9:51820"
            )
            for i in range(start, end, 32)
        }  # fmt: skip

    def close(self) -> None:
        self.done = True


# A sweep holds what it reads of the device one chunk at a time (two at most: one worked
# through, the next read meanwhile): ~440 traced bytes per peer of a chunk (key object, tuple,
# counters, endpoint string, dict slot, traffic row). Beyond the chunks, only a few bytes per
# installed peer (the list of keys the "lost" check walks).
SWEEP_BYTES_PER_CHUNK_PEER = 1200
SWEEP_BYTES_PER_PEER = 20


def test_a_sweep_holds_a_chunk_of_the_device_not_all_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peak of Python memory during a sweep of PEERS peers read SWEEP_CHUNK (here 512)
    at a time is bounded by the chunk, not the device: a sweep that held every peer's stats
    at once (one dict of the whole device, ~390 bytes a peer here) fails it."""
    from wgjit.gateway import core

    monkeypatch.setattr(core, "SWEEP_CHUNK", 512)
    now = 1.8e9
    raw = os.urandom(32 * PEERS)
    store = open_store(str(tmp_path / "peers.db"))
    store.import_peers([
        Peer(f"peer-{i:06d}", PublicKey(raw[32 * i : 32 * i + 32]),
             (ipaddress.ip_network(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}/32"),))
        for i in range(PEERS)
    ])  # fmt: skip
    gw = PrivateKey.generate()
    device = DumpDevice(gw, raw, now - 10)
    device.stats_dump = lambda: ChunkDump(device)  # type: ignore[method-assign]
    g = SyncGateway(device, store, GatewayConfig(), EventLog(io.StringIO()), Responder(gw),
                    clock=lambda: now)  # fmt: skip
    tracemalloc.start()  # (from before the first sweep: the counters it keeps are traced)
    try:
        g.start()
        g.sweep()  # the first sweep accounts every peer
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        g.sweep()  # and the second again: all counters moved
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert len(g.installed) == PEERS and g.counters["sweeps"] == 2
    assert store.get_peer("peer-000001").rx_bytes > 0  # type: ignore[union-attr]
    bound = SWEEP_BYTES_PER_CHUNK_PEER * core.SWEEP_CHUNK + SWEEP_BYTES_PER_PEER * PEERS
    assert peak <= bound, f"a sweep of {PEERS} peers peaked at {peak} bytes ({bound} allowed)"
    store.close()


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def test_trim_returns_freed_heap_to_the_kernel() -> None:
    memory.tune()
    memory.trim()
    base = _rss_kib()
    # 64 MiB in 1 KiB chunks: too large for Python's small-object allocator, too small for
    # their own mappings, so they live in malloc's heap and stay there when freed
    chunks = [bytearray(1024) for _ in range(64 * 1024)]
    grown = _rss_kib()
    assert grown - base > 48 * 1024, (base, grown)
    del chunks
    gc.collect()
    memory.trim()
    assert _rss_kib() - base < 16 * 1024, (base, grown, _rss_kib())
