"""Small, bounded, clock-injected building blocks of the gateway's admission policy.

TTL sets (duplicate suppression, negative cache), an LRU map, a filter of bodies seen before,
and token-bucket rate limiters. Those with time take it as an argument, so tests drive them
without sleeping; none does I/O.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLSet(Generic[K]):
    """Remembers keys for `ttl` seconds; at most `capacity` keys (oldest forgotten first)."""

    def __init__(self, ttl: float, capacity: int) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self._expiry: OrderedDict[K, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def contains(self, key: K, now: float) -> bool:
        exp = self._expiry.get(key)
        if exp is None:
            return False
        if exp <= now:
            del self._expiry[key]
            return False
        return True

    def add(self, key: K, now: float) -> None:
        self._expiry[key] = now + self.ttl
        self._expiry.move_to_end(key)
        self._trim(now)

    def discard(self, key: K) -> None:
        self._expiry.pop(key, None)

    def clear(self) -> None:
        self._expiry.clear()

    def _trim(self, now: float) -> None:
        # insertion order == expiry order (constant ttl), so expired keys sit at the front
        while self._expiry:
            k, exp = next(iter(self._expiry.items()))
            if exp > now and len(self._expiry) <= self.capacity:
                break
            del self._expiry[k]


class LRU(Generic[K, V]):
    """A mapping of at most `capacity` entries; the least recently used goes first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._d: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: K) -> V | None:
        value = self._d.get(key)
        if value is not None:
            self._d.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        if len(self._d) > self.capacity:
            self._d.popitem(last=False)

    def clear(self) -> None:
        self._d.clear()


class SeenFilter:
    """Remembers byte strings approximately, in fixed memory: `seen(x)` says whether x was
    added before, and adds it. Two Bloom filters of `capacity` entries each (16 bits an entry,
    7 probes): the newer takes additions, and when it is full it becomes the older and the
    older is cleared, so at least the last `capacity` additions are always remembered. False
    positives: about 0.07 % per full filter (0.14 % with both full), far fewer before; never
    a false negative within `capacity` additions. The probes come from a BLAKE2s keyed with
    a secret, so nobody can make two strings that share their probes on purpose. The newest
    RECENT additions are also kept exactly (see RECENT)."""

    PROBES = 7
    # the newest additions are also kept exactly, in a dict (Python's keyed SipHash): a flood
    # that resends a few bodies is answered from it for ~0.3 us, not the filters' ~5 us
    RECENT = 4096

    def __init__(self, capacity: int, key: bytes | None = None) -> None:
        bits = 1 << max(10, (capacity * 16 - 1).bit_length())
        self.capacity = capacity
        self._mask = bits - 1
        self._shift = bits.bit_length() - 1
        assert self._shift * self.PROBES <= 256  # probes from one 32-byte digest
        self._shifts = tuple(range(0, self._shift * self.PROBES, self._shift))
        self._recent: dict[bytes, None] = {}
        self._recent_max = min(self.RECENT, capacity)
        # private anonymous mappings: a page costs memory only once a bit in it is set, and
        # MADV_DONTNEED gives it back as zeros
        self._new = mmap.mmap(-1, bits >> 3, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._old = mmap.mmap(-1, bits >> 3, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._added = 0
        self._hash = hashlib.blake2s(key=key or os.urandom(16))

    def seen(self, data: bytes) -> bool:
        recent = self._recent
        if data in recent:
            return True
        recent[data] = None
        if len(recent) > self._recent_max:
            del recent[next(iter(recent))]
        h = self._hash.copy()
        h.update(data)
        v = int.from_bytes(h.digest(), "little")
        mask = self._mask
        probes = [(v >> s) & mask for s in self._shifts]
        new = self._new
        for i in probes:  # a flood of copies ends here: every probe set in the newer filter
            if not new[i >> 3] >> (i & 7) & 1:
                break
        else:
            return True
        # new, or only in the older filter: (re-)added, counted
        old = self._old
        in_old = True
        for i in probes:
            byte, bit = i >> 3, 1 << (i & 7)
            new[byte] |= bit
            if in_old and not old[byte] & bit:
                in_old = False
        self._added += 1
        if self._added >= self.capacity:
            self._old, self._new = new, old
            old.madvise(mmap.MADV_DONTNEED)  # zero again, its pages given back
            self._added = 0
        return in_old


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float

    def spend(self, now: float, rate: float, burst: float) -> bool:
        self.tokens = min(burst, self.tokens + max(0.0, now - self.updated) * rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class TokenBucket:
    """`rate` tokens per second, up to `burst` saved. `allow(now)` spends one if it can."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._b: _Bucket | None = None

    def allow(self, now: float) -> bool:
        if self._b is None:
            self._b = _Bucket(self.burst, now)
        return self._b.spend(now, self.rate, self.burst)

    def next_token(self, now: float) -> float:
        """When allow() will next succeed (`now` if it would now)."""
        b = self._b
        if b is None:
            return now
        tokens = b.tokens + max(0.0, now - b.updated) * self.rate
        return now if tokens >= 1.0 else now + (1.0 - tokens) / self.rate


class KeyedRateLimiter(Generic[K]):
    """One token bucket per key (e.g. source IP), bounded: idle keys are forgotten."""

    def __init__(self, rate: float, burst: float, capacity: int = 65536) -> None:
        self.rate = rate
        self.burst = burst
        self.capacity = capacity
        self._buckets: OrderedDict[K, _Bucket] = OrderedDict()

    def allow(self, key: K, now: float) -> bool:
        b = self._buckets.get(key)
        if b is None:
            b = _Bucket(self.burst, now)
            self._buckets[key] = b
            if len(self._buckets) > self.capacity:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return b.spend(now, self.rate, self.burst)
