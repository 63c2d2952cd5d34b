"""Cookie replies and mac2 (whitepaper §5.4.7): what the client does with our reply makes a
mac2 we accept, bound to its address, for two minutes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgjit.addr import Endpoint
from wgjit.cookie import (
    COOKIE_REPLY_SIZE,
    COOKIE_SECRET_MAX_AGE,
    CookieChecker,
    add_mac2,
    open_cookie_reply,
)
from wgjit.handshake import OFF_MAC1, OFF_MAC2, Responder, build_initiation
from wgjit.keys import PrivateKey

SRC = Endpoint.parse("198.18.0.11:40000")


def test_cookie_round_trip_as_a_client_does_it() -> None:
    gw, client = PrivateKey.generate(), PrivateKey.generate()
    checker = CookieChecker(gw.public_key())
    pkt = build_initiation(client, gw.public_key(), sender_index=0x01020304)
    assert not checker.mac2_ok(pkt, SRC, 0.0)  # mac2 zero: no cookie yet
    reply = checker.reply(pkt, SRC, 0.0)
    assert len(reply) == COOKIE_REPLY_SIZE == 64
    assert reply[:4] == b"\x03\x00\x00\x00"
    assert reply[4:8] == (0x01020304).to_bytes(4, "little")  # the initiation's sender index
    cookie = open_cookie_reply(reply, gw.public_key(), pkt[OFF_MAC1:OFF_MAC2])
    # the client's next initiation (new ephemeral, new timestamp) carries mac2
    retry = add_mac2(build_initiation(client, gw.public_key()), cookie)
    assert checker.mac2_ok(retry, SRC, 1.0)
    Responder(gw).verify(retry)  # mac2 does not disturb the handshake itself
    # bound to the address and port it was given to
    assert not checker.mac2_ok(retry, Endpoint.parse("198.18.0.12:40000"), 1.0)
    assert not checker.mac2_ok(retry, Endpoint.parse("198.18.0.11:40001"), 1.0)
    # and to the secret's lifetime
    assert not checker.mac2_ok(retry, SRC, COOKIE_SECRET_MAX_AGE + 1)


def test_reply_is_bound_to_the_initiation_it_answers() -> None:
    gw, client = PrivateKey.generate(), PrivateKey.generate()
    checker = CookieChecker(gw.public_key())
    pkt = build_initiation(client, gw.public_key())
    reply = checker.reply(pkt, SRC, 0.0)
    other = build_initiation(client, gw.public_key())
    with pytest.raises(ValueError):  # mac1 is the associated data
        open_cookie_reply(reply, gw.public_key(), other[OFF_MAC1:OFF_MAC2])
    with pytest.raises(ValueError):  # encrypted to this gateway's key
        open_cookie_reply(reply, PrivateKey.generate().public_key(), pkt[OFF_MAC1:OFF_MAC2])


def test_ipv6_sources() -> None:
    gw = PrivateKey.generate()
    checker = CookieChecker(gw.public_key())
    src = Endpoint.parse("[fd18::11]:51820")
    pkt = build_initiation(PrivateKey.generate(), gw.public_key())
    cookie = open_cookie_reply(checker.reply(pkt, src, 0.0), gw.public_key(), pkt[116:132])
    assert checker.mac2_ok(add_mac2(pkt, cookie), src, 0.0)


@given(st.binary(max_size=200))
def test_mac2_check_is_total(data: bytes) -> None:
    assert CookieChecker(PrivateKey.generate().public_key()).mac2_ok(data, SRC, 0.0) in (
        True,
        False,
    )
