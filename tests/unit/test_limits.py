from wgjit.gateway.limits import KeyedRateLimiter, TokenBucket, TTLSet


def test_ttlset_expires_and_bounds() -> None:
    s: TTLSet[str] = TTLSet(ttl=10, capacity=3)
    assert not s.contains("a", 0)
    s.add("a", 0)
    assert s.contains("a", 5)
    assert not s.contains("a", 10.0)  # expired exactly at ttl
    for i, k in enumerate("bcde"):
        s.add(k, 20 + i)
    assert len(s) == 3
    assert not s.contains("b", 24)  # oldest dropped at capacity
    assert s.contains("e", 24)
    s.discard("e")
    assert not s.contains("e", 24)


def test_token_bucket_burst_then_rate() -> None:
    b = TokenBucket(rate=10, burst=5)
    assert sum(b.allow(100.0) for _ in range(20)) == 5
    assert not b.allow(100.05)
    assert b.allow(100.2)  # refilled at 10 per second
    assert sum(b.allow(1000.0) for _ in range(20)) == 5  # refill capped at burst


def test_keyed_limiter_is_per_key_and_bounded() -> None:
    lim: KeyedRateLimiter[str] = KeyedRateLimiter(rate=1, burst=2, capacity=2)
    assert [lim.allow("x", 0) for _ in range(3)] == [True, True, False]
    assert lim.allow("y", 0)
    assert lim.allow("z", 0)  # evicts x, the least recently used
    assert lim.allow("x", 0)  # x starts afresh
