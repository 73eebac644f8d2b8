"""Pure logic: upstream health, the per-client limits (on a fake clock), 0x20 and the reply check."""

from __future__ import annotations

from blocker.exchange import BadAnswer, CaseMismatch, _verdict, randomise_case
from blocker.health import DOWN_AFTER, Health, order
from blocker.ratelimit import Outstanding, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_unmeasured_upstreams_keep_configured_order_then_fastest_first() -> None:
    first, second = Health(0, 2.0), Health(1, 2.0)
    assert order([first, second], 0.0) == [first, second]
    first.replied(0.050)
    second.replied(0.002)
    assert order([first, second], 0.0) == [second, first]


def test_a_silent_upstream_becomes_suspect_and_goes_last() -> None:
    hole, healthy = Health(0, 2.0), Health(1, 2.0)
    hole.sent(10.0)
    assert not hole.suspect(10.2)
    assert hole.suspect(10.3)  # no RTT sample: silent 0.25 s is suspect
    assert order([hole, healthy], 10.3) == [healthy, hole]
    hole.replied(0.001)
    assert not hole.suspect(10.7)
    busy = Health(2, 2.0)
    for _ in range(64):  # many queries, none answered: suspect sooner
        busy.sent(20.0)
    assert not busy.suspect(20.01) and busy.suspect(20.03)


def test_down_after_failures_in_a_row_skipped_unless_nothing_else_and_back_on_a_reply() -> None:
    dead, other = Health(0, 2.0), Health(1, 2.0)
    transitions = [dead.failed(5.0) for _ in range(DOWN_AFTER)]
    assert transitions == [False] * (DOWN_AFTER - 1) + [True]
    assert dead.is_down() and order([dead, other], 5.0) == [other]
    for _ in range(DOWN_AFTER):
        other.failed(6.0)
    assert order([dead, other], 5.0) == [dead, other]  # everything down: still asked
    first_probe = dead.down_until
    dead.probe_failed(first_probe)
    assert dead.down_until - first_probe == 2.0  # backoff doubles
    dead.replied(0.003)
    assert not dead.is_down() and dead.srtt == 0.003


def test_token_bucket_allows_burst_then_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(qps=10, burst=20, clock=clock)
    assert sum(limiter.allow("10.0.0.1") for _ in range(30)) == 20
    assert limiter.allow("10.0.0.2")  # another client has its own bucket
    clock.now += 0.5
    assert sum(limiter.allow("10.0.0.1") for _ in range(30)) == 5


def test_outstanding_cap_per_client() -> None:
    outstanding = Outstanding(2)
    assert outstanding.acquire("a") and outstanding.acquire("a") and not outstanding.acquire("a")
    assert outstanding.acquire("b")
    outstanding.release("a")
    assert outstanding["a"] == 1 and outstanding.acquire("a")


def test_one_timeout_with_nothing_answered_since_is_down() -> None:
    hole = Health(0, 2.0)
    hole.sent(10.0)
    assert hole.failed(12.0) and hole.is_down()
    busy = Health(1, 2.0)
    busy.sent(10.0)
    busy.replied(0.001)  # other queries are answered: one lost packet is not a dead upstream
    busy.sent(10.5)
    assert not busy.failed(12.0) and not busy.is_down()


def test_randomised_case_keeps_the_name_and_varies_only_letters() -> None:
    question = b"\x03w-1\x07example\x04test\x00\x00\x01\x00\x01"
    seen = {randomise_case(question) for _ in range(50)}
    assert len(seen) > 40
    for variant in seen:
        assert variant.lower() == question and variant[0] == 3 and variant[2:5] == b"-1\x07"
        assert variant[-4:] == question[-4:]


def test_a_reply_counts_only_with_our_id_qr_and_exact_question() -> None:
    question = b"\x03WwW\x07eXample\x04test\x00\x00\x01\x00\x01"
    ours = b"\x12\x34\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00" + question
    assert _verdict(ours, b"\x12\x34", question) is True
    assert _verdict(b"\x12\x35" + ours[2:], b"\x12\x34", question) is None  # another ID
    assert _verdict(ours[:12] + question.lower(), b"\x12\x34", question) is CaseMismatch
    assert _verdict(b"\x12\x34\x01\x00" + ours[4:], b"\x12\x34", question) is BadAnswer  # QR=0: our query echoed
    other = b"\x03www\x05other\x04test\x00\x00\x01\x00\x01"
    assert _verdict(ours[:12] + other, b"\x12\x34", question) is None
    assert _verdict(ours[:11], b"\x12\x34", question) is None
